"""Adam and AdamW (AdamW is Adam with decoupled weight decay)."""

from __future__ import annotations

from typing import ClassVar

import torch

from ._base import FusedOptimizer
from ._segments import as_float
from .kernels import ADAM

__all__ = ["Adam", "AdamW"]


class Adam(FusedOptimizer):
    r"""Adam, with the whole update in one Triton launch per parameter segment.

    Drop-in for :class:`torch.optim.Adam` (same arguments, defaults, errors, state and
    ``state_dict``). Per element, with :math:`g` the gradient (negated if ``maximize``):

    .. math::
        g &\leftarrow g + \lambda\theta \quad\text{(L2 decay)} \qquad
            \theta \leftarrow \theta(1 - \gamma\lambda) \quad\text{(decoupled decay)} \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2,
            \qquad \hat v = \max(\hat v, v) \text{ if amsgrad, else } v \\
        \theta &\leftarrow \theta - \frac{\gamma}{1-\beta_1^t}\,
            \frac{m}{\sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon}

    Args:
        lr (float, Tensor): learning rate :math:`\gamma` (default: 1e-3).
        betas (tuple[float, float]): :math:`(\beta_1, \beta_2)` (default: (0.9, 0.999)).
        eps (float): term added to the denominator (default: 1e-8).
        weight_decay (float): :math:`\lambda` (default: 0).
        amsgrad (bool): use the AMSGrad variant (default: False).
        decoupled_weight_decay (bool): decay the parameter directly, as AdamW (default: False).
        params, maximize, foreach, fused, capturable, differentiable, and fused_optim's own options:
            see :class:`~fused_optim.FusedOptimizer`.
    """

    _torch_cls = torch.optim.Adam
    _algorithm = ADAM
    _sparse_error = "Adam does not support sparse gradients, please consider SparseAdam instead"

    def __init__(
        self, params, lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None, maximize: bool = False,
        capturable: bool = False, differentiable: bool = False, fused: bool | None = None,
        decoupled_weight_decay: bool = False, **extensions,
    ) -> None:  # fmt: skip
        super().__init__(params, locals())

    def _normalize(self, defaults: dict) -> dict:
        # torch.optim keeps 1-element beta tensors as 0-dim tensors
        betas = tuple(b.squeeze() if isinstance(b, torch.Tensor) and b.dim() != 0 else b for b in defaults["betas"])
        return {**defaults, "betas": betas}

    def _tensor_state_keys(self, group) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")

    def _hyper(self, group) -> tuple[float, ...]:
        beta1, beta2 = (as_float(b) for b in group["betas"])
        return (1.0 - beta1, beta2, 1.0 - beta2, as_float(group["eps"]), beta1)

    def _options(self, group) -> tuple[bool, ...]:
        return (bool(group["amsgrad"]),)

    def _step_scalars(self, group, scalars: dict[str, float]) -> tuple[float, float]:
        step = scalars["step"]
        lr = as_float(group["lr"])
        beta1, beta2 = (as_float(b) for b in group["betas"])
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        return (-(lr / bias_correction1), bias_correction2**0.5)  # -step_size, sqrt(bias_correction2)

    def _torch_functional(self, group):
        from torch.optim.adam import adam
        from torch.optim.adamw import adamw

        return adamw if group["decoupled_weight_decay"] else adam


class AdamW(Adam):
    r"""AdamW: :class:`Adam` with decoupled weight decay, drop-in for :class:`torch.optim.AdamW`.

    Same arguments as :class:`Adam` except ``weight_decay`` defaults to 1e-2 and decay is always
    decoupled: :math:`\theta \leftarrow \theta(1 - \gamma\lambda)` before the Adam step.
    """

    _torch_cls = torch.optim.AdamW
    _fixed: ClassVar[dict] = {"decoupled_weight_decay": True}

    def __init__(
        self, params, lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False, foreach: bool | None = None,
        capturable: bool = False, differentiable: bool = False, fused: bool | None = None, **extensions,
    ) -> None:  # fmt: skip
        FusedOptimizer.__init__(self, params, locals())
