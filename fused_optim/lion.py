"""Lion: the sign of an interpolated momentum (no torch.optim counterpart; as ``lion_pytorch.Lion``)."""

from __future__ import annotations

from typing import ClassVar

import torch

from ._base import FusedOptimizer
from ._segments import as_float
from .kernels.lion import LION

__all__ = ["Lion"]


def check(name: str, value, ok: bool, what: str) -> None:
    """Raise ``ValueError`` for a bad argument (classes without a torch.optim counterpart)."""
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} ({what})")


def check_lr(lr, *, positive: bool = False) -> None:
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    value = as_float(lr)
    if positive:
        check("learning rate", value, value > 0.0, "must be > 0")
    else:
        check("learning rate", value, value >= 0.0, "must be >= 0")


def keep_own_group_keys(optimizer: FusedOptimizer, state_dict: dict) -> dict:
    """``state_dict`` with each saved param group completed by the live group's entries it lacks.
    The reference packages keep some options outside their param groups (lion_pytorch's
    ``decoupled_weight_decay``, pytorch_optimizer's ``maximize``), so their checkpoints do not carry
    them: loading one keeps this optimizer's settings (torch would fill in the constructor defaults)."""
    saved = state_dict.get("param_groups")
    if not isinstance(saved, list) or len(saved) != len(optimizer.param_groups):
        return state_dict  # torch raises its own error
    groups = [
        {**{k: v for k, v in live.items() if k not in group and k != "params"}, **group}
        for live, group in zip(optimizer.param_groups, saved)
    ]
    return {**state_dict, "param_groups": groups}


def refuse_complex(name: str, group, grads, why: str) -> None:
    for i, (p, g) in enumerate(zip(group["params"], grads)):
        if g is not None and p.is_complex():
            raise NotImplementedError(f"fused_optim.{name} does not take complex parameters (parameter {i}): {why}")


class Lion(FusedOptimizer):
    r"""Lion (Chen et al., 2023), with the whole update in one Triton launch per parameter segment.

    Drop-in for ``lion_pytorch.Lion`` (same arguments, defaults, state and ``state_dict``; its
    arithmetic, so results are equal on CPU). Per element, with :math:`g` the gradient:

    .. math::
        \theta &\leftarrow \theta (1 - \gamma\lambda'), \qquad
            \lambda' = \lambda \text{, or } \lambda / \gamma_0 \text{ with decoupled\_weight\_decay} \\
        \theta &\leftarrow \theta - \gamma\,\operatorname{sign}(\beta_1 m + (1 - \beta_1) g), \qquad
        m \leftarrow \beta_2 m + (1 - \beta_2) g

    Args:
        lr (float, Tensor): learning rate :math:`\gamma` (default: 1e-4); must be > 0.
        betas (tuple[float, float]): :math:`(\beta_1, \beta_2)`, each in [0, 1] (default: (0.9, 0.99)).
        weight_decay (float): :math:`\lambda`, applied as a factor on the param (default: 0).
        use_triton (bool): accepted for compatibility, changes nothing (the update is always one
            fused launch per segment).
        decoupled_weight_decay (bool): divide the weight decay by the constructor's lr
            :math:`\gamma_0`, so that the decay per step is :math:`\lambda\gamma/\gamma_0`
            (default: False).
        params, and fused_optim's own options: see :class:`~fused_optim.FusedOptimizer`.

    ``state[p]`` holds ``exp_avg``, zeros from a param's first step with a grad; no step count.
    Complex params raise ``NotImplementedError`` (lion_pytorch takes the complex sign
    :math:`z / |z|`, which is not an element-wise function of the real and imaginary parts).
    """

    _torch_cls = None
    _algorithm = LION
    _scalar_state: ClassVar[dict[str, float]] = {}  # no step count, as lion_pytorch

    def __init__(
        self, params, lr: float | torch.Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0, use_triton: bool = False, decoupled_weight_decay: bool = False, **extensions,
    ) -> None:  # fmt: skip
        super().__init__(params, locals())

    def _check_arguments(self, defaults: dict) -> None:
        check_lr(defaults["lr"], positive=True)  # lion_pytorch asserts lr > 0 (it divides by it)
        betas = defaults["betas"]
        check("betas", betas, isinstance(betas, (tuple, list)) and len(betas) == 2, "must be two values")
        for i, beta in enumerate(betas):
            check(f"beta parameter at index {i}", beta, 0.0 <= as_float(beta) <= 1.0, "must be in [0, 1]")
        wd = defaults["weight_decay"]
        check("weight_decay value", wd, as_float(wd) >= 0.0, "must be >= 0")

    def _weight_decay(self, group) -> tuple[float, bool]:
        # lion_pytorch: p.data.mul_(1 - lr * wd), wd divided by the constructor's lr when decoupled
        wd = as_float(group["weight_decay"])
        if group.get("decoupled_weight_decay"):
            wd /= as_float(self.defaults["lr"])
        return wd, True

    def _hyper(self, group) -> tuple[float, ...]:
        beta1, beta2 = (as_float(b) for b in group["betas"])
        return (beta1, 1.0 - beta1, beta2, 1.0 - beta2)

    def _validate(self, index: int, group, grads) -> None:
        refuse_complex("Lion", group, grads, "lion_pytorch takes the sign of a complex momentum as z / |z|")
        super()._validate(index, group, grads)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(keep_own_group_keys(self, state_dict))
