"""Segments and their layout: the flat state a segment owns, and one step's work on it.

A *segment* is the params of one param group that share device and (real) dtype. Per segment
the optimizer owns one flat buffer per state key; ``state[p][key]`` is a view into it, with
``p``'s shape and strides, so ``state_dict()`` has torch's layout. Step counts live in one flat
buffer per segment (on the host, or on the device for capturable and AMP steps), and
``state[p]["step"]`` is a 0-dim view into it: advancing 1,000 steps is one tensor op.

A *launch* is one segment's work in one step (the members with a grad, and their device
tables); a *plan* is a group's launches, cached while the params' and grads' storages stay put.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import _dtensor
from .kernels._features import Features
from .kernels._quant import QB
from .kernels._tables import ALIGN, FLAG_FRESH, Tables, block_size, build_tables

REAL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
COMPLEX_DTYPES = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    return COMPLEX_DTYPES.get(dtype, dtype)


def _aligned(numel: int) -> int:
    return -(-numel // ALIGN) * ALIGN


def _layout_dims(shape, strides):
    """(stride, size, dim) of each dim of more than one element, innermost first: the order in
    which a dense tensor's elements lie in memory (the dims themselves too, or a square matrix and
    its transpose would look alike)."""
    return sorted((st, sz, dim) for dim, (sz, st) in enumerate(zip(shape, strides)) if sz != 1)


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive slots in some order, and
    hold the tensor's values (not a lazy negative or conjugate view, whose memory holds others)."""
    if t.is_neg() or t.is_conj():
        return False
    if t.is_contiguous() or t.numel() == 0:
        return True
    expected = 1
    for stride, size, _ in _layout_dims(t.shape, t.stride()):
        if stride != expected:
            return False
        expected *= size
    return True


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))


def same_layout(t: torch.Tensor, strides) -> bool:
    """``t`` is dense and visits elements in the same memory order as a region with ``strides``."""
    return is_dense(t) and _layout_dims(t.shape, t.stride()) == _layout_dims(t.shape, strides)


def is_dense_grad(g) -> bool:
    return g is not None and g.layout == torch.strided


