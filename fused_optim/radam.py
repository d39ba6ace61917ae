"""RAdam: Adam with variance rectification."""

from __future__ import annotations

import torch

from ._base import FusedOptimizer
from ._segments import as_float
from .kernels import RADAM

__all__ = ["RAdam"]


class RAdam(FusedOptimizer):
    r"""RAdam, with the whole update in one Triton launch per parameter segment.

    Drop-in for :class:`torch.optim.RAdam`. Per element, with :math:`g` the gradient (negated if
    ``maximize``), decay as in :class:`Adam`, :math:`\rho_\infty = 2/(1-\beta_2) - 1` and
    :math:`\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)`:

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2,
        \qquad \hat m = m / (1 - \beta_1^t) \\
        \theta &\leftarrow \theta - \gamma \hat m\, r_t \frac{\sqrt{1-\beta_2^t}}{\sqrt v + \epsilon}
            \text{ if } \rho_t > 5, \text{ else } \theta - \gamma \hat m, \qquad
        r_t = \sqrt{\tfrac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}

    Args:
        lr (float, Tensor): learning rate :math:`\gamma` (default: 1e-3).
        betas (tuple[float, float]): :math:`(\beta_1, \beta_2)` (default: (0.9, 0.999)).
        eps (float): :math:`\epsilon` (default: 1e-8).
        weight_decay (float): :math:`\lambda` (default: 0).
        decoupled_weight_decay (bool): decay the parameter directly, as AdamW (default: False).
        params, maximize, foreach, fused, capturable, differentiable, and fused_optim's own options:
            see :class:`~fused_optim.FusedOptimizer`.
    """

    _torch_cls = torch.optim.RAdam
    _algorithm = RADAM

    def __init__(
        self, params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 0, decoupled_weight_decay: bool = False, *, foreach: bool | None = None,
        maximize: bool = False, capturable: bool = False, differentiable: bool = False, **extensions,
    ) -> None:  # fmt: skip
        super().__init__(params, locals())

    def _step_scalars(self, group, scalars) -> tuple[float, float, float, float]:
        step = scalars["step"]
        beta1, beta2 = (as_float(b) for b in group["betas"])
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        rho_inf = 2 / (1 - beta2) - 1  # maximum length of the approximated SMA
        rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
        if rho_t > 5.0:  # the variance is tractable: rectified adaptive step
            rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
            return (bias_correction1, bias_correction2**0.5, rect, 1.0)
        return (bias_correction1, 1.0, 1.0, 0.0)  # plain momentum step

    def _hyper(self, group) -> tuple[float, ...]:
        beta1, beta2 = (as_float(b) for b in group["betas"])
        return (1.0 - beta1, beta2, 1.0 - beta2, as_float(group["eps"]), beta1)
