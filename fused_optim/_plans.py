"""Cached plans: each group's segments, launches and device tables, rebuilt only when needed.

Phase 1 of every ``step()``: for each param group, the cached plan if the params' and grads'
storages, the group's options and the state are unchanged and every param and grad keeps the
dtype, device, shape and strides the plan was checked with (or only grads moved: the tables are
repointed), else the group is checked in full (raising before any param changes) and its
segments and plan are rebuilt, adopting whatever the state now holds.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _dtensor, _native
from ._fallback import uses_triton, warn_fallback
from ._features import rounding_seed
from ._quant import CODES, dequantize, quantize_into
from ._segments import (
    GroupCache,
    Launch,
    Plan,
    Segment,
    as_float,
    is_dense_grad,
    launch_tables,
    real_dtype,
    same_layout,
)
from ._state import ParamState, TrackedState
from .kernels import _tables

_data_ptr = torch.Tensor.data_ptr
_no_subclass_dispatch = torch._C.DisableTorchFunctionSubclass


class PlansMixin:
    """The plan cache of ``FusedOptimizer`` (``self._caches``: group index -> ``GroupCache``)."""

    def _plans(self):
        """A checked plan for every group, rebuilt where the cache misses: [(plan, grads, pkey, gkey)]."""
        if not isinstance(self.state, TrackedState) or self.state._tracker is not self._tracker:
            self._reset_engine()  # the state container itself was replaced
        moves = []  # (plan, gkey, what _grad_moves returned): grads that moved, applied below
        work = [self._prepare(i, group, moves) for i, group in enumerate(self.param_groups)]
        rebuild = self._tracker.dirty or any(plan is None for plan, _, _, _ in work)
        capture = _tables.capturing()
        if capture:
            self._check_capture(rebuild)  # before anything changes
        moved = {}
        for plan, gkey, launch_moves in moves:
            for launch, rows, addrs in launch_moves:
                _tables.repoint_grads(launch.tables, rows, addrs)
                moved[id(launch.tables)] = launch.tables
            plan.gkey = gkey
        if rebuild:
            self._rebuild(work)
        for plan, *_ in work:
            for launch in plan.launches:
                tables = launch.tables
                if tables is None:
                    continue
                if capture:  # the graph writes every grad address it reads, at every replay
                    _tables.write_in_graph(tables)
                    self._graph_launches[id(tables)] = launch  # kept alive: tables, state buffers
                elif tables.graph_written or id(tables) in moved:
                    _tables.upload(tables)
        return work

    def _check_capture(self, rebuild: bool) -> None:
        """The CUDA graph capture contract (README, "CUDA graphs"): a captured step allocates no
        table and copies nothing from the host, so its plan must exist before capture."""
        name = type(self).__name__
        if rebuild:
            raise RuntimeError(
                f"fused_optim.{name}.step() is being captured in a CUDA graph but has to build its launch "
                "tables first (first step, new params or options, grads that appeared, vanished or changed "
                "dtype, shape or layout, a state that was loaded or replaced). Warm up with two eager steps on "
                "the same params, grads and options before capturing."
            )
        for cache in self._caches.values():
            for seg in cache.segments.values():
                if seg.scalars_np:
                    raise RuntimeError(
                        f"Attempting CUDA graph capture of step() for an instance of {name} but param_groups' "
                        "capturable is False."
                    )
                if seg.stochastic and not seg.device_step:
                    raise NotImplementedError(
                        f"fused_optim.{name}: stochastic_rounding inside a CUDA graph needs device step counts "
                        "(capturable=True); without them every replay would draw the same random bits"
                    )

    def _prepare(self, index: int, group, moves: list):
        """(cached plan or None, grads, pkey, gkey) for one group; validates whenever the cache
        misses. Grads that moved since the plan was made are added to ``moves``, not applied."""
        self._check_options(group)
        params = group["params"]
        cache = self._caches.get(index)
        plan = cache.plan if cache is not None and cache.group is group else None
        pkey, gkey, grads, shards = _shards(params, plan)
        cached = plan is not None and not self._tracker.dirty and _same_key(plan.pkey, pkey)
        if (
            cached
            and plan.keys == self._signature(group)
            and (shards is True or _same_meta(plan, params, shards, grads, gkey))
        ):
            if not _same_key(plan.gkey, gkey):
                moves.append((plan, gkey, _grad_moves(plan, gkey)))
            return plan, grads, pkey, gkey
        self._validate(index, group, grads)
        return None, grads, pkey, gkey

    def _rebuild(self, work) -> None:
        relayout = self._tracker.dirty
        for index, (group, (plan, grads, pkey, gkey)) in enumerate(zip(self.param_groups, work)):
            if plan is None or relayout:
                self._layout(index, group, grads)
                fresh = self._caches[index].plan = self._plan(index, group, grads, pkey, gkey)
                work[index] = (fresh, grads, pkey, gkey)
        self._tracker.dirty = False

    def _layout(self, index: int, group, grads, everyone: bool = False) -> None:
        """(Re)build the segments of a group: its members are the params with a dense grad or with
        state (or all of them, ``everyone``). Params whose state torch keeps sparse (SGD's momentum
        after sparse grads) stay outside, with torch's own tensors."""
        cache = self._caches.get(index)
        if cache is None or cache.group is not group:
            cache = self._caches[index] = GroupCache(group)
        signature = self._signature(group)
        params = group["params"]
        members: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            grad = grads[i] if grads is not None else None
            state = self.state.get(p)
            sparse_state = state and any(
                isinstance(v, torch.Tensor) and v.layout != torch.strided for v in state.values()
            )
            if everyone or is_dense_grad(grad) or (state and not sparse_state):
                members.setdefault((p.device, real_dtype(p.dtype), self._quantizes(p)), []).append(i)
        segments = {}
        for ordinal, (key, positions) in enumerate(members.items()):
            seg = cache.segments.get(key)
            same = (
                seg is not None
                and (not self._tracker.dirty or self._still_placed(seg, group))
                and cache.signature == signature
                and len(seg.members) == len(positions)
                and all(m is params[i] for m, i in zip(seg.members, positions))
                and all(
                    seg.placing(_dtensor.real(m)) == place
                    for m, place in zip(seg.members, zip(seg.shapes, seg.strides, seg.dense))
                )
            )
            if not same:
                seg = self._new_segment((index, ordinal), group, key, [params[i] for i in positions], positions)
            segments[key] = seg
        cache.segments = segments
        cache.norm_classes = list(dict.fromkeys(map(_dtensor.norm_class, params)))
        cache.signature = signature
        cache.plan = None

    def _still_placed(self, seg: Segment, group) -> bool:
        """After a write into the state (the tracker is dirty): whether ``seg``'s flat buffers still
        hold the truth, every member's state showing the views the segment placed there (other
        keys may have come and gone), and step counts living where they did. Then the segment is
        kept, and tensors fetched from the state stay live (and shared, after ``share_memory()``)."""
        return seg.device_step == self._device_steps(group) and all(
            all(dict.get(self.state.get(m) or {}, k) is v for k, v in placed.items())
            for m, placed in zip(seg.members, seg.placed)
        )

    def _new_segment(self, place: tuple[int, int], group, key, members, positions) -> Segment:
        """A segment whose flat state starts from what ``self.state`` (or a checkpoint being loaded)
        holds for its members, initialized as torch would where it holds nothing. ``place``: the
        group's index and the segment's, in the order its params first appear in the group."""
        _, dtype, quantized = key
        key_dtypes = self._key_dtypes(group, dtype, quantized)
        fresh_keys = self._fresh_keys(group)
        stochastic = self.options["stochastic_rounding"] and dtype == torch.bfloat16
        seg = Segment(
            key, members, positions, key_dtypes, self._scalar_state, self._device_steps(group), stochastic,
            state_shape=lambda k, shape: self._state_shape(group, k, shape), row_major=self._row_major,
            quantized=tuple(k for k in key_dtypes if quantized and k in CODES),
        )  # fmt: skip
        seg.seed = rounding_seed(self.options["rounding_seed"], *place, dtype)
        scalar_values = {k: [] for k in self._scalar_state}
        tracker = self._tracker
        for i, p in enumerate(members):
            old = self.state.get(p) or {}
            source = self._loaded.get(id(p), old)  # a loaded checkpoint, before torch cast it
            for k in key_dtypes:
                if not seg.has(i, k):
                    continue
                src = _source(source, k)
                if k in seg.scales:  # 8-bit: its codes and scales, or the values quantized
                    codes, scales = seg.region(i, k), seg.scale_region(i, k)
                    if isinstance(src, tuple) and same_layout(_dtensor.local(src[0]), codes.stride()):
                        codes.copy_(_dtensor.local(src[0]))  # blocks of the same elements: as they are
                        scales.copy_(_dtensor.local(src[1]))
                        continue
                    if isinstance(src, tuple):  # codes in another memory order: other blocks
                        src = dequantize(*src, CODES[k])
                    if src is None and k in fresh_keys:
                        seg.fresh.add(i)
                        continue
                    if src is None:
                        src = torch.empty_like(codes, dtype=torch.float32)
                        self._init_region(group, k, src, p)
                    quantize_into(codes, scales, src, CODES[k])
                    continue
                region = seg.region(i, k)
                if isinstance(src, tuple):  # 8-bit codes and scales into a wider state
                    src = dequantize(*src, CODES[k])
                if (
                    k == "master_param"
                    and src is not None
                    and not torch.equal(_dtensor.local(src).to(p.dtype), _dtensor.local(p))
                ):
                    src = None  # stale: the param moved on without it (trained by torch, or without master weights)
                if src is not None:
                    region.copy_(_dtensor.real(src.to_dense() if src.layout != torch.strided else src))
                elif k == "master_param":
                    region.copy_(_dtensor.real(p))
                elif k in fresh_keys:
                    seg.fresh.add(i)  # the kernel writes it on this param's first step
                else:
                    self._init_region(group, k, region, p)
            for k, initial in self._initial_scalars(group).items():
                scalar_values[k].append(as_float(source[k]) if k in source else initial)
            placed = {k: seg.scalars[k][i] for k in self._scalar_state}
            placed.update(seg.state_items(i))
            seg.placed.append(placed)
            new = ParamState(tracker, placed)
            replaced = {name for k in key_dtypes for name in (k, f"{k}_codes", f"{k}_scales")}
            for k, v in old.items():  # keep keys this configuration does not use
                if k not in new and k not in replaced:
                    dict.__setitem__(new, k, v)
            if new:  # no empty entries: torch.optim.SGD without momentum keeps no state at all
                dict.__setitem__(self.state, p, new)
        for k, values in scalar_values.items():
            seg.scalars[k].copy_(torch.tensor(values, dtype=seg.scalars[k].dtype))
        return seg

    def _plan(self, index: int, group, grads, pkey, gkey) -> Plan:
        launches = []
        for seg in self._caches[index].segments.values():
            rows = np.asarray([i for i, g in enumerate(seg.group_index) if is_dense_grad(grads[g])], dtype=np.int64)
            if len(rows) == 0:
                continue
            launch = Launch(seg, rows, len(rows) == len(seg.members), None)
            if uses_triton(seg.device):
                launch.tables = launch_tables(launch, grads, self._num_warps, self._blocks_per_program)
            else:
                warn_fallback(seg.device)
            launches.append(launch)
        # Sparse grads (where the algorithm allows them) take torch's own code, param by param.
        sparse = [i for i, g in enumerate(grads) if g is not None and g.layout != torch.strided]
        # For grads that move later (_grad_moves): each position's launch and its row in the tensor
        # table (-1: staged or no table).
        launch_of = np.full(len(grads), -1, dtype=np.int64)
        row_of = np.full(len(grads), -1, dtype=np.int64)
        for index, launch in enumerate(launches):
            staged = {pos for pos, _ in launch.stage_grads}
            positions = launch.seg.group_index[launch.rows]
            launch_of[positions] = index
            if launch.tables is not None:
                row_of[positions] = np.where(np.isin(positions, list(staged)), -1, np.arange(len(positions)))
        # What every later step compares with (_same_meta): the param shards and dense grads
        shards = list(map(_dtensor.local, group["params"]))
        dense = [i for i, g in enumerate(grads) if is_dense_grad(g)]
        checked = [*shards, *(grads[i] for i in dense)]
        return Plan(
            pkey, gkey, self._signature(group), launches, sparse,
            launch_of=launch_of, row_of=row_of, dense=None if len(dense) == len(grads) else dense,
            meta=list(map(_meta, checked)), native_meta=_native_meta(shards, grads, dense), guards=guards(checked),
            direct=len(launches) == 1 and launches[0].tables is not None and (row_of == np.arange(len(grads))).all(),
        )  # fmt: skip