def as_float(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def scalar_dtype() -> torch.dtype:
    # torch.optim keeps step counts in float32, or float64 when that is the default dtype.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class Segment:
    """Params of one group with one device and real dtype, and the flat state they own.

    ``key_dtypes`` maps every tensor state key to its dtype (the param's, ``state_dtype``, or fp32
    for the master copy). Scalar state (step counts) lives on the host and is advanced in numpy,
    or, with ``device_step``, on the params' device, advanced by a kernel (capturable, AMP).

    ``quantized`` keys are 8-bit (``kernels._quant``): ``flat[key]`` holds their codes and
    ``scales[key]`` one fp32 scale per ``QB`` elements, packed (member ``i``'s scales start at
    ``offsets[i] // QB``; every member's numel is a multiple of QB), and ``state`` shows them as
    ``{key}_codes`` (shaped like the param) and ``{key}_scales`` (``[shape[0], numel // shape[0] // QB]``)."""

    def __init__(
        self, key, members, group_index, key_dtypes: dict, scalar_keys, device_step: bool, stochastic: bool,
        state_shape=None, row_major: bool = False, quantized: tuple[str, ...] = (),
    ):  # fmt: skip
        self.key = key
        self.device, self.dtype = key[:2]
        self.members = members
        self.group_index = np.asarray(group_index, dtype=np.int64)  # position of each member in the group
        self.tensor_keys = tuple(key_dtypes)
        self.key_dtypes = dict(key_dtypes)
        self.master = "master_param" in key_dtypes
        self.stochastic = stochastic
        self.seed = 0  # stochastic rounding (``_features.rounding_seed``)
        self.device_step = device_step
        self.row_major = row_major
        self.shapes, self.strides, self.dense = [], [], []
        offsets, numels, total = [], [], 0
        for p in members:
            real = _dtensor.real(p)
            shape, strides, dense = self.placing(real)
            self.shapes.append(shape)
            self.strides.append(strides)
            self.dense.append(dense)
            offsets.append(total)
            numels.append(real.numel())
            total += _aligned(real.numel())
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.numels = np.asarray(numels, dtype=np.int64)
        # Keys whose state is not shaped like the param (``state_shape(key, shape)``: Adafactor's
        # factored second moments; None where a member has no such state) own their layout:
        # key -> (offsets, shapes), contiguous regions.
        self.own_layout = {}
        self.placed: list[dict] = []  # per member: the entries ``_plans._new_segment`` put in its state
        sizes = dict.fromkeys(key_dtypes, total)
        for k in key_dtypes:
            shapes = [
                self.shapes[i] if state_shape is None else state_shape(k, self.shapes[i]) for i in range(len(members))
            ]
            if shapes != self.shapes:
                sizes_k = [0 if s is None else _aligned(int(np.prod(s, dtype=np.int64))) for s in shapes]
                self.own_layout[k] = (np.cumsum([0, *sizes_k[:-1]], dtype=np.int64), shapes)
                sizes[k] = sum(sizes_k)
        self.flat = {k: torch.zeros(sizes[k], dtype=dt, device=self.device) for k, dt in key_dtypes.items()}
        self.scales = {k: torch.zeros(total // QB, dtype=torch.float32, device=self.device) for k in quantized}
        # The narrowest element of the params and states sets the block size (8-bit codes excluded:
        # they are loaded 4 or 8 to a thread).
        self.flat_itemsize = min(
            [self.dtype.itemsize] + [f.dtype.itemsize for k, f in self.flat.items() if k not in self.scales]
        )
        scalar_device = self.device if device_step else torch.device("cpu")
        self.scalars = {k: torch.zeros(len(members), dtype=scalar_dtype(), device=scalar_device) for k in scalar_keys}
        self.scalars_np = {} if device_step else {k: v.numpy() for k, v in self.scalars.items()}
        self.fresh: set[int] = set()  # members whose FRESH state the next launch writes
        self.scratch: dict[str, torch.Tensor] = {}  # flat buffers an algorithm keeps outside ``state`` (Muon)
        self.norm_classes = [_dtensor.norm_class(p) for p in members]  # for clipping across ranks
        self.uniform_norm_class = len(set(self.norm_classes)) <= 1

    def has(self, i: int, key: str) -> bool:
        """Whether member ``i`` keeps state ``key`` (every member does, except in an own layout)."""
        return key not in self.own_layout or self.own_layout[key][1][i] is not None

    def offset(self, i: int, key: str) -> int:
        """Where member ``i``'s region of ``key`` starts in the flat buffer (-1: it has none)."""
        if not self.has(i, key):
            return -1
        return int((self.own_layout[key][0] if key in self.own_layout else self.offsets)[i])

    def key_numel(self, key: str) -> int:
        """Elements of state ``key`` over the members (alignment padding excluded)."""
        if key not in self.own_layout:
            return int(self.numels.sum())
        return sum(int(np.prod(s, dtype=np.int64)) for s in self.own_layout[key][1] if s is not None)

    def placing(self, real: torch.Tensor) -> tuple[tuple, tuple, bool]:
        """(shape, strides, whether addressed in place) of a member as this segment lays it out.
        State regions copy its memory order, so element k of the param, its grad and its state
        share one flat index; a param that is not dense is staged through a contiguous copy
        (``row_major``: a param that is not contiguous, for kernels that need its rows)."""
        dense = is_dense(real) and (real.is_contiguous() or not self.row_major)
        return tuple(real.shape), tuple(real.stride()) if dense else _contiguous_strides(real.shape), dense

    def region(self, i: int, key: str) -> torch.Tensor:
        """Member ``i``'s region of ``key`` in its real dtype and layout."""
        if key in self.own_layout:
            offsets, shapes = self.own_layout[key]
            return self.flat[key].as_strided(shapes[i], _contiguous_strides(shapes[i]), int(offsets[i]))
        return self.flat[key].as_strided(self.shapes[i], self.strides[i], int(self.offsets[i]))

    def view(self, i: int, key: str) -> torch.Tensor:
        """The tensor stored as ``state[member][key]``: shaped like the member (complex if it is)."""
        region = self.region(i, key)
        member = self.members[i]
        return _dtensor.like_param(torch.view_as_complex(region) if member.is_complex() else region, member)

    def scale_region(self, i: int, key: str) -> torch.Tensor:
        """Member ``i``'s scales of the 8-bit state ``key``: ``[rows, blocks per row]``."""
        rows, row = self.shapes[i][0], int(np.prod(self.shapes[i][1:], dtype=np.int64))  # a shard may hold no row
        return self.scales[key].narrow(0, int(self.offsets[i]) // QB, rows * row // QB).view(rows, row // QB)

    def scale_view(self, i: int, key: str) -> torch.Tensor:
        """The tensor stored as ``state[member][key + "_scales"]`` (a DTensor placed like the member)."""
        region, member = self.scale_region(i, key), self.members[i]
        return _dtensor.like_param(region, member, shape=(member.shape[0], region.shape[1]))

    def state_items(self, i: int):
        """(state key, tensor) of member ``i``'s per-element state, as ``state[member]`` shows it."""
        for k in self.tensor_keys:
            if not self.has(i, k):
                continue
            if k in self.scales:
                yield f"{k}_codes", self.view(i, k)
                yield f"{k}_scales", self.scale_view(i, k)
            else:
                yield k, self.view(i, k)


@dataclass
class Launch:
    """One segment's work in one step: which members have grads, and the device tables."""

    seg: Segment
    rows: np.ndarray  # member indices with a grad this step
    all_rows: bool
    tables: Tables | None  # None: the segment's device runs torch's implementation
    fresh: bool = False  # some rows carry FLAG_FRESH: the tables hold for this one step only
    features: Features = field(default_factory=Features)  # AMP, clipping, master weights, ... (per step)
    stage_params: list = field(default_factory=list)  # (member index, buffer)
    stage_grads: list = field(default_factory=list)  # (group position, buffer)
    own_tables: tuple | None = None  # what an algorithm keeps per launch (Adafactor's tables, Muon's lr ratios)
    combine_sums: tuple | None = None  # (``_base._combine_sums``' function or None,), made on first use

    def stage_in(self, grads) -> None:
        """Copy grads (and params) that the kernels cannot address in place into their buffers."""
        for pos, buf in self.stage_grads:
            g = _dtensor.local(grads[pos])  # a lazy conjugate (complex) or negative view resolved by the copy
            (torch.view_as_complex(buf) if g.is_complex() else buf).copy_(g)

    def stage_params_in(self) -> None:
        for i, buf in self.stage_params:
            buf.copy_(_dtensor.real(self.seg.members[i]))

    def stage_params_out(self) -> None:
        for i, buf in self.stage_params:
            _dtensor.real(self.seg.members[i]).copy_(buf)


def launch_tables(launch: Launch, grads, num_warps: int, blocks: int) -> Tables:
    """The device tables of a launch: each member's param and grad address (or a staging buffer
    where the kernels cannot address it in place), its state offset and numel."""
    seg, rows = launch.seg, launch.rows
    n = len(rows)
    p_addr = np.empty(n, dtype=np.int64)
    g_addr = np.empty(n, dtype=np.int64)
    for j, i in enumerate(rows.tolist()):
        p = _dtensor.real(seg.members[i])
        g = _dtensor.local(grads[seg.group_index[i]])
        shape, strides = seg.shapes[i], seg.strides[i]
        if seg.dense[i]:
            p_addr[j] = p.data_ptr()
        else:
            buf = torch.empty_strided(shape, strides, dtype=seg.dtype, device=seg.device)
            launch.stage_params.append((i, buf))
            p_addr[j] = buf.data_ptr()
        if not g.is_conj() and same_layout(_dtensor.real(g), strides):
            g_addr[j] = g.data_ptr()
        else:
            buf = torch.empty_strided(shape, strides, dtype=seg.dtype, device=seg.device)
            launch.stage_grads.append((int(seg.group_index[i]), buf))
            g_addr[j] = buf.data_ptr()
    flags = np.asarray([FLAG_FRESH if i in seg.fresh else 0 for i in rows.tolist()], dtype=np.int64)
    launch.fresh = bool(flags.any())
    block = block_size(num_warps, seg.flat_itemsize)
    return build_tables(p_addr, g_addr, seg.offsets[rows], seg.numels[rows], flags, rows, block, seg.device, blocks)


@dataclass
class Plan:
    """A group's launches, what ``_plans._same_meta`` and the native reads check each step against,
    and what ``_plans._grad_moves`` needs to repoint the launches at new grads."""

    pkey: np.ndarray | None  # the params' (local) addresses; None where one has no storage
    gkey: np.ndarray  # the grads' addresses (-2: no grad, -1: sparse)
    keys: tuple  # the group's signature
    launches: list
    sparse: list  # group positions of params with sparse grads this step
    # Per group position: its launch's index (-1: none) and its row in the launch's tensor table
    # (-1: a staged grad, or no table).
    launch_of: np.ndarray | None = None
    row_of: np.ndarray | None = None
    dense: list | None = None  # the positions with a dense grad; None: all of them
    # (dtype, device, shape, strides) of each param's local shard, then of each dense grad
    meta: list = field(default_factory=list)
    native_meta: tuple | None = None  # ``meta`` as the native reads compare it (``_plans._native_meta``)
    # ``guards(*shards, *dense grads)``: True when they have this plan's metadata (one C++ call; a
    # False is checked again with ``meta``); None where torch lacks the check.
    guards: object = None
    direct: bool = False  # one launch, whose table row j is group position j


class GroupCache:
    __slots__ = ("group", "norm_classes", "plan", "segments", "signature")

    def __init__(self, group) -> None:
        self.group = group
        self.norm_classes: list = []  # distinct norm classes of the group's params, in order
        self.segments: dict = {}
        self.plan: Plan | None = None
        self.signature: tuple | None = None
