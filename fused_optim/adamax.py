"""Adamax: Adam with the infinity norm."""

from __future__ import annotations

import torch

from ._base import FusedOptimizer, _as_float, call_torch
from .kernels import adamax_step

__all__ = ["Adamax"]


class Adamax(FusedOptimizer):
    r"""Adamax, with the whole update in one Triton launch per parameter segment.

    Drop-in for :class:`torch.optim.Adamax`. Per element, with :math:`g` the gradient (negated if
    ``maximize``) plus :math:`\lambda\theta`:

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g, \qquad u \leftarrow \max(\beta_2 u, |g| + \epsilon),
        \qquad \theta \leftarrow \theta - \frac{\gamma}{1 - \beta_1^t}\,\frac{m}{u}

    Args:
        params: iterable of parameters or named parameters, or of dicts defining param groups.
        lr (float, Tensor): learning rate :math:`\gamma` (default: 2e-3).
        betas (tuple[float, float]): :math:`(\beta_1, \beta_2)` (default: (0.9, 0.999)).
        eps (float): :math:`\epsilon` (default: 1e-8).
        weight_decay (float): :math:`\lambda` (default: 0).
        foreach: accepted for compatibility; the update is always fused.
        maximize (bool): maximize the objective (default: False).
        capturable, differentiable: ``True`` raises ``NotImplementedError``.
    """

    _torch_cls = torch.optim.Adamax
    _n_step_scalars = 1
    _sparse_error = "Adamax does not support sparse gradients"

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
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
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
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
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("capturable", False)

    def _tensor_state_keys(self, group) -> tuple[str, ...]:
        return ("exp_avg", "exp_inf")

    def _step_scalars(self, group, scalars) -> tuple[float]:
        bias_correction = 1 - _as_float(group["betas"][0]) ** scalars["step"]
        clr = _as_float(group["lr"]) / bias_correction
        return (-clr,)

    def _launch(self, group, launch, step_scalars) -> None:
        seg = launch.seg
        beta1, beta2 = group["betas"]
        adamax_step(
            launch.tables,
            seg.flat["exp_avg"],
            seg.flat["exp_inf"],
            param_dtype=seg.dtype,
            beta1=_as_float(beta1),
            beta2=_as_float(beta2),
            eps=_as_float(group["eps"]),
            weight_decay=_as_float(group["weight_decay"]),
            maximize=bool(group["maximize"]),
            lr=self._lr(group, launch),
            step_scalars=step_scalars,
            features=launch.features,
            num_warps=self._num_warps,
        )

    def _reference(self, group, params, grads, states, fresh) -> None:
        from torch.optim.adamax import adamax

        beta1, beta2 = group["betas"]
        call_torch(
            adamax,
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_inf"] for s in states],
            [s["step"] for s in states],
            foreach=False,
            maximize=group["maximize"],
            has_complex=any(torch.is_complex(p) for p in params),
            eps=group["eps"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
        )
