"""Cached plans: each group's segments, launches and device tables, rebuilt only when needed.

Phase 1 of every ``step()``: for each param group, the cached plan if the params' and grads'
storages, the group's options and the state are unchanged (or only grads moved: the tables are
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
from ._segments import GroupCache, Launch, Plan, Segment, as_float, is_dense_grad, launch_tables, real_dtype
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
        pkey, gkey, grads, checked = _shards(params, plan)
        cached = plan is not None and not self._tracker.dirty and _same_key(plan.pkey, pkey)
        if cached and plan.keys == self._signature(group):
            if _same_key(plan.gkey, gkey):
                return plan, grads, pkey, gkey
            launch_moves = _grad_moves(plan, grads, gkey, checked)
            if launch_moves is not None:
                moves.append((plan, gkey, launch_moves))
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
                and not self._tracker.dirty
                and cache.signature == signature
                and len(seg.members) == len(positions)
                and all(m is params[i] for m, i in zip(seg.members, positions))
                and all(
                    _dtensor.real(m).stride() == st or not d for m, st, d in zip(seg.members, seg.strides, seg.dense)
                )
            )
            if not same:
                seg = self._new_segment((index, ordinal), group, key, [params[i] for i in positions], positions)
            segments[key] = seg
        cache.segments = segments
        cache.norm_classes = list(dict.fromkeys(map(_dtensor.norm_class, params)))
        cache.signature = signature
        cache.plan = None

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
                    if isinstance(src, tuple):
                        codes.copy_(_dtensor.local(src[0]))
                        scales.copy_(_dtensor.local(src[1]))
                        continue
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
            new = ParamState(tracker)
            for k in self._scalar_state:
                dict.__setitem__(new, k, seg.scalars[k][i])
            for k, v in seg.state_items(i):
                dict.__setitem__(new, k, v)
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
        # table (-1: staged or no table), and the metadata of the grad this plan was checked with.
        launch_of = np.full(len(grads), -1, dtype=np.int64)
        row_of = np.full(len(grads), -1, dtype=np.int64)
        meta = [None] * len(grads)
        for index, launch in enumerate(launches):
            staged = {pos for pos, _ in launch.stage_grads}
            positions = launch.seg.group_index[launch.rows]
            launch_of[positions] = index
            if launch.tables is not None:
                row_of[positions] = np.where(np.isin(positions, list(staged)), -1, np.arange(len(positions)))
            for pos in positions.tolist():
                g = grads[pos]
                meta[pos] = (g.dtype, g.device, g.shape, g.stride())
        return Plan(
            pkey, gkey, self._signature(group), launches, sparse,
            launch_of=launch_of, row_of=row_of, meta=meta, native_meta=_native_meta(grads, meta),
            guards=grad_guards(grads) if all(m is not None for m in meta) else None,
            direct=len(launches) == 1 and launches[0].tables is not None and (row_of == np.arange(len(grads))).all(),
        )  # fmt: skip


def _source(state: dict, key: str):
    """What ``state`` holds for ``key``: a tensor, (codes, scales) of an 8-bit state, or None."""
    if key in state:
        return state[key]
    codes, scales = state.get(f"{key}_codes"), state.get(f"{key}_scales")
    return None if codes is None or scales is None else (codes, scales)


def _shards(params, plan: Plan | None = None) -> tuple[np.ndarray | None, np.ndarray, list, bool]:
    """(pkey, gkey, grads, checked): the params' storage key (their local shards' addresses; None
    where one has no storage), the grads' key (their addresses; -2: no grad, -1: sparse), the grads
    as the kernels read them (local shards of DTensor grads) and whether every grad that moved since
    ``plan`` was made still has the dtype, device, shape and strides of the grad the plan was
    checked with (``Plan.native_meta``). In one C++ call where ``_native`` is built, else in Python
    (which leaves the moved grads to ``_grad_moves``' checks)."""
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
            return pkey, gkey, *out
    pkey, grads = _python_shards(params)
    try:
        gkey = np.fromiter(map(_data_ptr, grads), np.int64, len(grads))  # fails on a None or sparse grad
    except (TypeError, RuntimeError):
        gkey = [-2 if g is None else -1 if g.layout != torch.strided else g.data_ptr() for g in grads]
        gkey = np.array(gkey, np.int64)
    return pkey, gkey, grads, False


def _python_shards(params) -> tuple[np.ndarray | None, list]:
    """``_shards``' pkey and grads, one attribute at a time."""
    with _no_subclass_dispatch():  # a DTensor's attributes, without its __torch_function__
        grads = [p.grad for p in params]
    if params and _dtensor.is_dtensor(params[0]):
        try:  # a group of DTensor params with DTensor grads (FSDP2): read in bulk
            pkey = np.fromiter(map(_data_ptr, [p._local_tensor for p in params]), np.int64, len(params))
            return pkey, [g._local_tensor for g in grads]
        except AttributeError:  # a plain param or a missing grad among them: one by one
            pass
    try:
        pkey = np.fromiter(map(_data_ptr, params), np.int64, len(params))
    except RuntimeError:
        pkey = None
    if pkey is not None and not pkey.all():  # a DTensor (data_ptr 0), or an empty tensor
        pkey = np.array([_data_ptr(_dtensor.local(p)) for p in params], np.int64)
        grads = [None if g is None else _dtensor.local(g) for g in grads]
    return pkey, grads


def _same_key(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return a is b or (a is not None and b is not None and a.shape == b.shape and bool((a == b).all()))


def _grad_moves(plan: Plan, grads, gkey: np.ndarray, checked: bool = False) -> list | None:
    """The cached plan with only grad storage changed (autograd allocated new grads, as after
    ``zero_grad(set_to_none=True)`` when the allocator hands out other addresses; FSDP2's
    reduce-scatter outputs at every step): the tables' rows to point at the new grads,
    [(launch, rows, addresses)]; the rest is kept. Every grad must match
    the one the plan was checked with in dtype, device, shape and strides, so every check and
    layout decision still holds. Otherwise (a grad appeared, vanished, turned sparse or changed)
    None: the full check then runs and raises where torch would. ``checked``: the native reads
    found every moved grad like the plan's (``_shards``)."""
    if len(gkey) != len(plan.gkey):
        return None
    old, new = plan.gkey, gkey
    changed = np.flatnonzero(old != new)
    if not checked:  # by the native reads (which refuse the cases below): here
        if (old[changed] <= 0).any() or (new[changed] <= 0).any():  # -2: no grad, -1: sparse, 0: empty
            return None
        # TorchDynamo's C++ check; where it says no (or inside a TorchDispatchMode, whose dispatch
        # key it sees), the exact check one grad at a time decides
        if not (plan.guards is not None and plan.guards(*grads)) and not _same_grads(plan, grads, changed):
            return None
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


def _same_grads(plan: Plan, grads, changed: np.ndarray) -> bool:
    """``_grad_moves``' check, one moved grad at a time."""
    for i in changed.tolist():
        g, meta = grads[i], plan.meta[i]
        if meta is None or g.is_conj() or g.is_neg() or (g.dtype, g.device, g.shape, g.stride()) != meta:
            return False
    return True


def _native_meta(grads, meta: list) -> tuple[np.ndarray, np.ndarray] | None:
    """The metadata of the grads a plan was checked with (``meta`` not None) as the native reads
    compare moved grads with it: (a code per grad, a table of the distinct shapes); None without
    the native reads."""
    native = _native.module()
    if native is None:
        return None
    codes = np.empty(len(grads), np.int64)
    table = native.describe([g if m is not None else None for g, m in zip(grads, meta)], codes)
    return codes, np.frombuffer(table, np.int64)


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


def grad_guards(grads):
    """A function telling, in one C++ call, whether its arguments have the dtype, device, shape
    and strides of ``grads`` (dense tensors); None where torch lacks the check."""
    if _TensorGuards is None:
        return None
    sizes, strides = [list(g.shape) for g in grads], [list(g.stride()) for g in grads]
    return _TensorGuards(*grads, dynamic_dims_sizes=sizes, dynamic_dims_strides=strides).check
