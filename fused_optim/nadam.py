"""NAdam: Adam with Nesterov momentum and momentum decay."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from ._base import FusedOptimizer, _as_float, call_torch
from .kernels import nadam_step

__all__ = ["NAdam"]


def _mu(beta1: float, step, momentum_decay: float):
    """Momentum coefficient at ``step`` (a float or a numpy array), as torch computes it."""
    return beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))


class NAdam(FusedOptimizer):
    r"""NAdam, with the whole update in one Triton launch per parameter segment.

    Drop-in for :class:`torch.optim.NAdam`, including its ``mu_product`` state. Per element, with
    :math:`g` the gradient (negated if ``maximize``), decay as in :class:`Adam`, and
    :math:`\mu_t = \beta_1 (1 - \tfrac12 0.96^{t\psi})`, :math:`\Pi_t = \prod_{i \le t} \mu_i`:

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2,
        \qquad d = \sqrt{v / (1 - \beta_2^t)} + \epsilon \\
        \theta &\leftarrow \theta - \gamma\frac{1 - \mu_t}{1 - \Pi_t}\frac{g}{d}
            - \gamma\frac{\mu_{t+1}}{1 - \Pi_t \mu_{t+1}}\frac{m}{d}

    Args:
        params: iterable of parameters or named parameters, or of dicts defining param groups.
        lr (float, Tensor): learning rate :math:`\gamma` (default: 2e-3).
        betas (tuple[float, float]): :math:`(\beta_1, \beta_2)` (default: (0.9, 0.999)).
        eps (float): :math:`\epsilon` (default: 1e-8).
        weight_decay (float): :math:`\lambda` (default: 0).
        momentum_decay (float): :math:`\psi` (default: 4e-3).
        decoupled_weight_decay (bool): decay the parameter directly, as AdamW (default: False).
        foreach: accepted for compatibility; the update is always fused.
        maximize (bool): maximize the objective (default: False).
        capturable, differentiable: ``True`` raises ``NotImplementedError``.
    """

    _torch_cls = torch.optim.NAdam
    _scalar_state: ClassVar[dict[str, float]] = {"step": 0.0, "mu_product": 1.0}
    _n_step_scalars = 3
    _sparse_error = "NAdam does not support sparse gradients"

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        state_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "momentum_decay": momentum_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
        }
        super().__init__(
            params,
            defaults,
            master_weights=master_weights,
            stochastic_rounding=stochastic_rounding,
            state_dtype=state_dtype,
            max_grad_norm=max_grad_norm,
        )

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("decoupled_weight_decay", False)

    def _tensor_state_keys(self, group) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _advance_scalars(self, group, scalars: dict[str, np.ndarray]) -> None:
        scalars["step"] += 1
        mu = _mu(_as_float(group["betas"][0]), scalars["step"].astype(np.float64), group["momentum_decay"])
        scalars["mu_product"] *= mu.astype(scalars["mu_product"].dtype)  # mu_product *= mu, in its dtype

    def _device_advance_args(self, group) -> dict:
        return {"beta1": _as_float(group["betas"][0]), "momentum_decay": _as_float(group["momentum_decay"])}

    def _step_scalars(self, group, scalars) -> tuple[float, float, float]:
        step, mu_product = scalars["step"], scalars["mu_product"]
        lr = _as_float(group["lr"])
        beta1, beta2 = (_as_float(b) for b in group["betas"])
        mu = _mu(beta1, step, group["momentum_decay"])
        mu_next = _mu(beta1, step + 1, group["momentum_decay"])
        bias_correction2 = 1 - beta2**step
        grad_coef = -lr * (1.0 - mu) / (1.0 - mu_product)
        avg_coef = (-lr * mu_next) / (1.0 - mu_product * mu_next)
        return (bias_correction2, grad_coef, avg_coef)

    def _launch(self, group, launch, step_scalars) -> None:
        seg = launch.seg
        beta1, beta2 = group["betas"]
        nadam_step(
            launch.tables,
            seg.flat["exp_avg"],
            seg.flat["exp_avg_sq"],
            param_dtype=seg.dtype,
            lr=self._lr(group, launch),
            beta1=_as_float(beta1),
            beta2=_as_float(beta2),
            eps=_as_float(group["eps"]),
            weight_decay=_as_float(group["weight_decay"]),
            decoupled=bool(group["decoupled_weight_decay"]),
            maximize=bool(group["maximize"]),
            momentum_decay=_as_float(group["momentum_decay"]),
            step_scalars=step_scalars,
            features=launch.features,
            mu_product=seg.scalars["mu_product"] if launch.features.steps is not None else None,
            num_warps=self._num_warps,
        )

    def _reference(self, group, params, grads, states, fresh) -> None:
        from torch.optim.nadam import nadam

        beta1, beta2 = group["betas"]
        call_torch(
            nadam,
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["mu_product"] for s in states],
            [s["step"] for s in states],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            foreach=False,
            has_complex=any(torch.is_complex(p) for p in params),
            maximize=group["maximize"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            momentum_decay=group["momentum_decay"],
            eps=group["eps"],
        )
