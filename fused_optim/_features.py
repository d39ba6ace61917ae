"""Training features around the algorithm: AMP (GradScaler's scale and inf flag), global-norm
clipping, fp32 master weights, bf16 stochastic rounding, state dtype, device step counts.

Each is a switch of the one update kernel; here the engine decides, per launch and step, which
switches are on and with which tensors (``Features``), and computes the global grad norm for
clipping (one reduction launch per segment, combined on the device, all-reduced across ranks for
DTensor params).
"""

from __future__ import annotations

import math
import weakref
import zlib
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from . import _dtensor
from ._quant import CODES, QUANT_DTYPES, quantizes
from .kernels._features import Features
from .kernels.clip import grad_norm_partials


def rounding_seed(user_seed: int, group_index: int, segment_index: int, dtype: torch.dtype) -> int:
    """Stochastic rounding's seed for one segment, from values every rank and every process agree
    on: the user's seed, the group's index, the segment's index in the group (the order its params
    first appear: the same on every rank of a replicated model, and different for the segments of
    one group on two devices, whose flat states both start at element 0), and the dtype; never the
    device index, never ``hash()`` of an object (a dtype's hash is its address, which differs from
    process to process). The kernel adds the step and draws per element by its place in the
    segment's flat state, so replicated params round alike on every rank."""
    return zlib.crc32(f"{user_seed}:{group_index}:{segment_index}:{dtype}".encode())


@dataclass
class StepInputs:
    """Per-step device tensors the kernels read: AMP scale and inf flag, clip coefficient."""

    grad_scale: torch.Tensor | None
    found_inf: torch.Tensor | None
    clip_coef: torch.Tensor | None
    _moved: dict = field(default_factory=dict)

    def on(self, device: torch.device, name: str) -> torch.Tensor | None:
        """The named tensor on ``device`` (copied once per device and step, without a host sync)."""
        value = getattr(self, name)
        if value is None or value.device == device:
            return value
        key = (name, device)
        if key not in self._moved:
            self._moved[key] = value.to(device, non_blocking=True)
        return self._moved[key]

    def factor(self) -> torch.Tensor | None:
        """What grads are multiplied by (torch's fallback path): 1 / grad_scale times the clip coefficient."""
        factor = None
        if self.grad_scale is not None:
            factor = self.grad_scale.double().reciprocal().float()  # as GradScaler.unscale_ computes it
        if self.clip_coef is not None:
            factor = self.clip_coef if factor is None else factor * self.clip_coef.to(factor.device)
        return factor


