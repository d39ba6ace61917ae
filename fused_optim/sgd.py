"""SGD, with momentum, dampening and Nesterov momentum."""

from __future__ import annotations

from typing import ClassVar

import torch

from ._base import FusedOptimizer, _as_float, call_torch
from .kernels import sgd_step

__all__ = ["SGD"]


class SGD(FusedOptimizer):
    r"""Stochastic gradient descent, optionally with momentum, in one Triton launch per segment.

    Drop-in for :class:`torch.optim.SGD`. Per element, with :math:`g` the gradient (negated if
    ``maximize``) plus :math:`\lambda\theta`:

    .. math::
        b &\leftarrow g \text{ (first step)}, \quad b \leftarrow \mu b + (1 - \tau) g \text{ (later)} \\
        \theta &\leftarrow \theta - \gamma\,(g + \mu b \text{ if nesterov else } b)
        \quad (\theta - \gamma g \text{ without momentum})

    Args:
        params: iterable of parameters or named parameters, or of dicts defining param groups.
        lr (float, Tensor): learning rate :math:`\gamma` (default: 1e-3).
        momentum (float): :math:`\mu` (default: 0).
        dampening (float): :math:`\tau` (default: 0).
        weight_decay (float, Tensor): :math:`\lambda` (default: 0).
        nesterov (bool): Nesterov momentum (default: False).
        maximize (bool): maximize the objective (default: False).
        foreach, fused: accepted for compatibility; the update is always fused.
        differentiable: ``True`` raises ``NotImplementedError``.

    Sparse gradients are supported and run through torch.optim's own implementation.
    """

    _torch_cls = torch.optim.SGD
    _scalar_state: ClassVar[dict[str, float]] = {}  # no step counter, as in torch
    _sparse_ok = True

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | torch.Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        state_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
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
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    def _tensor_state_keys(self, group) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _fresh_keys(self, group) -> tuple[str, ...]:
        return ("momentum_buffer",)  # torch starts the buffer as a copy of the first grad

    def _check_sparse(self, group) -> None:
        # torch fails on grad.add(param) for a sparse grad, after updating the params before it
        if group["weight_decay"] != 0:
            raise RuntimeError("add(sparse, dense) is not supported. Use add(dense, sparse) instead.")

    def _launch(self, group, launch, step_scalars) -> None:
        seg = launch.seg
        sgd_step(
            launch.tables,
            seg.flat.get("momentum_buffer"),
            param_dtype=seg.dtype,
            lr=self._lr(group, launch),
            weight_decay=_as_float(group["weight_decay"]),
            momentum=_as_float(group["momentum"]),
            dampening=_as_float(group["dampening"]),
            nesterov=bool(group["nesterov"]),
            maximize=bool(group["maximize"]),
            features=launch.features,
            num_warps=self._num_warps,
        )

    def _reference(self, group, params, grads, states, fresh) -> None:
        from torch.optim.sgd import sgd

        momentum = group["momentum"]
        buffers = [None if momentum == 0 or new else s.get("momentum_buffer") for s, new in zip(states, fresh)]
        call_torch(
            sgd,
            params,
            grads,
            buffers,
            has_sparse_grad=any(g.is_sparse for g in grads),
            foreach=False,
            fused=False,
            weight_decay=group["weight_decay"],
            momentum=momentum,
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        if momentum != 0:
            for state, new, buf in zip(states, fresh, buffers):
                if new:  # our flat-buffer view takes the first value
                    state["momentum_buffer"].copy_(buf)
                elif state.get("momentum_buffer") is not buf:  # torch's own tensor (sparse grads)
                    dict.__setitem__(state, "momentum_buffer", buf)
