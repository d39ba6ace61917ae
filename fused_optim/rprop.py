"""Rprop."""

from __future__ import annotations

import torch

from ._base import FusedOptimizer
from ._segments import as_float
from .kernels import RPROP

__all__ = ["Rprop"]


class Rprop(FusedOptimizer):
    r"""Rprop (resilient backpropagation), with the whole update in one Triton launch per segment.

    Drop-in for :class:`torch.optim.Rprop`. Per element, with :math:`g` the gradient (negated if
    ``maximize``) and :math:`g'` the previous one: the step size :math:`s` (starting at ``lr``)
    grows by :math:`\eta_+` where :math:`g g' > 0`, shrinks by :math:`\eta_-` where
    :math:`g g' < 0` (and :math:`g` then counts as 0), and stays elsewhere, clamped to
    :math:`[s_{min}, s_{max}]`; then :math:`\theta \leftarrow \theta - \mathrm{sign}(g)\, s`.

    Args:
        lr (float, Tensor): initial step size (default: 1e-2).
        etas (tuple[float, float]): :math:`(\eta_-, \eta_+)` (default: (0.5, 1.2)).
        step_sizes (tuple[float, float]): :math:`(s_{min}, s_{max})` (default: (1e-6, 50)).
        params, maximize, foreach, capturable, differentiable, and fused_optim's own options:
            see :class:`~fused_optim.FusedOptimizer`.
    """

    _torch_cls = torch.optim.Rprop
    _algorithm = RPROP

    def __init__(
        self, params, lr: float | torch.Tensor = 1e-2, etas: tuple[float, float] = (0.5, 1.2),
        step_sizes: tuple[float, float] = (1e-6, 50), *, capturable: bool = False, foreach: bool | None = None,
        maximize: bool = False, differentiable: bool = False, **extensions,
    ) -> None:  # fmt: skip
        super().__init__(params, locals())

    def _init_region(self, group, key, region, param) -> None:
        # torch: prev zeros; step_size full of the group's lr when the state is made (both parts of
        # a complex value: here, every element of its real view)
        region.fill_(as_float(group["lr"]) if key == "step_size" else 0.0)

    def _hyper(self, group) -> tuple[float, ...]:
        etaminus, etaplus = (as_float(e) for e in group["etas"])
        step_min, step_max = (as_float(s) for s in group["step_sizes"])
        return (etaminus, etaplus, step_min, step_max)
