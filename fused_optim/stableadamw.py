"""StableAdamW: AdamW with update clipping by the per-tensor RMS of g^2 / v (as ``optimi.StableAdamW``)."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import ClassVar

import numpy as np
import torch

from . import _dtensor
from ._base import FusedOptimizer
from ._segments import as_float, real_dtype
from .kernels import step_table
from .kernels.stableadamw import STABLEADAMW

__all__ = ["StableAdamW"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _real(value) -> float | None:
    """``value`` as a float when it is a real number (or a 1-element real tensor), else None."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            return None
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _check(name: str, value, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} ({what})")


def debias_beta(beta: float, step: int) -> float:
    """optimi's debiased beta, ``beta * (1 - beta**(step - 1)) / (1 - beta**step)``, as it writes it."""
    return (beta**step - beta) / (beta**step - 1)


def _is_compensation(comp, p: torch.Tensor) -> bool:
    """Whether ``comp`` is optimi's Kahan compensation of a low-precision ``p`` (not its placeholder)."""
    return (
        isinstance(comp, torch.Tensor) and p.dtype in _LOW_PRECISION and comp.numel() == p.numel() and comp.numel() > 0
    )


class StableAdamW(FusedOptimizer):
    r"""StableAdamW (Wortsman et al., 2023), as ``optimi.StableAdamW``: AdamW with optimi's
    debiased betas and the learning rate clipped per tensor by the RMS of :math:`g^2 / v`, in two
    Triton launches per parameter segment (the per-tensor sums, then the update).

    Drop-in for ``optimi.StableAdamW`` with ``decouple_lr`` either way (same arguments, defaults,
    per-group entries ``beta1``, ``beta2``, ``setup`` and ``step`` (the group's step count, an
    int32 tensor), state ``exp_avg``, ``exp_avg_sq``, ``eps_sq`` and ``kahan_comp`` (always None
    here), and ``state_dict``). At the group's step :math:`t`, with
    :math:`\hat\beta = (\beta^t - \beta) / (\beta^t - 1)`, per tensor:

    .. math::
        m &\leftarrow \hat\beta_1 m + (1 - \hat\beta_1) g, \qquad
            v \leftarrow \hat\beta_2 v + (1 - \hat\beta_2) g^2, \\
        \gamma_t &= \gamma / \max\Big(1, \sqrt{\operatorname{mean}\big(g^2 / \max(v, \epsilon^2)\big)}\Big), \\
        \theta &\leftarrow \theta (1 - \gamma_t \lambda') - \gamma_t \frac{m}{\sqrt v + \epsilon},
            \qquad \lambda' = \lambda \text{, or } \lambda / \gamma_{\max} \text{ with decouple\_lr}

    Args:
        lr (float, Tensor): learning rate :math:`\gamma` (required, as in optimi).
        betas (tuple[float, float]): :math:`(\beta_1, \beta_2)`, each in [0, 1) (default: (0.9, 0.99));
            kept in the param groups as ``beta1`` and ``beta2``, as optimi does (a group given with
            ``betas`` has them translated).
        weight_decay (float): :math:`\lambda`, decoupled (default: 1e-2).
        eps (float): added to the denominator; :math:`\epsilon^2` (the state ``eps_sq``, made at a
            param's first step in its dtype) bounds :math:`v` in the RMS (default: 1e-6).
        decouple_lr (bool): fully decoupled weight decay, :math:`\lambda / \gamma_{\max}` (default: False).
        max_lr (float): :math:`\gamma_{\max}` for ``decouple_lr`` (default: None, ``lr``).
        kahan_sum (bool): None or False: no Kahan compensation (``kahan_comp`` stays None). For
            bf16/fp16 params use ``master_weights=True`` (an fp32 copy, which a loaded optimi
            compensation is folded into) or ``stochastic_rounding=True``; True with such a param and
            no master copy raises ``NotImplementedError`` (fp32/fp64 params: no effect, as in optimi).
        foreach, triton (bool): accepted for compatibility; the update is always fused.
        gradient_release (bool): True raises ``NotImplementedError``.
        params, and fused_optim's own options: see :class:`~fused_optim.FusedOptimizer`
            (``capturable=True`` raises ``NotImplementedError``: the step count is the group's host
            counter, as in optimi).
    """

    _torch_cls = None  # beyond torch.optim: checks its own arguments
    _algorithm = STABLEADAMW
    _scalar_state: ClassVar[dict[str, float]] = {}  # one step count per group (``group["step"]``), as optimi

    def __init__(
        self, params, lr: float | torch.Tensor, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 1e-2,
        eps: float = 1e-6, decouple_lr: bool = False, max_lr: float | None = None, kahan_sum: bool | None = None,
        foreach: bool | None = None, triton: bool | None = None, gradient_release: bool = False, **extensions,
    ) -> None:  # fmt: skip
        if extensions.pop("capturable", False):
            raise NotImplementedError(
                "fused_optim.StableAdamW does not implement capturable=True: its step count is the group's "
                "host counter (group['step']), as in optimi, and the debiased betas are computed from it on the host"
            )
        super().__init__(params, locals())
        high = [g["weight_decay"] for g in self.param_groups if g["decouple_lr"] and g["weight_decay"] >= 1e-3]
        if high:  # optimi's warning
            warnings.warn(
                f"You are using weight_decay up to {max(high)} which is potentially high for decouple_lr=True. "
                "Unlike decoupled weight decay, fully decoupled weight decay does not reduce weight decay by the "
                "learning rate.",
                UserWarning,
                stacklevel=2,
            )

    # --- arguments and group entries ------------------------------------------------------------
    def _normalize(self, defaults: dict) -> dict:
        # optimi's group entries, in its order (beta1 and beta2, not betas; setup before the first step)
        betas = defaults["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (a pair (beta1, beta2))")
        max_lr = defaults["max_lr"]
        if defaults["decouple_lr"] and max_lr is None:
            max_lr = defaults["lr"]  # optimi: the constructor's lr
        entries = {"lr": defaults["lr"], "beta1": betas[0], "beta2": betas[1]}
        entries.update((k, defaults[k]) for k in ("eps", "weight_decay", "decouple_lr"))
        entries["max_lr"] = max_lr
        entries.update((k, defaults[k]) for k in ("kahan_sum", "foreach", "triton", "gradient_release"))
        return {**entries, "setup": False}

    def _check_arguments(self, defaults: dict) -> None:
        if isinstance(defaults["lr"], torch.Tensor) and defaults["lr"].numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        for name, key in (("learning rate", "lr"), ("epsilon value", "eps"), ("weight_decay value", "weight_decay")):
            value = _real(defaults[key])
            _check(name, defaults[key], value is not None and 0.0 <= value < math.inf, "a finite number >= 0")
        for i, key in enumerate(("beta1", "beta2")):
            value = _real(defaults[key])
            _check(f"beta parameter at index {i}", defaults[key], value is not None and 0.0 <= value < 1.0, "in [0, 1)")
        max_lr = defaults["max_lr"]
        if max_lr is not None:
            value = _real(max_lr)
            _check("max_lr", max_lr, value is not None and 0.0 <= value < math.inf, "None or a finite number >= 0")
            _check("max_lr", max_lr, value > 0 or not defaults["decouple_lr"], "> 0 with decouple_lr=True")
        for key in ("decouple_lr", "gradient_release"):
            _check(key, defaults[key], isinstance(defaults[key], bool), "a bool")
        for key in ("kahan_sum", "foreach", "triton"):
            _check(key, defaults[key], defaults[key] is None or isinstance(defaults[key], bool), "None or a bool")

    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        if "betas" in group:  # optimi would keep it unused and take the default beta1, beta2
            betas = group.pop("betas")
            _check("betas", betas, isinstance(betas, (tuple, list)) and len(betas) == 2, "a pair (beta1, beta2)")
            group["beta1"], group["beta2"] = betas
        merged = {**self.defaults, **group}
        if merged["decouple_lr"] and merged["max_lr"] is None:
            group["max_lr"] = merged["max_lr"] = merged["lr"]
        self._check_arguments(merged)
        self._check_options(merged)
        super().add_param_group(group)

    def _check_options(self, group) -> None:
        super()._check_options(group)
        if group.get("decouple_lr") and not as_float(group.get("max_lr") or 0.0) > 0:  # the decay divides by it
            raise ValueError(f"Invalid max_lr: {group.get('max_lr')!r} (> 0 with decouple_lr=True)")
        if group.get("gradient_release"):
            raise NotImplementedError(
                "fused_optim.StableAdamW does not implement gradient_release=True (optimi's per-parameter step "
                "during the backward pass): call step() after backward"
            )

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # the base fills in the signature's defaults: betas is beta1, beta2 here
            if "beta1" in group:
                group.pop("betas", None)

    # --- checks ---------------------------------------------------------------------------------
    def _validate(self, index: int, group, grads) -> None:
        for i, (p, g) in enumerate(zip(group["params"], grads)):
            if g is None:
                continue
            if p.is_complex():
                raise NotImplementedError(
                    f"fused_optim.StableAdamW does not take complex parameters (parameter {i} of param group "
                    f"{index}): optimi's arithmetic on them (maximum, the RMS) is not per real part"
                )
            if group.get("kahan_sum") and p.dtype in _LOW_PRECISION and not self.options["master_weights"]:
                raise NotImplementedError(self._no_kahan(f"parameter {i} of param group {index} is {p.dtype}"))
        super()._validate(index, group, grads)

    def _check_state(self, state: dict, p: torch.Tensor, group, where: str) -> None:
        super()._check_state(state, p, group, where)
        eps_sq = state.get("eps_sq")  # a one-element real tensor (its value is read at layout, not here)
        if isinstance(eps_sq, torch.Tensor):
            ok = eps_sq.numel() == 1 and eps_sq.is_floating_point()
        else:
            ok = eps_sq is None or _real(eps_sq) is not None
        if not ok:
            raise ValueError(f"state 'eps_sq' of {where} must hold one real value, got {eps_sq!r}")
        if _is_compensation(state.get("kahan_comp"), p) and not self.options["master_weights"]:
            raise NotImplementedError(self._no_kahan(f"state 'kahan_comp' of {where} holds optimi's compensation"))

    @staticmethod
    def _no_kahan(what: str) -> str:
        return (
            f"fused_optim.StableAdamW does not implement Kahan summation (kahan_sum=True), and {what}: use "
            "master_weights=True (an fp32 copy of the params, which takes kahan_sum's place; a loaded Kahan "
            "compensation is added to it), or kahan_sum=None with stochastic_rounding=True"
        )

    # --- state ----------------------------------------------------------------------------------
    def _new_segment(self, place, group, key, members, positions):
        """The segment, then optimi's per-param entries beside its moments: ``eps_sq`` (eps**2 in the
        param's dtype, from a param's first step; its values are read once here, at layout, for the
        kernels) and ``kahan_comp`` (None; a loaded compensation goes into the master copy)."""
        seg = super()._new_segment(place, group, key, members, positions)
        eps_sq = np.empty(len(members), dtype=np.float64)
        kept = []  # (member, eps_sq tensor) already in the state
        for i, p in enumerate(members):
            state = self.state[p]
            value = state.get("eps_sq")
            if value is None:
                value = torch.tensor(as_float(group["eps"]) ** 2, dtype=real_dtype(p.dtype))  # optimi's _init_state
                eps_sq[i] = float(value)
                dict.__setitem__(state, "eps_sq", value.to(_dtensor.local(p).device))
            else:
                kept.append((i, value))
            comp = state.get("kahan_comp")
            if _is_compensation(comp, p) and seg.master:  # optimi's compensation: the weight is p + comp
                master = seg.region(i, "master_param")
                master.add_(_dtensor.real(comp).to(torch.float32).view_as(master))
                comp = None
            dict.__setitem__(state, "kahan_comp", comp if isinstance(comp, torch.Tensor) else None)
        if kept:  # loaded or replaced: read once, here
            values = [torch.as_tensor(_dtensor.local(v)).detach().reshape(()) for _, v in kept]
            eps_sq[[i for i, _ in kept]] = torch.stack([v.to(seg.device, torch.float64) for v in values]).cpu().numpy()
        seg.eps_sq = eps_sq
        return seg

    def bytes_per_step(self) -> int:
        """As ``FusedOptimizer.bytes_per_step``, plus the sums pass, which reads the grad and
        ``exp_avg_sq`` once more (the compiler drops its unused loads of the param and ``exp_avg``):
        36 bytes per element for fp32 params."""
        total = super().bytes_per_step()
        for cache in self._caches.values():
            for seg in cache.segments.values():
                total += int(seg.numels.sum()) * seg.dtype.itemsize
                total += seg.key_numel("exp_avg_sq") * seg.flat["exp_avg_sq"].dtype.itemsize
        return total

    # --- the kernels' inputs ----------------------------------------------------------------------
    def _weight_decay(self, group) -> tuple[float, bool]:
        return 0.0, False  # in the math: the decay factor needs the clipped lr

    def _hyper(self, group) -> tuple[float, ...]:
        lr, weight_decay, eps = as_float(group["lr"]), as_float(group["weight_decay"]), as_float(group["eps"])
        if weight_decay == 0:
            return eps, 0.0, 1.0
        if group["decouple_lr"]:
            max_lr = as_float(group["max_lr"])
            return eps, weight_decay / max_lr, 1 - (lr / max_lr) * weight_decay
        return eps, weight_decay, 1 - lr * weight_decay

    def _options(self, group) -> tuple[bool, ...]:
        return (as_float(group["weight_decay"]) != 0,)

    def _host_step_scalars(self, group, launch, lr: float, weight_decay: float, decoupled: bool):
        """The group's debiased betas (computed once per group and step, in ``step()``) and each
        tensor's eps_sq: one tuple when the launch's eps_sq agree, else a per-tensor table."""
        step, scalars = self._group_scalars[id(group)]
        eps_sq = launch.seg.eps_sq[launch.rows]
        if np.all(eps_sq == eps_sq[0]):
            return (*scalars, float(eps_sq[0]))
        n = len(eps_sq)
        per_row = np.column_stack([np.tile(np.asarray(scalars, dtype=np.float64), (n, 1)), eps_sq])
        return step_table(per_row, lr, weight_decay, decoupled, np.full(n, step), launch.seg.device)

    # --- step -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None):
        """Perform a single optimization step; every group's step count advances, as in optimi.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
            grad_scale (Tensor, optional): AMP loss scale: grads are divided by it inside the kernels.
            found_inf (Tensor, optional): AMP: when nonzero the step is skipped, group step counts
                included (read on the host: the step counts are host values, as in optimi).
        """
        return self._step_with_group_counters(closure, grad_scale, found_inf, self._advance_group, self._commit_group)

    @staticmethod
    def _advance_group(group) -> tuple[tuple, int]:
        """((the step, the debiased betas' scalars), the step) of this step, as optimi computes them."""
        step = int(group["step"]) + 1 if group.get("setup") and "step" in group else 1
        beta1_hat = debias_beta(as_float(group["beta1"]), step)
        beta2_hat = debias_beta(as_float(group["beta2"]), step)
        return (step, (1 - beta1_hat, beta2_hat, 1 - beta2_hat)), step

    @staticmethod
    def _commit_group(group, step: int) -> None:
        """The group's step count advances with or without grads, as optimi's ``step.add_(1)``."""
        if step == 1:
            group["setup"] = True
            group["step"] = torch.tensor(0, dtype=torch.int32)
        group["step"].add_(1)