def _source(state: dict, key: str):
    """What ``state`` holds for ``key``: a tensor, (codes, scales) of an 8-bit state, or None."""
    if key in state:
        return state[key]
    codes, scales = state.get(f"{key}_codes"), state.get(f"{key}_scales")
    return None if codes is None or scales is None else (codes, scales)


def _shards(params, plan: Plan | None = None) -> tuple[np.ndarray | None, np.ndarray, list, list | bool | None]:
    """(pkey, gkey, grads, shards): the params' storage key (their local shards' addresses; None
    where one has no storage), the grads' key (their addresses; -2: no grad, -1: sparse), the grads
    as the kernels read them (local shards of DTensor grads), and True where the native reads
    found every param and grad with the metadata ``plan`` was checked with (``Plan.native_meta``),
    else what ``_same_meta`` checks them with: the params' shards (the Python reads) or None (the
    native reads, which did not find them so). In one C++ call where ``_native`` is built, else in
    Python."""
    native = _native.module()
    if native is not None:
        n = len(params)
        pkey, gkey = np.empty(n, np.int64), np.empty(n, np.int64)
        local = bool(params) and _dtensor.is_dtensor(params[0])
        if plan is not None and plan.native_meta is not None and len(plan.gkey) == n:
            out = native.scan(params, local, pkey, gkey, plan.gkey, *plan.native_meta)
        else:
            out = native.scan(params, local, pkey, gkey)
        if out is not None:
            grads, same = out
            return pkey, gkey, grads, same or None
    pkey, grads, shards = _python_shards(params)
    try:
        gkey = np.fromiter(map(_data_ptr, grads), np.int64, len(grads))  # fails on a None or sparse grad
    except (TypeError, RuntimeError):
        gkey = [-2 if g is None else -1 if g.layout != torch.strided else g.data_ptr() for g in grads]
        gkey = np.array(gkey, np.int64)
    return pkey, gkey, grads, shards


