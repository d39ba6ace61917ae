"""Muon: momentum and decoupled decay in one launch, Newton-Schulz batched over params of one
shape, the orthogonalized update applied in a second launch."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import torch
from torch.optim._muon import _adjust_lr

from . import _dtensor
from ._base import FusedOptimizer
from ._checks import PLACEHOLDER_SHAPES
from ._fallback import uses_triton
from ._segments import as_float
from .kernels import step_table, update_step
from .kernels._jit import triton_dtype
from .kernels.muon import MUON_APPLY, MUON_MOMENTUM

__all__ = ["Muon", "newton_schulz"]

PLACEHOLDER_SHAPES[torch.optim.Muon] = (0, 0)  # torch's own argument checks need a 2-D param


def newton_schulz(x: torch.Tensor, ns_coefficients, ns_steps: int, eps: float) -> torch.Tensor:
    """torch's ``_zeropower_via_newtonschulz`` over a batch ``[B, R, C]`` of bf16 matrices at once:
    each transposed when R > C, normalized by its own Frobenius norm (clamped at ``eps``), then
    ``ns_steps`` quintic iterations as batched matmuls."""
    a, b, c = ns_coefficients
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(ns_steps):
        gram = torch.bmm(x, x.mT)
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, gram_update, x, beta=a)
    return x.mT if tall else x


class Muon(FusedOptimizer):
    r"""Muon (momentum orthogonalized by Newton-Schulz) for 2-D params, drop-in for
    :class:`torch.optim.Muon` (same arguments, defaults, errors, state and ``state_dict``).

    Per param, with :math:`g` its gradient and :math:`B` its momentum buffer:

    .. math::
        B \leftarrow \mu B + (1 - \mu) g, \quad
        \tilde B = g + \mu (B - g) \text{ if nesterov else } B, \quad
        \theta \leftarrow \theta (1 - \gamma\lambda) - \mathrm{AdjustLR}(\gamma)\,
        \mathrm{NS}^{(a,b,c)}_k(\tilde B; \varepsilon)

    One launch updates every buffer of a segment, decays the params and writes :math:`\tilde B`
    into a scratch buffer (owned by the optimizer, not part of ``state``); Newton-Schulz then runs
    in bf16 as torch's does, but batched (``bmm``) over the params of each shape, at most
    ``_ns_batch_elements`` matrix elements at a time; a second launch applies the result.

    Args:
        lr (float, Tensor): learning rate :math:`\gamma` (default: 1e-3).
        weight_decay (float): decoupled weight decay :math:`\lambda` (default: 0.1).
        momentum (float): :math:`\mu` (default: 0.95).
        nesterov (bool): Nesterov momentum (default: True).
        ns_coefficients (tuple[float, float, float]): :math:`(a, b, c)` of the Newton-Schulz polynomial.
        eps (float): lower bound of the norm each update is divided by (default: 1e-7).
        ns_steps (int): Newton-Schulz iterations :math:`k` (default: 5).
        adjust_lr_fn (str, optional): ``"original"`` (default, :math:`\sqrt{\max(1, A/B)}`) or
            ``"match_rms_adamw"`` (:math:`0.2\sqrt{\max(A, B)}`) for an :math:`A \times B` param.
        params, and fused_optim's own options: see :class:`~fused_optim.FusedOptimizer`.
        nd_params (str, optional, keyword-only, beyond torch): how params with more than two dims
            are read as matrices. None (default): refused, as torch does; ``"batch"``: a batch of
            matrices over the last two dims (MoE expert stacks ``[E, R, C]``), each orthogonalized
            and lr-adjusted on its own; ``"flatten"``: one matrix, the first dim by all the others
            flattened (conv filters ``[O, I, kh, kw]`` as ``O x I*kh*kw``).

    DTensor params (FSDP2, tensor parallel): each rank gathers the updates of its sharded params
    (bf16, one all-gather per param), orthogonalizes the whole matrices, batched as above, and
    keeps its own shard; every rank does the same Newton-Schulz work.
    """

    _torch_cls = torch.optim.Muon
    _algorithm = MUON_MOMENTUM
    _scalar_state: ClassVar[dict[str, float]] = {}  # no step counter, as in torch
    # Newton-Schulz batch size in matrix elements: the batch and its temporaries (the stacked bf16
    # updates, the current and the next iterate, two Gram matrices of at most as many elements) take
    # at most 10 bytes per element, 1.25 GiB at this size.
    _ns_batch_elements = 1 << 27
    _row_major = True  # params are read as row-major matrices: non-contiguous ones are staged
    _own_extensions: ClassVar[dict] = {"nd_params": None}

    def __init__(
        self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95, nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315), eps: float = 1e-7,
        ns_steps: int = 5, adjust_lr_fn: str | None = None, **extensions,
    ) -> None:  # fmt: skip
        super().__init__(params, locals())
        if self.options["nd_params"] not in (None, "batch", "flatten"):
            raise ValueError(f"nd_params must be None, 'batch' or 'flatten', not {self.options['nd_params']!r}")
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2 and (p.ndim < 2 or self.options["nd_params"] is None):  # torch's check and message
                    raise ValueError(
                        f"Muon only supports 2D parameters whereas we found a parameter with size: {p.size()}"
                    )

    def _matrices(self, shape) -> tuple[int, int, int]:
        """How a param of ``shape`` (its global shape) is read: (number of matrices, rows, columns)."""
        if len(shape) == 2 or self.options["nd_params"] == "flatten":
            return 1, shape[0], int(np.prod(shape[1:], dtype=np.int64))
        return int(np.prod(shape[:-2], dtype=np.int64)), shape[-2], shape[-1]

    def _tensor_state_keys(self, group) -> tuple[str, ...]:
        return ("momentum_buffer",)  # zeros from the first step with a grad, as torch

    # --- checks: torch raises these in step(); here before anything changes ------------------
    def _plans(self):
        for group in self.param_groups:
            if any(p.grad is not None for p in group["params"]):
                if group["ns_steps"] >= 100:
                    raise ValueError("Number of steps must be less than 100 for computational efficiency")
                if len(group["ns_coefficients"]) != 3:
                    raise ValueError("Coefficients must be a tuple of exactly 3 values")
        return super()._plans()

    def _validate(self, index: int, group, grads) -> None:
        for p, g in zip(group["params"], grads):
            if g is None:
                continue
            if torch.is_complex(p):
                raise RuntimeError("Muon does not support complex parameters")
            if g.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            if g.ndim != 2 and (g.ndim < 2 or self.options["nd_params"] is None):
                raise ValueError("Param gradient must be a 2D matrix")
            if _dtensor.is_dtensor(p) and not uses_triton(_dtensor.local(p).device):
                raise NotImplementedError(
                    "fused_optim.Muon with DTensor params needs the Triton kernels (torch's Muon would "
                    f"orthogonalize each rank's shard), which do not run on {_dtensor.local(p).device}"
                )
        super()._validate(index, group, grads)

    # --- step: momentum launch, batched Newton-Schulz, apply launch ----------------------------
    def _launch(self, group, launch) -> None:
        seg, features, tables = launch.seg, launch.features, launch.tables
        lr, momentum = as_float(group["lr"]), as_float(group["momentum"])
        buf = seg.flat["momentum_buffer"]
        # the buffer as the update reads it: as stored, or in fp32 when 8-bit (its codes are the next step's)
        values = torch.float32 if seg.scales else buf.dtype
        if "update" not in seg.scratch:  # the update to orthogonalize, laid out like the segment's states
            seg.scratch["update"] = torch.zeros_like(buf, dtype=values)
        scratch = seg.scratch["update"]
        update_step(
            MUON_MOMENTUM, tables, {"momentum_buffer": buf, "update": scratch}, param_dtype=seg.dtype, lr=lr,
            hyper=(1.0 - momentum, momentum), options=(bool(group["nesterov"]), triton_dtype(values)),
            weight_decay=as_float(group["weight_decay"]), decoupled=True, features=features, num_warps=self._num_warps,
            **self._codes(seg),
        )  # fmt: skip
        self._orthogonalize(group, seg, launch.rows, scratch)
        # torch's _adjust_lr, lr * ratio in float64; one value when every param's ratio is the same
        cached = launch.own_tables
        if cached is None or cached[0] != group["adjust_lr_fn"]:
            fn = group["adjust_lr_fn"]
            ratios = np.asarray([_adjust_lr(1.0, fn, self._matrices(seg.members[i].shape)[1:]) for i in launch.rows])
            cached = launch.own_tables = (fn, ratios)
        neg_lrs = -(lr * cached[1])
        if neg_lrs.min() == neg_lrs.max():
            scalars = (float(neg_lrs[0]),)
        else:
            scalars = step_table(neg_lrs, lr, 0.0, False, np.zeros(len(neg_lrs)), seg.device)
        # the param is rounded a second time this step: stochastic rounding draws other bits
        features = dataclasses.replace(features, seed=features.seed ^ (1 << 40))
        update_step(
            MUON_APPLY, tables, {"update": scratch}, param_dtype=seg.dtype, lr=lr, hyper=(), step_scalars=scalars,
            features=features, num_warps=self._num_warps,
        )  # fmt: skip

    def _orthogonalize(self, group, seg, rows: np.ndarray, scratch: torch.Tensor) -> None:
        """Newton-Schulz on the scratch regions of ``rows``, batched by matrix shape, written back.
        A DTensor param's update is gathered whole first, and only its shard is written back."""
        by_shape: dict[tuple, list] = {}  # (rows, columns) -> [(matrices [k, R, C] in bf16, where they go)]
        for i in rows.tolist():
            member = seg.members[i]
            if not member.numel():  # empty as a whole (a rank whose local shard is empty still gathers)
                continue
            k, r, c = self._matrices(member.shape)
            region = scratch.as_strided(seg.shapes[i], seg.strides[i], int(seg.offsets[i]))  # contiguous
            update = region.to(torch.bfloat16)  # update.bfloat16(), before the gather: half the bytes
            if _dtensor.is_dtensor(member):
                update = _dtensor.like_param(update, member).full_tensor()
            by_shape.setdefault((r, c), []).append((update.view(k, r, c), region, member))
        coefficients, ns_steps, eps = tuple(group["ns_coefficients"]), int(group["ns_steps"]), as_float(group["eps"])
        for (r, c), entries in by_shape.items():
            batch = torch.cat([x for x, _, _ in entries]) if len(entries) > 1 else entries[0][0]
            per_batch = max(1, self._ns_batch_elements // (r * c))
            out = torch.cat([newton_schulz(x, coefficients, ns_steps, eps) for x in batch.split(per_batch)])
            start = 0
            for x, region, member in entries:
                result = out[start : start + len(x)].view(member.shape)
                start += len(x)
                if _dtensor.is_dtensor(member):
                    result = _dtensor.shard_like(result, member)
                region.copy_(result.view(region.shape))

    def bytes_per_step(self) -> int:
        """As ``FusedOptimizer.bytes_per_step`` for the two launches (the scratch written once and
        read once, the param or its master copy updated twice); Newton-Schulz's matmuls not counted."""
        total = super().bytes_per_step()
        for cache in self._caches.values():
            for seg in cache.segments.values():
                n = int(seg.numels.sum())
                scratch = 4 if seg.scales else seg.flat["momentum_buffer"].dtype.itemsize  # fp32 next to 8-bit codes
                total += 2 * n * scratch  # scratch: written, then read
                total += n * seg.dtype.itemsize * (1 if seg.master else 2) + (8 * n if seg.master else 0)
        return total

    # --- where the kernels cannot run: torch's own functional ----------------------------------
    def _torch_functional(self, group):
        from torch.optim._muon import muon

        return muon

    def _reference(self, group, params, grads, states, fresh) -> None:
        self._torch_functional(group)(
            params, grads, [s["momentum_buffer"] for s in states], lr=group["lr"],
            weight_decay=group["weight_decay"], momentum=group["momentum"], nesterov=group["nesterov"],
            ns_coefficients=group["ns_coefficients"], ns_steps=group["ns_steps"], eps=group["eps"],
            adjust_lr_fn=group["adjust_lr_fn"], has_complex=False,
        )  # fmt: skip
