"""RMSprop, plain, centered and with momentum."""

from __future__ import annotations

import torch

from ._base import FusedOptimizer
from ._segments import as_float
from .kernels import RMSPROP

__all__ = ["RMSprop"]


class RMSprop(FusedOptimizer):
    r"""RMSprop, with the whole update in one Triton launch per parameter segment.

    Drop-in for :class:`torch.optim.RMSprop`. Per element, with :math:`g` the gradient (negated if
    ``maximize``) plus :math:`\lambda\theta`:

    .. math::
        v &\leftarrow \alpha v + (1-\alpha) g^2, \qquad
        \bar g \leftarrow \alpha \bar g + (1 - \alpha) g \text{ (centered)}, \qquad
        d = \sqrt{v - \bar g^2 \text{ (centered)}} + \epsilon \\
        b &\leftarrow \mu b + g / d, \quad \theta \leftarrow \theta - \gamma b
        \quad (\theta \leftarrow \theta - \gamma g / d \text{ without momentum})

    Args:
        lr (float, Tensor): learning rate :math:`\gamma` (default: 1e-2).
        alpha (float): smoothing constant :math:`\alpha` (default: 0.99).
        eps (float): :math:`\epsilon` (default: 1e-8).
        weight_decay (float): :math:`\lambda` (default: 0).
        momentum (float): :math:`\mu` (default: 0).
        centered (bool): normalize by the estimated variance of the gradient (default: False).
        params, maximize, foreach, fused, capturable, differentiable, and fused_optim's own options:
            see :class:`~fused_optim.FusedOptimizer`.
    """

    _torch_cls = torch.optim.RMSprop
    _algorithm = RMSPROP

    def __init__(
        self, params, lr: float | torch.Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0,
        momentum: float = 0, centered: bool = False, capturable: bool = False, foreach: bool | None = None,
        maximize: bool = False, differentiable: bool = False, **extensions,
    ) -> None:  # fmt: skip
        super().__init__(params, locals())

    def _tensor_state_keys(self, group) -> tuple[str, ...]:
        keys = ("square_avg",)
        if group["momentum"] > 0:
            keys += ("momentum_buffer",)
        if group["centered"]:
            keys += ("grad_avg",)
        return keys

    def _hyper(self, group) -> tuple[float, ...]:
        alpha = as_float(group["alpha"])
        return (alpha, 1.0 - alpha, as_float(group["eps"]), as_float(group["momentum"]))

    def _options(self, group) -> tuple[bool, ...]:
        return (group["momentum"] > 0, bool(group["centered"]))
