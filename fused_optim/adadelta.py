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
        lr (float, Tensor): :math:`\gamma`, scaling ``delta`` (default: 1.0).
        rho (float): :math:`\rho` (default: 0.9).
        eps (float): :math:`\epsilon` (default: 1e-6).
        weight_decay (float): :math:`\lambda` (default: 0).
        params, maximize, foreach, fused, capturable, differentiable, and fused_optim's own options:
            see :class:`~fused_optim.FusedOptimizer`.
    """

    _torch_cls = torch.optim.Adadelta
    _algorithm = ADADELTA

    def __init__(
        self, params, lr: float | torch.Tensor = 1.0, rho: float = 0.9, eps: float = 1e-6, weight_decay: float = 0,
        foreach: bool | None = None, *, capturable: bool = False, maximize: bool = False, differentiable: bool = False,
        **extensions,
    ) -> None:  # fmt: skip
        super().__init__(params, locals())

    def _hyper(self, group) -> tuple[float, ...]:
        rho = as_float(group["rho"])
        return (rho, 1.0 - rho, as_float(group["eps"]))
