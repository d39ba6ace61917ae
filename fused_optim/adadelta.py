"""Adadelta."""

from __future__ import annotations

import torch

from ._base import FusedOptimizer
from ._segments import as_float
from .kernels import ADADELTA

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
        capturable (bool): step counts and step scalars on the device (default: False).
        differentiable: ``True`` raises ``NotImplementedError``.
    """

    _torch_cls = torch.optim.Adadelta
    _algorithm = ADADELTA
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
        super().__init__(params, locals())

    def _hyper(self, group) -> tuple[float, ...]:
        rho = as_float(group["rho"])
        return (rho, 1.0 - rho, as_float(group["eps"]))