def _python_shards(params) -> tuple[np.ndarray | None, list, list]:
    """``_shards``' pkey and grads, and the params' local shards, one attribute at a time."""
    with _no_subclass_dispatch():  # a DTensor's attributes, without its __torch_function__
        grads = [p.grad for p in params]
    if params and _dtensor.is_dtensor(params[0]):
        try:  # a group of DTensor params with DTensor grads (FSDP2): read in bulk
            shards = [p._local_tensor for p in params]
            pkey = np.fromiter(map(_data_ptr, shards), np.int64, len(params))
            return pkey, [g._local_tensor for g in grads], shards
        except AttributeError:  # a plain param or a missing grad among them: one by one
            pass
    try:
        pkey = np.fromiter(map(_data_ptr, params), np.int64, len(params))
    except RuntimeError:
        pkey = None
    if pkey is not None and not pkey.all():  # a DTensor (data_ptr 0), or an empty tensor
        shards = [_dtensor.local(p) for p in params]
        pkey = np.fromiter(map(_data_ptr, shards), np.int64, len(params))
        return pkey, [None if g is None else _dtensor.local(g) for g in grads], shards
    return pkey, grads, params


def _same_key(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return a is b or (a is not None and b is not None and a.shape == b.shape and bool((a == b).all()))


def _same_meta(plan: Plan, params: list, shards: list | None, grads: list, gkey: np.ndarray) -> bool:
    """Whether every param (its local shard) and grad still has the dtype, device, shape and
    strides of those ``plan`` was checked with, so that every check and layout decision still
    holds: a param reshaped in place keeps its address, and so may its grad (and a grad that moved
    may be another tensor altogether). A grad that appeared, vanished or turned sparse: False.
    In one C++ call (TorchDynamo's ``TensorGuards``), or, where it says no (or inside a
    TorchDispatchMode, whose dispatch key it sees), one tensor at a time."""
    old = plan.gkey
    if len(gkey) != len(old) or (((old <= 0) | (gkey <= 0)) & (old != gkey)).any():  # -2: none, -1: sparse
        return False
    shards = list(map(_dtensor.local, params)) if shards is None else shards
    checked = [*shards, *(grads if plan.dense is None else [grads[i] for i in plan.dense])]
    if plan.guards is not None and plan.guards(*checked):
        return True
    return all(not t.is_conj() and not t.is_neg() and _meta(t) == m for t, m in zip(checked, plan.meta))


def _grad_moves(plan: Plan, gkey: np.ndarray) -> list:
    """The cached plan with only grad storage changed (autograd allocated new grads, as after
    ``zero_grad(set_to_none=True)`` when the allocator hands out other addresses; FSDP2's
    reduce-scatter outputs at every step), each grad checked by ``_same_meta`` or the native reads:
    the tables' rows to point at the new grads, [(launch, rows, addresses)]; the rest is kept."""
    old, new = plan.gkey, gkey
    changed = np.flatnonzero(old != new)
    if plan.direct:  # one launch, whose table rows are the group's positions in order
        return [(plan.launches[0], changed, new[changed])]
    moves = []
    for index, launch in enumerate(plan.launches):
        at = changed[plan.launch_of[changed] == index]
        rows = plan.row_of[at]
        table = rows >= 0  # torch's implementation, or a staging copy, reads the grad where it is now
        if table.any():
            moves.append((launch, rows[table], new[at[table]]))
    return moves


def _meta(t) -> tuple:
    return t.dtype, t.device, t.shape, t.stride()


def _native_meta(shards: list, grads: list, dense: list) -> tuple[np.ndarray, np.ndarray] | None:
    """The metadata of the param shards and dense grads a plan was checked with, as the native
    reads compare them: (a code per param, then per grad; a table of the distinct shapes); None
    without the native reads."""
    native = _native.module()
    if native is None:
        return None
    described = [*shards, *[None] * len(grads)]
    for i in dense:
        described[len(shards) + i] = grads[i]
    codes = np.empty(len(described), np.int64)
    return codes, np.frombuffer(native.describe(described, codes), np.int64)


def _tensor_guards():
    """TorchDynamo's C++ tensor check (``TensorGuards``: dispatch keys, dtype, device, shape and
    strides of many tensors in one call), if this torch has it and it answers as expected."""
    try:
        from torch._C._dynamo.guards import TensorGuards

        a = torch.zeros(4)
        check = TensorGuards(a, dynamic_dims_sizes=[[4]], dynamic_dims_strides=[[1]]).check
        others = (torch.zeros(5), torch.zeros(4, dtype=torch.float64), torch.zeros(8)[::2], None)
        if check(torch.ones(4)) and not any(check(t) for t in others):
            return TensorGuards
    except (ImportError, AttributeError, TypeError, RuntimeError):
        pass
    return None


_TensorGuards = _tensor_guards()


def guards(tensors):
    """A function telling, in one C++ call, whether its arguments have the dispatch keys, dtype,
    device, shape and strides of ``tensors`` (dense tensors); None where torch lacks the check."""
    if _TensorGuards is None:
        return None
    sizes, strides = [list(t.shape) for t in tensors], [list(t.stride()) for t in tensors]
    return _TensorGuards(*tensors, dynamic_dims_sizes=sizes, dynamic_dims_strides=strides).check
