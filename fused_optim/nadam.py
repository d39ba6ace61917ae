"""NAdam: Adam with Nesterov momentum and momentum decay."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from ._base import FusedOptimizer
from ._segments import as_float
from .kernels import NADAM

__all__ = ["NAdam"]


def _mu(beta1: float, step, momentum_decay: float):
    """Momentum coefficient at ``step`` (a float or a numpy array), as torch computes it."""
    return beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))


class NAdam(FusedOptimizer):
    r"""NAdam, with the whole update in one Triton launch per parameter segment.

    Drop-in for :class:`torch.optim.NAdam`, including its ``mu_product`` state. Per element, with
    :math:`g` the gradient (negated if ``maximize``), decay as in :class:`Adam`, and
    :math:`\mu_t = \beta_1 (1 - \tfrac12 0.96^{t\psi})`, :math:`\Pi_t = \prod_{i \le t} \mu_i`:

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2,
        \qquad d = \sqrt{v / (1 - \beta_2^t)} + \epsilon \\
        \theta &\leftarrow \theta - \gamma\frac{1 - \mu_t}{1 - \Pi_t}\frac{g}{d}
            - \gamma\frac{\mu_{t+1}}{1 - \Pi_t \mu_{t+1}}\frac{m}{d}

    Args:
        lr (float, Tensor): learning rate :math:`\gamma` (default: 2e-3).
        betas (tuple[float, float]): :math:`(\beta_1, \beta_2)` (default: (0.9, 0.999)).
        eps (float): :math:`\epsilon` (default: 1e-8).
        weight_decay (float): :math:`\lambda` (default: 0).
        momentum_decay (float): :math:`\psi` (default: 4e-3).
        decoupled_weight_decay (bool): decay the parameter directly, as AdamW (default: False).
        params, maximize, foreach, fused, capturable, differentiable, and fused_optim's own options:
            see :class:`~fused_optim.FusedOptimizer`.
    """

    _torch_cls = torch.optim.NAdam
    _algorithm = NADAM
    _scalar_state: ClassVar[dict[str, float]] = {"step": 0.0, "mu_product": 1.0}

    def __init__(
        self, params, lr: float | torch.Tensor = 2e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 0, momentum_decay: float = 4e-3, decoupled_weight_decay: bool = False, *,
        foreach: bool | None = None, maximize: bool = False, capturable: bool = False, differentiable: bool = False,
        **extensions,
    ) -> None:  # fmt: skip
        super().__init__(params, locals())

    def _advance_scalars(self, group, scalars: dict[str, np.ndarray]) -> None:
        scalars["step"] += 1
        mu = _mu(as_float(group["betas"][0]), scalars["step"].astype(np.float64), as_float(group["momentum_decay"]))
        scalars["mu_product"] *= mu.astype(scalars["mu_product"].dtype)  # mu_product *= mu, in its dtype

    def _step_scalars(self, group, scalars) -> tuple[float, float, float]:
        step, mu_product = scalars["step"], scalars["mu_product"]
        lr = as_float(group["lr"])
        beta1, beta2 = (as_float(b) for b in group["betas"])
        mu = _mu(beta1, step, as_float(group["momentum_decay"]))
        mu_next = _mu(beta1, step + 1, as_float(group["momentum_decay"]))
        bias_correction2 = 1 - beta2**step
        grad_coef = -lr * (1.0 - mu) / (1.0 - mu_product)
        avg_coef = (-lr * mu_next) / (1.0 - mu_product * mu_next)
        return (bias_correction2, grad_coef, avg_coef)

    def _hyper(self, group) -> tuple[float, ...]:
        beta1, beta2 = (as_float(b) for b in group["betas"])
        return (1.0 - beta1, beta2, 1.0 - beta2, as_float(group["eps"]), beta1, as_float(group["momentum_decay"]))
