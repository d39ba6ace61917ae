"""Adagrad."""

from __future__ import annotations

import torch

from ._base import FusedOptimizer, _as_float, call_torch
from .kernels import adagrad_step

__all__ = ["Adagrad"]


class Adagrad(FusedOptimizer):
    r"""Adagrad, with the whole update in one Triton launch per parameter segment.

    Drop-in for :class:`torch.optim.Adagrad` (state is created at construction, as torch does).
    Per element, with :math:`g` the gradient (negated if ``maximize``) plus :math:`\lambda\theta`:

    .. math::
        s \leftarrow s + g^2, \qquad
        \theta \leftarrow \theta - \frac{\gamma}{1 + (t - 1)\eta}\,\frac{g}{\sqrt{s} + \epsilon}

    Args:
        params: iterable of parameters or named parameters, or of dicts defining param groups.
        lr (float, Tensor): learning rate :math:`\gamma` (default: 1e-2).
        lr_decay (float): :math:`\eta` (default: 0).
        weight_decay (float): :math:`\lambda` (default: 0).
        initial_accumulator_value (float): initial value of :math:`s` (default: 0).
        eps (float): term added to the denominator (default: 1e-10).
        foreach, fused: accepted for compatibility; the update is always fused.
        maximize (bool): maximize the objective (default: False).
        differentiable: ``True`` raises ``NotImplementedError``.

    Sparse gradients are supported and run through torch.optim's own implementation.
    """

    _torch_cls = torch.optim.Adagrad
    _n_step_scalars = 1
    _sparse_ok = True
    _eager_state = True

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        state_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "fused": fused,
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
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)

    def share_memory(self) -> None:
        """Calls ``share_memory_()`` on the state sums (their flat buffers), as torch.optim does."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"].share_memory_()

    def _tensor_state_keys(self, group) -> tuple[str, ...]:
        return ("sum",)

    def _init_region(self, group, key, region, param) -> None:
        # torch fills every sum with the constructor's value, whatever a group says (both parts of
        # a complex value: here, every element of its real view).
        region.fill_(self.defaults["initial_accumulator_value"])

    def _check_sparse(self, group) -> None:
        if group["weight_decay"] != 0:
            raise RuntimeError("weight_decay option is not compatible with sparse gradients")

    def _step_scalars(self, group, scalars) -> tuple[float]:
        step = scalars["step"]
        clr = _as_float(group["lr"]) / (1 + (step - 1) * group["lr_decay"])
        return (-clr,)

    def _launch(self, group, launch, step_scalars) -> None:
        seg = launch.seg
        adagrad_step(
            launch.tables,
            seg.flat["sum"],
            param_dtype=seg.dtype,
            lr=self._lr(group, launch),
            lr_decay=_as_float(group["lr_decay"]),
            weight_decay=_as_float(group["weight_decay"]),
            eps=_as_float(group["eps"]),
            maximize=bool(group["maximize"]),
            step_scalars=step_scalars,
            features=launch.features,
            num_warps=self._num_warps,
        )

    def _reference(self, group, params, grads, states, fresh) -> None:
        from torch.optim.adagrad import adagrad

        call_torch(
            adagrad,
            params,
            grads,
            [s["sum"] for s in states],
            [s["step"] for s in states],
            foreach=False,
            fused=False,
            has_sparse_grad=any(g.is_sparse for g in grads),
            has_complex=any(torch.is_complex(p) for p in params),
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            lr_decay=group["lr_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )
