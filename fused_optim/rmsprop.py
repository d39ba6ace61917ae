"""RMSprop, plain, centered and with momentum."""

from __future__ import annotations

import torch

from ._base import FusedOptimizer, _as_float, call_torch
from .kernels import rmsprop_step

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
        params: iterable of parameters or named parameters, or of dicts defining param groups.
        lr (float, Tensor): learning rate :math:`\gamma` (default: 1e-2).
        alpha (float): smoothing constant :math:`\alpha` (default: 0.99).
        eps (float): :math:`\epsilon` (default: 1e-8).
        weight_decay (float): :math:`\lambda` (default: 0).
        momentum (float): :math:`\mu` (default: 0).
        centered (bool): normalize by the estimated variance of the gradient (default: False).
        capturable, differentiable: ``True`` raises ``NotImplementedError``.
        foreach: accepted for compatibility; the update is always fused.
        maximize (bool): maximize the objective (default: False).
    """

    _torch_cls = torch.optim.RMSprop
    _sparse_error = "RMSprop does not support sparse gradients"

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        state_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "centered": centered,
            "weight_decay": weight_decay,
            "capturable": capturable,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
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
            group.setdefault("momentum", 0)
            group.setdefault("centered", False)
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("capturable", False)

    def _tensor_state_keys(self, group) -> tuple[str, ...]:
        keys = ("square_avg",)
        if group["momentum"] > 0:
            keys += ("momentum_buffer",)
        if group["centered"]:
            keys += ("grad_avg",)
        return keys

    def _launch(self, group, launch, step_scalars) -> None:
        seg = launch.seg
        rmsprop_step(
            launch.tables,
            seg.flat["square_avg"],
            seg.flat.get("momentum_buffer"),
            seg.flat.get("grad_avg"),
            param_dtype=seg.dtype,
            lr=self._lr(group, launch),
            alpha=_as_float(group["alpha"]),
            eps=_as_float(group["eps"]),
            weight_decay=_as_float(group["weight_decay"]),
            momentum=_as_float(group["momentum"]),
            centered=bool(group["centered"]),
            maximize=bool(group["maximize"]),
            features=launch.features,
            num_warps=self._num_warps,
        )

    def _reference(self, group, params, grads, states, fresh) -> None:
        from torch.optim.rmsprop import rmsprop

        call_torch(
            rmsprop,
            params,
            grads,
            [s["square_avg"] for s in states],
            [s["grad_avg"] for s in states] if group["centered"] else [],
            [s["momentum_buffer"] for s in states] if group["momentum"] > 0 else [],
            [s["step"] for s in states],
            foreach=False,
            maximize=group["maximize"],
            has_complex=any(torch.is_complex(p) for p in params),
            lr=group["lr"],
            alpha=group["alpha"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            centered=group["centered"],
        )