class FeaturesMixin:
    """The training features of ``FusedOptimizer``."""

    def _device_steps(self, group) -> bool:
        """Step counts on the device: capturable groups, and every group once AMP skips steps."""
        return bool(self._scalar_state) and (bool(group.get("capturable")) or self._amp_steps)

    def _key_dtypes(self, group, dtype: torch.dtype, quantized: bool = False) -> dict[str, torch.dtype]:
        """The per-element state of params of (real) ``dtype`` in ``group``, with its dtypes; with an
        8-bit ``state_dtype``, the moments of ``quantized`` params have it (their codes), and every
        other state is fp32 (fp64 for fp64 params)."""
        master = self.options["master_weights"] and dtype in (torch.float16, torch.bfloat16)
        state_dtype = self.options["state_dtype"] or (torch.float32 if master else dtype)
        keys = dict.fromkeys(self._tensor_state_keys(group), state_dtype)
        if state_dtype in QUANT_DTYPES:
            wide = torch.float64 if dtype == torch.float64 else torch.float32
            keys = {k: state_dtype if quantized and k in CODES else wide for k in keys}
        if master:
            keys["master_param"] = torch.float32
        return keys

    def _quantizes(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s moments are 8-bit (``_quant.quantizes``)."""
        return quantizes(p, self.options["state_dtype"])

    def _features(self, group, launch, inputs: StepInputs) -> Features:
        """What the kernels of this launch switch on: AMP, clipping, master copy, rounding, device steps."""
        seg = launch.seg
        f = Features()
        if seg.device_step:
            f.steps = seg.scalars["step"]
            lr = group["lr"]
            if isinstance(lr, torch.Tensor) and (lr.device.type != "cpu" or lr.device == seg.device):
                f.lr_tensor = lr.to(seg.device)  # read by the kernel: no host read, capturable
            f.seed = seg.seed  # the kernel adds each tensor's step count
        else:
            f.seed = seg.seed + self._step_count * 7919
        f.grad_scale = inputs.on(seg.device, "grad_scale")
        f.found_inf = inputs.on(seg.device, "found_inf")
        f.clip_coef = inputs.on(seg.device, "clip_coef")
        if seg.master:
            f.master = seg.flat["master_param"]
        f.stochastic = seg.stochastic
        return f

    # --- global-norm clipping ------------------------------------------------------------------
    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach=None
    ) -> torch.Tensor:
        """Clip the global norm of every grad of this optimizer, as
        ``torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)`` would, and return the total
        norm (a tensor, never read on the host). The grads are not modified: the next ``step()``
        multiplies them by ``min(max_norm / (total_norm + 1e-6), 1)`` inside its kernels, if they
        are still the same grads (``zero_grad()``, new grads or grads changed in place drop it); a
        second call before it measures and clips the grads as the first left them, as torch's
        would. ``norm_type``: 2.0 or inf."""
        _check_norm_type(norm_type)
        work = self._plans()
        pending = self._pending_coef(work)
        total = self._total_norm(work, norm_type, None)
        if pending is not None:
            total = total * pending  # the norm of the grads as clipped so far
        if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
            raise RuntimeError(
                f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, so it "
                "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
                "anyway, set `error_if_nonfinite=False`"
            )
        coef = _coefficient(float(max_norm), total, pending)
        self._pending_clip = (coef, [(weakref.ref(g), g._version) for g in _grads(work)])
        return total

    def _pending_coef(self, work) -> torch.Tensor | None:
        """The coefficient of the ``clip_grad_norm_`` calls since the last step, if the grads are
        still the very tensors it measured, unchanged since (else torch's clip would have scaled
        other grads: it is dropped)."""
        if self._pending_clip is None:
            return None
        coef, seen = self._pending_clip
        grads = _grads(work)
        if len(grads) != len(seen) or any(ref() is not g or g._version != v for (ref, v), g in zip(seen, grads)):
            self._pending_clip = None
            return None
        return coef

    def _clip_coef(self, work, grad_scale) -> torch.Tensor | None:
        pending = self._pending_coef(work)
        if self.max_grad_norm is None:
            return pending
        total = self._total_norm(work, 2.0, grad_scale)
        return _coefficient(self.max_grad_norm, total if pending is None else total * pending, pending)

    def _total_norm(self, work, norm_type: float, grad_scale) -> torch.Tensor:
        """Global grad norm over every segment: one reduction launch per segment, combined on the device."""
        _check_norm_type(norm_type)
        inf = norm_type == math.inf
        parts: dict = defaultdict(list)  # norm class -> partial norms (None: needs no reduction across ranks)
        torch_norms = []  # per-tensor norms as torch computes them, for grads outside the kernels
        for plan, grads, _, _ in work:
            if plan.sparse:
                raise NotImplementedError("fused_optim does not clip sparse gradients")
            for launch in plan.launches:
                seg, rows = launch.seg, launch.rows.tolist()
                if launch.tables is not None:
                    launch.stage_in(grads)
                    partials = grad_norm_partials(launch.tables, seg.dtype, inf, self._num_warps)
                    if seg.uniform_norm_class:
                        parts[seg.norm_classes[0]].append(partials.amax() if inf else partials.sum())
                        continue
                    # members of several classes: per-tensor norms from the block table, then per class
                    owner = launch.tables.block_table[: launch.tables.n_blocks] >> 32
                    per_tensor = torch.zeros(len(rows), dtype=partials.dtype, device=partials.device)
                    per_tensor.scatter_reduce_(0, owner, partials[: launch.tables.n_blocks], "amax" if inf else "sum")
                    for j, i in enumerate(rows):
                        parts[seg.norm_classes[i]].append(per_tensor[j])
                else:
                    for i in rows:
                        g = _dtensor.local(grads[seg.group_index[i]])
                        if inf and not g.numel():
                            continue  # an empty grad adds nothing (torch's inf-norm refuses it)
                        norm = torch.linalg.vector_norm(g, norm_type)  # torch.nn.utils.clip_grad_norm_'s
                        torch_norms.append(norm)
                        parts[seg.norm_classes[i]].append(norm.double() if inf else norm.double().square())
        if _dtensor.PARTIAL in parts:
            raise NotImplementedError("fused_optim does not clip grads of params with Partial placements")
        if torch_norms and len(torch_norms) == sum(map(len, parts.values())) and not self._mesh_classes():
            # Every grad is outside the kernels (torch's implementation on CPU) and no rank takes
            # part: the total exactly as clip_grad_norm_ forms it (in its dtype), so clipping then
            # matches torch's clip_grad_norm_ and step bit for bit.
            total = torch.linalg.vector_norm(torch.stack([n.to(torch_norms[0].device) for n in torch_norms]), norm_type)
            return total if grad_scale is None else total / grad_scale.to(total.device)
        total = self._combine_norms(parts, inf)
        if total is None:
            return torch.tensor(0.0)
        device = total.device
        if grad_scale is not None:
            total = total / grad_scale.to(device)
        fp64 = all(launch.seg.dtype == torch.float64 for p, *_ in work for launch in p.launches)
        return total.to(torch.float64 if fp64 else torch.float32)

    def _mesh_classes(self) -> list:
        """The norm classes of DTensor params (mesh, sharded dims), in the same order on every rank."""
        ordered = (c for _, cache in sorted(self._caches.items()) for c in cache.norm_classes)
        return list(dict.fromkeys(c for c in ordered if c is not None and c != _dtensor.PARTIAL))

    def _combine_norms(self, parts: dict, inf: bool) -> torch.Tensor | None:
        """Sum of squares (or max) over every class of partial norms, in float64; the classes of
        DTensor params are reduced over the mesh dims their params are sharded on. Every rank
        runs the same collectives in the same order: the classes come from the param groups."""
        classes = self._mesh_classes()
        local = parts.get(None, [])
        if not local and not classes:
            return None
        device = local[0].device if local else None
        totals = []
        if local:
            stacked = torch.stack([p.to(device=device, dtype=torch.float64) for p in local])
            totals.append(stacked.amax() if inf else stacked.sum())
        for cls in classes:
            import torch.distributed as dist

            mesh, dims = cls
            mine = parts.get(cls, [])
            if mine:
                value = torch.stack([p.to(torch.float64) for p in mine])
                value = value.amax() if inf else value.sum()
            else:  # this rank holds no grad of the class: its share is zero
                value = torch.zeros((), dtype=torch.float64, device=_dtensor.mesh_device(mesh))
            for dim in dims:
                dist.all_reduce(value, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=mesh.get_group(dim))
            device = device or value.device
            totals.append(value.to(device))
        stacked = torch.stack(totals)
        return stacked.amax() if inf else stacked.sum().sqrt()


def _grads(work) -> list:
    """Every grad of the plans ``work`` (``_plans``' answer), as the kernels read them."""
    return [g for _, gs, _, _ in work for g in gs if g is not None]


def _check_norm_type(norm_type: float) -> None:
    if norm_type not in (2.0, math.inf):
        raise NotImplementedError(f"fused_optim clips by the 2-norm or the inf-norm, not norm_type={norm_type}")


def _coefficient(max_norm: float, total: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s coefficient for grads of norm ``total``, after the clips
    ``pending`` already stands for."""
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return coef if pending is None else coef * pending
