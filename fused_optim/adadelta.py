"""Adadelta."""

from __future__ import annotations

import torch

from ._base import FusedOptimizer, _as_float, call_torch
from .kernels import adadelta_step

__all__ = ["Adadelta"]


class Adadelta(FusedOptimizer):
    r"""Adadelta, with the whole update in one Triton launch per parameter segment.

    Drop-in for :class:`torch.optim.Adadelta`. Per element, with :math:`g` the gradient (negated
    if ``maximize``) plus :math:`\lambda\theta`:

    .. math::
        v &\leftarrow \rho v + (1-\rho) g^2, \qquad
        \Delta = \frac{\sqrt{u + \epsilon}}{\sqrt{v + \epsilon}}\, g, \qquad
        u \leftarrow \rho u + (1-\rho) \Delta^2, \qquad \theta \leftarrow \theta - \gamma\Delta

    Args:
        params: iterable of parameters or named parameters, or of dicts defining param groups.
        lr (float, Tensor): :math:`\gamma`, scaling ``delta`` (default: 1.0).
        rho (float): :math:`\rho` (default: 0.9).
        eps (float): :math:`\epsilon` (default: 1e-6).
        weight_decay (float): :math:`\lambda` (default: 0).
        foreach: accepted for compatibility; the update is always fused.
        maximize (bool): maximize the objective (default: False).
        capturable, differentiable: ``True`` raises ``NotImplementedError``.
    """

    _torch_cls = torch.optim.Adadelta
    _sparse_error = "Adadelta does not support sparse gradients"

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        state_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "rho": rho,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "capturable": capturable,
            "foreach": foreach,
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
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("capturable", False)

    def _tensor_state_keys(self, group) -> tuple[str, ...]:
        return ("square_avg", "acc_delta")

    def _launch(self, group, launch, step_scalars) -> None:
        seg = launch.seg
        adadelta_step(
            launch.tables,
            seg.flat["square_avg"],
            seg.flat["acc_delta"],
            param_dtype=seg.dtype,
            lr=self._lr(group, launch),
            rho=_as_float(group["rho"]),
            eps=_as_float(group["eps"]),
            weight_decay=_as_float(group["weight_decay"]),
            maximize=bool(group["maximize"]),
            features=launch.features,
            num_warps=self._num_warps,
        )

    def _reference(self, group, params, grads, states, fresh) -> None:
        from torch.optim.adadelta import adadelta

        call_torch(
            adadelta,
            params,
            grads,
            [s["square_avg"] for s in states],
            [s["acc_delta"] for s in states],
            [s["step"] for s in states],
            foreach=False,
            has_complex=any(torch.is_complex(p) for p in params),
            lr=group["lr"],
            rho=group["rho"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
        )
