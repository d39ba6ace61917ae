"""SGD, with momentum, dampening and Nesterov momentum."""

from __future__ import annotations

from typing import ClassVar

import torch

from ._base import FusedOptimizer
from ._segments import as_float
from .kernels import SGD as _SGD

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
        lr (float, Tensor): learning rate :math:`\gamma` (default: 1e-3).
        momentum (float): :math:`\mu` (default: 0).
        dampening (float): :math:`\tau` (default: 0).
        weight_decay (float, Tensor): :math:`\lambda` (default: 0).
        nesterov (bool): Nesterov momentum (default: False).
        params, maximize, foreach, fused, capturable, differentiable, and fused_optim's own options:
            see :class:`~fused_optim.FusedOptimizer`.

    Sparse gradients are supported and run through torch.optim's own implementation.
    """

    _torch_cls = torch.optim.SGD
    _algorithm = _SGD
    _scalar_state: ClassVar[dict[str, float]] = {}  # no step counter, as in torch
    _sparse_ok = True

    def __init__(
        self, params, lr: float | torch.Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
        weight_decay: float | torch.Tensor = 0, nesterov: bool = False, *, maximize: bool = False,
        foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None, **extensions,
    ) -> None:  # fmt: skip
        super().__init__(params, locals())

    def _tensor_state_keys(self, group) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _fresh_keys(self, group) -> tuple[str, ...]:
        return ("momentum_buffer",)  # torch starts the buffer as a copy of the first grad

    def _check_sparse(self, group, grads) -> None:
        # torch fails on grad.add(param) for a sparse grad, and with Nesterov momentum on
        # grad.add(buf) for a sparse grad whose buffer is dense (it had dense grads before), after
        # updating the params before it
        buffers = [self.state.get(p, {}).get("momentum_buffer") for p in group["params"]]
        nesterov = group["nesterov"] and group["momentum"] != 0
        if group["weight_decay"] != 0 or (
            nesterov
            and any(g is not None and g.is_sparse and b is not None and not b.is_sparse for g, b in zip(grads, buffers))
        ):
            raise RuntimeError("add(sparse, dense) is not supported. Use add(dense, sparse) instead.")

    def _hyper(self, group) -> tuple[float, ...]:
        return (as_float(group["momentum"]), 1.0 - as_float(group["dampening"]))

    def _options(self, group) -> tuple[bool, ...]:
        return (group["momentum"] != 0, bool(group["nesterov"]))
