"""AdEMAMix: Adam with a second, slow first moment (no torch.optim counterpart; as
``pytorch_optimizer.AdEMAMix``, with per-param step counts)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ._base import FusedOptimizer
from ._segments import Launch, as_float
from .kernels import advance, step_table, update_step
from .kernels.ademamix import ADEMAMIX, ADEMAMIX_WARMUP
from .lion import check, check_lr, keep_own_group_keys, refuse_complex

__all__ = ["AdEMAMix"]

_NOT_IMPLEMENTED = {
    "cautious": "its mask is rescaled by a count over the whole tensor, which one element-wise launch cannot form",
    "stable_adamw": "its update is divided by an RMS over the whole tensor, which one element-wise launch cannot form",
}


def schedule_alpha(step: float, alpha: float, t_alpha_beta3: float | None) -> float:
    """The paper's alpha warm-up: min(t * alpha / T, alpha)."""
    return alpha if t_alpha_beta3 is None else min(step * alpha / t_alpha_beta3, alpha)


def schedule_beta3(step: float, beta1: float, beta3: float, t_alpha_beta3: float | None) -> float:
    """The paper's beta3 warm-up, min(exp(ln b1 ln b3 / ((1 - t/T) ln b3 + (t/T) ln b1)), b3)."""
    if t_alpha_beta3 is None:
        return beta3
    log1, log3 = math.log(beta1), math.log(beta3)
    return min(math.exp(log1 * log3 / ((1.0 - step / t_alpha_beta3) * log3 + (step / t_alpha_beta3) * log1)), beta3)


