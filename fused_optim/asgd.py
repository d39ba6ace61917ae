"""ASGD."""

from __future__ import annotations

from typing import ClassVar

import torch

from ._base import FusedOptimizer
from ._segments import as_float
from .kernels import ASGD as _ASGD

__all__ = ["ASGD"]


class ASGD(FusedOptimizer):
    r"""Averaged SGD, with the whole update in one Triton launch per parameter segment.

    Drop-in for :class:`torch.optim.ASGD`. Per element, with :math:`g` the gradient (negated if
    ``maximize``) plus :math:`\lambda_{wd}\theta`, and the per-parameter :math:`\eta, \mu` of the
    previous step (:math:`\eta` starts at ``lr``, :math:`\mu` at 1):

    .. math::
        \theta \leftarrow \theta (1 - \lambda\eta) - \eta g, \qquad
        a \leftarrow a + \mu(\theta - a), \qquad
        \eta \leftarrow \frac{\gamma}{(1 + \lambda\gamma t)^\alpha}, \qquad
        \mu \leftarrow \frac{1}{\max(1, t - t_0)}

    Args:
        lr (float, Tensor): learning rate :math:`\gamma` (default: 1e-2).
        lambd (float): decay term :math:`\lambda` (default: 1e-4).
        alpha (float): power for the eta update :math:`\alpha` (default: 0.75).
        t0 (float): point at which to start averaging :math:`t_0` (default: 1e6).
        weight_decay (float): :math:`\lambda_{wd}` (default: 0).
        params, maximize, foreach, capturable, differentiable, and fused_optim's own options:
            see :class:`~fused_optim.FusedOptimizer`.
    """

    _torch_cls = torch.optim.ASGD
    _algorithm = _ASGD
    _scalar_state: ClassVar[dict[str, float]] = {"step": 0.0, "eta": 0.0, "mu": 1.0}  # eta starts at lr

    def __init__(
        self, params, lr: float | torch.Tensor = 1e-2, lambd: float = 1e-4, alpha: float = 0.75, t0: float = 1e6,
        weight_decay: float = 0, foreach: bool | None = None, maximize: bool = False, differentiable: bool = False,
        capturable: bool = False, **extensions,
    ) -> None:  # fmt: skip
        super().__init__(params, locals())

    def _device_steps(self, group) -> bool:
        # torch keeps step, eta and mu on the param's device (and reads eta and mu back on the host
        # every step); here the advance kernel updates them there, with the arithmetic of torch's
        # non-capturable path (kernels/asgd.py), so there is no host path
        return True

    def _initial_scalars(self, group) -> dict[str, float]:
        return {**self._scalar_state, "eta": as_float(group["lr"])}

    def _hyper(self, group) -> tuple[float, ...]:
        return tuple(as_float(group[k]) for k in ("lambd", "alpha", "t0"))
