"""Adafactor."""

from __future__ import annotations

import numpy as np
import torch

from . import _dtensor
from ._base import FusedOptimizer
from ._segments import Launch, as_float
from .kernels import step_table
from .kernels.adafactor import adafactor_step, factor_tables

__all__ = ["Adafactor"]


class Adafactor(FusedOptimizer):
    r"""Adafactor, with the whole update in three Triton launches per parameter segment.

    Drop-in for :class:`torch.optim.Adafactor` (same arguments, defaults, errors, state and
    ``state_dict``). A param with more than one dim keeps factored second moments over its last
    two dims (``row_var`` of shape ``[..., R, 1]``, ``col_var`` of shape ``[..., 1, C]``); a vector
    keeps ``variance``. With :math:`g` the gradient (negated if ``maximize``), at step :math:`t`:

    .. math::
        \hat\beta_t = t^{\tau}, \quad \rho_t = \min(\gamma, 1/\sqrt t), \quad
        \alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta)) \rho_t, \\
        R \leftarrow R + \hat\beta_t(\overline{g^2}_{\text{row}} - R), \quad
        C \leftarrow C + \hat\beta_t(\overline{g^2}_{\text{col}} - C), \quad
        \hat V = \frac{R C}{\max(\overline R, \epsilon_1)}, \quad
        U = \frac{g}{\sqrt{\max(\hat V, \epsilon_1^2)}}, \\
        \theta \leftarrow \theta (1 - \gamma\lambda)
            - \frac{\alpha_t}{\max(1, \mathrm{RMS}(U) / d)} U

    The three launches (kernels/adafactor.py): the param norm and row/column sums of :math:`g^2`;
    the new factors and the norm of :math:`U`; the update. (Two cannot give torch's update: the
    clip by :math:`\mathrm{RMS}(U)` needs a reduction over :math:`U`, which needs the factors, which
    need a reduction over the whole grad.)

    Args:
        lr (float, Tensor): learning rate :math:`\gamma` (default: 1e-2).
        beta2_decay (float): :math:`\tau` (default: -0.8).
        eps (tuple[float | None, float]): :math:`(\epsilon_1, \epsilon_2)` (default: (None, 1e-3));
            :math:`\epsilon_1` None means the machine epsilon of the param's dtype (fp32 with
            ``master_weights``).
        d (float): clipping threshold (default: 1.0).
        weight_decay (float): :math:`\lambda` (default: 0).
        params, maximize, foreach, and fused_optim's own options: see
            :class:`~fused_optim.FusedOptimizer`. AMP: ``GradScaler`` unscales the grads before
            ``step()``, as for torch's Adafactor; DTensor (FSDP2) params raise
            ``NotImplementedError`` (their factors need reductions across ranks).
    """

    _torch_cls = torch.optim.Adafactor
    _algorithm = None  # kernels/adafactor.py: passes of its own
    _row_major = True
    _step_supports_amp_scaling = False  # as torch: GradScaler unscales, and skips inf steps, itself

    def __init__(
        self, params, lr: float | torch.Tensor = 1e-2, beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3), d: float = 1.0, weight_decay: float = 0.0, *,
        foreach: bool | None = None, maximize: bool = False, **extensions,
    ) -> None:  # fmt: skip
        super().__init__(params, locals())

    def _tensor_state_keys(self, group) -> tuple[str, ...]:
        return ("row_var", "col_var", "variance")

    def _state_shape(self, group, key: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        if key == "row_var":
            return (*shape[:-1], 1) if len(shape) > 1 else None
        if key == "col_var":
            return (*shape[:-2], 1, shape[-1]) if len(shape) > 1 else None
        if key == "variance":
            return shape if len(shape) <= 1 else None
        return shape

    def _validate(self, index: int, group, grads) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            if torch.is_complex(p):
                raise RuntimeError("Adafactor does not support complex parameters")
            if _dtensor.is_dtensor(p):
                raise NotImplementedError(
                    "fused_optim.Adafactor does not implement DTensor (FSDP2) params: its row and column "
                    "factors would need reductions across ranks"
                )
        super()._validate(index, group, grads)

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None):
        if grad_scale is not None or found_inf is not None:
            raise NotImplementedError(
                "fused_optim.Adafactor does not implement grad_scale/found_inf in step(): as for torch's "
                "Adafactor, let GradScaler unscale the grads before the step"
            )
        return super().step(closure)

    def _launch(self, group, launch: Launch) -> None:
        seg = launch.seg
        rows = launch.rows
        steps = seg.scalars_np["step"]
        steps[rows] += 1  # torch: step_t += 1
        step = steps[rows].astype(np.float64)
        lr = as_float(group["lr"])
        eps1, eps2 = group["eps"]
        if eps1 is None:
            eps1 = torch.finfo(torch.float32 if seg.master else seg.dtype).eps
        per_row = np.stack([step ** as_float(group["beta2_decay"]), np.minimum(lr, 1 / step**0.5)], axis=1)
        weight_decay = as_float(group["weight_decay"])
        scalars = step_table(per_row, lr, weight_decay, True, step, seg.device)
        if launch.own_tables is None:
            offsets = [[seg.offset(i, k) for i in rows.tolist()] for k in ("row_var", "col_var", "variance")]
            launch.own_tables = factor_tables([seg.shapes[i] for i in rows.tolist()], *offsets, seg.device)
        adafactor_step(
            launch.tables, launch.own_tables, seg.flat, scalars, param_dtype=seg.dtype, eps1=as_float(eps1),
            eps2=as_float(eps2), d=as_float(group["d"]), weight_decay=weight_decay,
            maximize=bool(group["maximize"]), features=launch.features, num_warps=self._num_warps,
        )  # fmt: skip

    def _torch_functional(self, group):
        from torch.optim._adafactor import adafactor

        return adafactor

    def bytes_per_step(self) -> int:
        """Bytes the passes over the tiles (kernels/adafactor.py) move in one step: per element, the
        grad read three times (sums, update norm, update), the param (or, with ``master_weights``,
        its fp32 master copy) read twice (sums, update) and written once (with a master copy, the
        param written too), a vector's ``variance`` read twice (update norm, update) and written
        once. ``row_var`` and ``col_var`` count read once and written once, as in
        ``FusedOptimizer.bytes_per_step``: they, and the reductions' scratch beside them, are a row
        and a column per matrix, negligible next to the matrix. fp32: 24 bytes per element of a
        matrix (and its factors'), 36 per element of a vector."""
        total = super().bytes_per_step()  # each array read once, each written once
        for cache in self._caches.values():
            for seg in cache.segments.values():
                n = int(seg.numels.sum())
                total += 2 * n * seg.dtype.itemsize  # the grad, read twice more
                param = seg.flat["master_param"].dtype if seg.master else seg.dtype
                total += n * param.itemsize  # the param or its master copy, read once more
                if "variance" in seg.flat:
                    total += seg.key_numel("variance") * seg.flat["variance"].dtype.itemsize  # once more
        return total