class AdEMAMix(FusedOptimizer):
    r"""AdEMAMix (Pagliardini, Ablin and Grangier, 2024), with the whole update in one Triton
    launch per parameter segment.

    Drop-in for ``pytorch_optimizer.AdEMAMix`` (same arguments, defaults and state tensors; the
    step count is kept per param, as torch.optim does, instead of per group). Per element, with
    :math:`g` the gradient (negated if ``maximize``), at step :math:`t`:

    .. math::
        g &\leftarrow g + \lambda\theta \quad\text{(L2)} \qquad
            \theta \leftarrow \theta(1 - \gamma\lambda) \quad\text{(weight\_decouple;}\ 1 - \lambda
            \text{ with fixed\_decay)} \\
        m_1 &\leftarrow \beta_1 m_1 + (1-\beta_1) g, \quad
            m_2 \leftarrow \beta_3(t) m_2 + (1-\beta_3(t)) g, \quad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        \theta &\leftarrow \theta - \gamma \frac{m_1 / (1-\beta_1^t) + \alpha(t) m_2}
            {\sqrt{v} / \sqrt{1-\beta_2^t} + \epsilon}

    with the paper's warm-ups over :math:`T` = ``t_alpha_beta3`` steps, :math:`\alpha(t) =
    \min(t\alpha/T, \alpha)` and :math:`\beta_3(t) = \min(\exp(\frac{\ln\beta_1 \ln\beta_3}{(1 - t/T)
    \ln\beta_3 + (t/T)\ln\beta_1}), \beta_3)` (constants without warm-up).

    Args:
        lr (float, Tensor): learning rate :math:`\gamma` (default: 1e-3).
        betas (tuple[float, float, float]): :math:`(\beta_1, \beta_2, \beta_3)` (default: (0.9, 0.999, 0.9999)).
        weight_decay (float): :math:`\lambda` (default: 0).
        weight_decouple (bool): decay the param directly, as the paper and AdamW (default: False).
        fixed_decay (bool): with ``weight_decouple``, decay by :math:`1 - \lambda`, not scaled by lr
            (default: False).
        alpha (float): weight :math:`\alpha` of the slow moment (default: 5).
        t_alpha_beta3 (float, optional): warm-up steps :math:`T` of :math:`\alpha` and
            :math:`\beta_3`; None for none (default: None).
        eps (float): :math:`\epsilon` (default: 1e-8).
        maximize (bool): maximize the objective (default: False).
        foreach (bool, optional): accepted for compatibility, changes nothing.
        cautious, stable_adamw (bool): pytorch_optimizer's variants; ``True`` raises
            ``NotImplementedError`` (both need a reduction over each tensor).
        capturable (bool): step counts and step scalars on the device (CUDA graphs), as for the
            torch.optim classes.
        params, and fused_optim's own options: see :class:`~fused_optim.FusedOptimizer`.

    ``state[p]`` holds ``step``, ``exp_avg``, ``exp_avg_sq`` and ``exp_avg_slow``. ``state_dict()``
    also writes each group's step (the largest of its params') as pytorch_optimizer keeps it, and
    ``load_state_dict`` gives params without a ``step`` their group's, so checkpoints move both ways.
    """

    _torch_cls = None
    _algorithm = ADEMAMIX
    _sparse_error = "AdEMAMix does not support sparse gradients"

    def __init__(
        self, params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        weight_decay: float = 0.0, weight_decouple: bool = False, fixed_decay: bool = False, alpha: float = 5.0,
        t_alpha_beta3: float | None = None, eps: float = 1e-8, maximize: bool = False, foreach: bool | None = None,
        *, cautious: bool = False, stable_adamw: bool = False, capturable: bool = False, **extensions,
    ) -> None:  # fmt: skip
        super().__init__(params, locals())

    # --- arguments -------------------------------------------------------------------------------
    def _check_arguments(self, defaults: dict) -> None:
        check_lr(defaults["lr"])
        betas = defaults["betas"]
        check("betas", betas, isinstance(betas, (tuple, list)) and len(betas) == 3, "must be three values")
        beta1, beta2, beta3 = (as_float(b) for b in betas)
        check("beta1", beta1, 0.0 <= beta1 < 1.0, "must be in [0, 1)")
        check("beta2", beta2, 0.0 <= beta2 < 1.0, "must be in [0, 1)")
        check("beta3", beta3, 0.0 <= beta3 <= 1.0, "must be in [0, 1]")
        for key in ("weight_decay", "alpha", "eps"):
            check(f"{key} value", defaults[key], as_float(defaults[key]) >= 0.0, "must be >= 0")
        t = defaults["t_alpha_beta3"]
        if t is not None:
            check("t_alpha_beta3", t, as_float(t) > 0.0, "the warm-up length in steps: must be > 0, or None for none")
            # the beta3 warm-up takes logarithms of beta1 and beta3 and rises from beta1 to beta3;
            # with beta1 > beta3 its denominator crosses 0 after t_alpha_beta3 steps
            check("beta1", beta1, 0.0 < beta1 <= beta3, f"the beta3 warm-up needs 0 < beta1 <= beta3 = {beta3}")

    def _check_options(self, group) -> None:
        for key, why in _NOT_IMPLEMENTED.items():
            if group.get(key):
                raise NotImplementedError(f"fused_optim.AdEMAMix does not implement {key}=True: {why}")
        super()._check_options(group)

    def _validate(self, index: int, group, grads) -> None:
        refuse_complex("AdEMAMix", group, grads, "pytorch_optimizer's AdEMAMix refuses them too")
        super()._validate(index, group, grads)

    # --- declarations ----------------------------------------------------------------------------
    def _weight_decay(self, group) -> tuple[float, bool]:
        return as_float(group["weight_decay"]), bool(group["weight_decouple"])

    def _hyper(self, group) -> tuple[float, ...]:
        beta1, beta2, beta3 = (as_float(b) for b in group["betas"])
        return (1.0 - beta1, beta2, 1.0 - beta2, as_float(group["eps"]), as_float(group["alpha"]), beta3)

    def _warmup_hyper(self, group) -> tuple[float, ...]:
        beta1, beta2, beta3 = (as_float(b) for b in group["betas"])
        t = as_float(group["t_alpha_beta3"])
        return (beta1, beta2, beta3, as_float(group["alpha"]), t, as_float(group["eps"]))

    def _step_scalars(self, group, scalars: dict[str, float]) -> tuple[float, float, float, float]:
        step = scalars["step"]
        beta1, beta2, beta3 = (as_float(b) for b in group["betas"])
        t = group["t_alpha_beta3"]
        t = None if t is None else as_float(t)
        bias_correction1 = 1.0 - math.pow(beta1, step)
        bias_correction2_sq = math.sqrt(1.0 - math.pow(beta2, step))
        alpha_t = schedule_alpha(step, as_float(group["alpha"]), t)
        beta3_t = schedule_beta3(step, beta1, beta3, t)
        return (bias_correction1, bias_correction2_sq, alpha_t, 1.0 - beta3_t)

    # --- step --------------------------------------------------------------------------------------
    def _launch(self, group, launch: Launch) -> None:
        """The base class's launch, with two changes: ``fixed_decay`` scales the param by 1 - wd,
        which the skeleton reads from the per-tensor table's decay column (a launch argument would
        be 1 - lr * wd); and device step counts with the warm-up on take ``ADEMAMIX_WARMUP``, whose
        step scalars need more constants than ``ADEMAMIX``'s hyperparameter slots hold."""
        seg, features, tables = launch.seg, launch.features, launch.tables
        lr = 0.0 if features.lr_tensor is not None else as_float(group["lr"])  # a device lr is read on the device
        weight_decay, decoupled = self._weight_decay(group)
        fixed = decoupled and bool(group["fixed_decay"]) and weight_decay != 0.0
        # the decay column of the per-tensor table: 1 - lr * wd (decoupled), wd (L2), or 1 - wd (fixed)
        column = (1.0 - weight_decay, False) if fixed else (weight_decay, decoupled)
        algo, hyper = ADEMAMIX, self._hyper(group)
        if seg.device_step:
            if group["t_alpha_beta3"] is not None:
                algo, hyper = ADEMAMIX_WARMUP, self._warmup_hyper(group)
            if tables.step_table is not None and tables.step_table.shape[1] != algo.n_step + 3:
                tables.step_table = None  # the warm-up was switched on or off: the other layout
            scalars = advance(algo, tables, features, lr=lr, hyper=hyper, weight_decay=column[0], decoupled=column[1])
        else:
            scalars = self._host_step_scalars(group, launch, lr, *column)
            if fixed and not isinstance(scalars, torch.Tensor):  # one tuple for the launch: a table, for 1 - wd
                steps = seg.scalars_np["step"][launch.rows]
                per_row = np.tile(np.asarray(scalars, dtype=np.float64), (len(steps), 1))
                scalars = step_table(per_row, lr, *column, steps, seg.device)
        update_step(
            algo, tables, seg.flat, param_dtype=seg.dtype, lr=lr, hyper=hyper, step_scalars=scalars,
            weight_decay=weight_decay, decoupled=decoupled, maximize=bool(group["maximize"]), features=features,
            num_warps=self._num_warps, **self._codes(seg),
        )  # fmt: skip

    # --- checkpoints: pytorch_optimizer keeps the step count per group -----------------------------
    def state_dict(self):
        state_dict = super().state_dict()
        for saved in state_dict["param_groups"]:
            steps = [int(as_float(state_dict["state"][i]["step"])) for i in saved["params"] if i in state_dict["state"]]
            if steps:
                saved["step"] = max(steps)
        return state_dict

    def load_state_dict(self, state_dict) -> None:
        state_dict = keep_own_group_keys(self, state_dict)
        states = dict(state_dict.get("state", {}))
        groups = []
        for group in state_dict.get("param_groups", []):
            saved = dict(group)
            step = saved.pop("step", None)
            if step is not None:  # pytorch_optimizer's: each param without its own step takes its group's
                for i in saved["params"]:
                    if states.get(i) and "step" not in states[i]:
                        states[i] = {**states[i], "step": torch.tensor(float(step), dtype=torch.float32)}
            groups.append(saved)
        super().load_state_dict({**state_dict, "state": states, "param_groups": groups})
