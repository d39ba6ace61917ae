"""Adamax: Adam with the infinity norm."""

from __future__ import annotations

import torch

from ._base import FusedOptimizer
from ._segments import as_float
from .kernels import ADAMAX

__all__ = ["Adamax"]


class Adamax(FusedOptimizer):
    r"""Adamax, with the whole update in one Triton launch per parameter segment.

    Drop-in for :class:`torch.optim.Adamax`. Per element, with :math:`g` the gradient (negated if
    ``maximize``) plus :math:`\lambda\theta`:

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g, \qquad u \leftarrow \max(\beta_2 u, |g| + \epsilon),
        \qquad \theta \leftarrow \theta - \frac{\gamma}{1 - \beta_1^t}\,\frac{m}{u}

    Args:
        lr (float, Tensor): learning rate :math:`\gamma` (default: 2e-3).
        betas (tuple[float, float]): :math:`(\beta_1, \beta_2)` (default: (0.9, 0.999)).
        eps (float): :math:`\epsilon` (default: 1e-8).
        weight_decay (float): :math:`\lambda` (default: 0).
        params, maximize, foreach, fused, capturable, differentiable, and fused_optim's own options:
            see :class:`~fused_optim.FusedOptimizer`.
    """

    _torch_cls = torch.optim.Adamax
    _algorithm = ADAMAX

    def __init__(
        self, params, lr: float | torch.Tensor = 2e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 0, foreach: bool | None = None, *, maximize: bool = False, differentiable: bool = False,
        capturable: bool = False, **extensions,
    ) -> None:  # fmt: skip
        super().__init__(params, locals())

    def _step_scalars(self, group, scalars) -> tuple[float]:
        bias_correction = 1 - as_float(group["betas"][0]) ** scalars["step"]
        clr = as_float(group["lr"]) / bias_correction
        return (-clr,)

    def _hyper(self, group) -> tuple[float, ...]:
        beta1, beta2 = (as_float(b) for b in group["betas"])
        return (1.0 - beta1, beta2, as_float(group["eps"]), beta1)
