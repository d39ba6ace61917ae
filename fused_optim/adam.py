"""Adam and AdamW (AdamW is Adam with decoupled weight decay)."""

from __future__ import annotations

import torch

from ._base import FusedOptimizer, _as_float
from .kernels import adam_step

__all__ = ["Adam", "AdamW"]


def _to_scalar(x):
    # torch.optim keeps 1-element hyperparameter tensors as 0-dim tensors.
    return x.squeeze() if isinstance(x, torch.Tensor) and x.dim() != 0 else x


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
        params: iterable of parameters or named parameters, or of dicts defining param groups.
        lr (float, Tensor): learning rate :math:`\gamma` (default: 1e-3).
        betas (tuple[float, float]): :math:`(\beta_1, \beta_2)` (default: (0.9, 0.999)).
        eps (float): term added to the denominator (default: 1e-8).
        weight_decay (float): :math:`\lambda` (default: 0).
        amsgrad (bool): use the AMSGrad variant (default: False).
        foreach, fused: accepted for compatibility; the update is always fused.
        maximize (bool): maximize the objective (default: False).
        capturable, differentiable: ``True`` raises ``NotImplementedError``.
        decoupled_weight_decay (bool): decay the parameter directly, as AdamW (default: False).
    """

    _torch_cls = torch.optim.Adam
    _n_step_scalars = 2
    _sparse_error = "Adam does not support sparse gradients, please consider SparseAdam instead"

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        state_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(map(_to_scalar, betas)),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(
            params,
            defaults,
            master_weights=master_weights,
            stochastic_rounding=stochastic_rounding,
            state_dtype=state_dtype,
            max_grad_norm=max_grad_norm,
        )

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("fused", None)

    def _tensor_state_keys(self, group) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")

    def _step_scalars(self, group, scalars: dict[str, float]) -> tuple[float, float]:
        step = scalars["step"]
        lr = _as_float(group["lr"])
        beta1, beta2 = (_as_float(b) for b in group["betas"])
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        return (-(lr / bias_correction1), bias_correction2**0.5)  # -step_size, sqrt(bias_correction2)

    def _launch(self, group, launch, step_scalars) -> None:
        seg = launch.seg
        beta1, beta2 = group["betas"]
        adam_step(
            launch.tables,
            seg.flat["exp_avg"],
            seg.flat["exp_avg_sq"],
            seg.flat.get("max_exp_avg_sq"),
            param_dtype=seg.dtype,
            lr=self._lr(group, launch),
            beta1=_as_float(beta1),
            beta2=_as_float(beta2),
            eps=_as_float(group["eps"]),
            weight_decay=_as_float(group["weight_decay"]),
            decoupled=bool(group["decoupled_weight_decay"]),
            amsgrad=bool(group["amsgrad"]),
            maximize=bool(group["maximize"]),
            step_scalars=step_scalars,
            features=launch.features,
            num_warps=self._num_warps,
        )

    def _reference(self, group, params, grads, states, fresh) -> None:
        from torch.optim.adam import adam
        from torch.optim.adamw import adamw

        beta1, beta2 = group["betas"]
        (adamw if group["decoupled_weight_decay"] else adam)(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
            [s["step"] for s in states],
            foreach=False,
            capturable=False,
            differentiable=False,
            fused=False,
            has_complex=any(torch.is_complex(p) for p in params),
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )


class AdamW(Adam):
    r"""AdamW: :class:`Adam` with decoupled weight decay, drop-in for :class:`torch.optim.AdamW`.

    Same arguments as :class:`Adam` except ``weight_decay`` defaults to 1e-2 and decay is always
    decoupled: :math:`\theta \leftarrow \theta(1 - \gamma\lambda)` before the Adam step.
    """

    _torch_cls = torch.optim.AdamW

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        state_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            master_weights=master_weights,
            stochastic_rounding=stochastic_rounding,
            state_dtype=state_dtype,
            max_grad_norm=max_grad_norm,
        )

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
