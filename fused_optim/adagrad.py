"""Adagrad."""

from __future__ import annotations

import torch

from ._base import FusedOptimizer
from ._segments import as_float
from .kernels import ADAGRAD

__all__ = ["Adagrad"]


class Adagrad(FusedOptimizer):
    r"""Adagrad, with the whole update in one Triton launch per parameter segment.

    Drop-in for :class:`torch.optim.Adagrad` (state is created at construction, as torch does).
    Per element, with :math:`g` the gradient (negated if ``maximize``) plus :math:`\lambda\theta`:

    .. math::
        s \leftarrow s + g^2, \qquad
        \theta \leftarrow \theta - \frac{\gamma}{1 + (t - 1)\eta}\,\frac{g}{\sqrt{s} + \epsilon}

    Args:
        lr (float, Tensor): learning rate :math:`\gamma` (default: 1e-2).
        lr_decay (float): :math:`\eta` (default: 0).
        weight_decay (float): :math:`\lambda` (default: 0).
        initial_accumulator_value (float): initial value of :math:`s` (default: 0).
        eps (float): term added to the denominator (default: 1e-10).
        params, maximize, foreach, fused, capturable, differentiable, and fused_optim's own options:
            see :class:`~fused_optim.FusedOptimizer`.

    Sparse gradients are supported and run through torch.optim's own implementation.
    """

    _torch_cls = torch.optim.Adagrad
    _algorithm = ADAGRAD
    _sparse_ok = True
    _eager_state = True

    def __init__(
        self, params, lr: float | torch.Tensor = 1e-2, lr_decay: float = 0, weight_decay: float = 0,
        initial_accumulator_value: float = 0, eps: float = 1e-10, foreach: bool | None = None, *,
        maximize: bool = False, differentiable: bool = False, fused: bool | None = None, **extensions,
    ) -> None:  # fmt: skip
        super().__init__(params, locals())

    def share_memory(self) -> None:
        """Calls ``share_memory_()`` on the state sums (their flat buffers), as torch.optim does."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"].share_memory_()

    def _init_region(self, group, key, region, param) -> None:
        # torch fills every sum with the constructor's value, whatever a group says (both parts of
        # a complex value: here, every element of its real view).
        region.fill_(self.defaults["initial_accumulator_value"])

    def _check_sparse(self, group, grads) -> None:
        if group["weight_decay"] != 0:
            raise RuntimeError("weight_decay option is not compatible with sparse gradients")

    def _step_scalars(self, group, scalars) -> tuple[float]:
        step = scalars["step"]
        clr = as_float(group["lr"]) / (1 + (step - 1) * group["lr_decay"])
        return (-clr,)

    def _hyper(self, group) -> tuple[float, ...]:
        return (as_float(group["eps"]), as_float(group["lr_decay"]))
