"""FusedOptimizer: the segment engine shared by every fused algorithm.

A *segment* is the params of one param group that share device and (real) dtype. Per segment the
optimizer owns one flat buffer per state key; ``state[p][key]`` is a view into it, with ``p``'s
shape and strides, so ``state_dict()`` has torch's layout and a checkpoint moves both ways between
torch.optim and fused_optim. Step counts live in one flat CPU buffer per segment, and
``state[p]["step"]`` is a 0-dim view into it: advancing 1,000 steps is one tensor op instead of
1,000 (``torch._foreach_add_`` over 1,000 CPU scalars takes about a millisecond).

Each ``step()`` runs one kernel launch per segment. Its device tables (param/grad addresses, state
offsets, blocks) are cached in a *plan* keyed on the params' and grads' storage addresses, so a
steady training loop rebuilds nothing and copies nothing to the device. Everything that can fail
(sparse grads, unsupported dtypes, options, malformed state) is checked for every group before the
first param of any group changes.
"""

from __future__ import annotations

import inspect
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch.optim import Optimizer

from .kernels import INTERPRETED
from .kernels._features import Features
from .kernels._tables import ALIGN, FLAG_FRESH, VEC_BYTES, Tables, block_size, build_tables, scalar_table

__all__ = ["FusedOptimizer", "call_torch", "check_like_torch"]

_data_ptr = torch.Tensor.data_ptr
_MISSING = object()
_REAL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_COMPLEX_DTYPES = {torch.complex64: torch.float32, torch.complex128: torch.float64}


# --------------------------------------------------------------------------------------------
# State containers that notice replaced entries.
#
# The flat buffers hold the truth only while state[p][key] is our view. Checking that for every
# param on every step would cost more than the rest of step() together, so the containers flag
# writes instead: an entry replaced, deleted or added marks the optimizer dirty, and the next step
# copies whatever the state now holds into fresh flat buffers. They pickle and deepcopy as plain
# dicts, so a saved state_dict never needs fused_optim to load.
# --------------------------------------------------------------------------------------------
class _Tracker:
    __slots__ = ("dirty",)

    def __init__(self) -> None:
        self.dirty = False


class _ParamState(dict):
    __slots__ = ("_tracker",)

    def __init__(self, tracker: _Tracker, *args, **kwargs) -> None:
        dict.__init__(self, *args, **kwargs)
        self._tracker = tracker

    def __setitem__(self, key, value) -> None:
        if dict.get(self, key, _MISSING) is not value:
            self._tracker.dirty = True
        dict.__setitem__(self, key, value)

    def __delitem__(self, key) -> None:
        self._tracker.dirty = True
        dict.__delitem__(self, key)

    def _changed(method):  # a decorator for the methods below
        def wrapper(self, *args, **kwargs):
            self._tracker.dirty = True
            return method(self, *args, **kwargs)

        return wrapper

    clear = _changed(dict.clear)
    pop = _changed(dict.pop)
    popitem = _changed(dict.popitem)
    setdefault = _changed(dict.setdefault)
    update = _changed(dict.update)
    __ior__ = _changed(dict.__ior__)
    del _changed

    def __reduce__(self):
        return (dict, (dict(self),))


class _TrackedState(defaultdict):
    def __init__(self, tracker: _Tracker, items=()) -> None:
        super().__init__(None)
        self._tracker = tracker
        for key, value in dict(items).items():
            dict.__setitem__(self, key, value if isinstance(value, _ParamState) else _ParamState(tracker, value))

    def __missing__(self, key):
        value = _ParamState(self._tracker)
        dict.__setitem__(self, key, value)
        return value

    def __setitem__(self, key, value) -> None:
        self._tracker.dirty = True
        if not isinstance(value, _ParamState) and isinstance(value, dict):
            value = _ParamState(self._tracker, value)
        dict.__setitem__(self, key, value)

    def __delitem__(self, key) -> None:
        self._tracker.dirty = True
        dict.__delitem__(self, key)

    def clear(self) -> None:
        self._tracker.dirty = True
        dict.clear(self)

    def pop(self, *args):
        self._tracker.dirty = True
        return dict.pop(self, *args)

    def update(self, *args, **kwargs) -> None:
        self._tracker.dirty = True
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __reduce__(self):
        return (defaultdict, (dict,), None, None, iter((k, dict(v)) for k, v in self.items()))


# --------------------------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------------------------
def _real(t: torch.Tensor) -> torch.Tensor:
    """Complex tensors are updated as their real view, as torch.optim does."""
    return torch.view_as_real(t) if t.is_complex() else t


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return _COMPLEX_DTYPES.get(dtype, dtype)


def _layout_dims(shape, strides):
    return sorted((st, sz) for sz, st in zip(shape, strides) if sz != 1)


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive slots in some order."""
    if t.is_contiguous() or t.numel() == 0:
        return True
    expected = 1
    for stride, size in _layout_dims(t.shape, t.stride()):
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


def _same_layout(t: torch.Tensor, strides) -> bool:
    """``t`` is dense and visits elements in the same memory order as a region with ``strides``."""
    return _is_dense(t) and _layout_dims(t.shape, t.stride()) == _layout_dims(t.shape, strides)


def _is_dense_grad(g) -> bool:
    return g is not None and g.layout == torch.strided


def _as_float(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _scalar_dtype() -> torch.dtype:
    # torch.optim keeps step counts in float32, or float64 when that is the default dtype.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class _Segment:
    """Params of one group with one device and real dtype, and the flat state they own."""

    def __init__(self, key, members: list[torch.Tensor], group_index: list[int], tensor_keys, scalar_keys):
        self.device, self.dtype = key
        self.members = members
        self.group_index = np.asarray(group_index, dtype=np.int64)  # position of each member in the group
        self.tensor_keys = tuple(tensor_keys)
        self.shapes, self.strides, self.dense = [], [], []
        offsets, numels, total = [], [], 0
        for p in members:
            real = _real(p)
            dense = _is_dense(real)
            self.shapes.append(tuple(real.shape))
            # State regions copy p's memory order, so element k of p, its grad and its state
            # share one flat index; a param that is not dense is staged through a contiguous copy.
            self.strides.append(tuple(real.stride()) if dense else _contiguous_strides(real.shape))
            self.dense.append(dense)
            offsets.append(total)
            numels.append(real.numel())
            total += -(-real.numel() // ALIGN) * ALIGN
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.numels = np.asarray(numels, dtype=np.int64)
        self.flat = {k: torch.zeros(total, dtype=self.dtype, device=self.device) for k in self.tensor_keys}
        # The narrowest element of the params and states sets the block size.
        self.flat_itemsize = min([self.dtype.itemsize] + [f.dtype.itemsize for f in self.flat.values()])
        self.scalars = {k: torch.zeros(len(members), dtype=_scalar_dtype()) for k in scalar_keys}
        self.fresh: set[int] = set()  # members whose FRESH state the next launch writes
        self.scalars_np = {k: v.numpy() for k, v in self.scalars.items()}

    def region(self, i: int, key: str) -> torch.Tensor:
        """Member ``i``'s region of ``key`` in its real dtype and layout."""
        return self.flat[key].as_strided(self.shapes[i], self.strides[i], int(self.offsets[i]))

    def view(self, i: int, key: str) -> torch.Tensor:
        """The tensor stored as ``state[member][key]``: shaped and typed like the member."""
        region = self.region(i, key)
        return torch.view_as_complex(region) if self.members[i].is_complex() else region


@dataclass
class _Launch:
    """One segment's work in one step: which members have grads, and the device tables."""

    seg: _Segment
    rows: np.ndarray  # member indices with a grad this step
    all_rows: bool
    rows_t: torch.Tensor | None
    tables: Tables | None  # None: the segment's device runs torch's implementation
    fresh: bool = False  # some rows carry FLAG_FRESH: the tables hold for this one step only
    features: Features = field(default_factory=Features)  # AMP, clipping, master weights, ... (per step)
    stage_params: list = field(default_factory=list)  # (member index, buffer)
    stage_grads: list = field(default_factory=list)  # (group position, buffer)


@dataclass
class _Plan:
    pkey: tuple
    gkey: tuple
    keys: tuple
    launches: list
    sparse: list  # group positions of params with sparse grads this step


class _GroupCache:
    __slots__ = ("group", "plan", "segments")

    def __init__(self, group) -> None:
        self.group = group
        self.segments: dict = {}
        self.plan: _Plan | None = None


_warned_fallback = False


def _warn_fallback(device: torch.device) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"fused_optim: parameters on {device.type} run through torch.optim's own implementation "
            "(the Triton kernels need CUDA, or TRITON_INTERPRET=1 set before importing fused_optim "
            "to run them on CPU through Triton's interpreter).",
            stacklevel=4,
        )


def check_like_torch(torch_cls, **kwargs) -> None:
    """Run ``torch_cls``'s own argument checks, raising its errors with its messages for the
    installed torch version, by building it over a placeholder parameter. Arguments that this
    torch version does not know are left out."""
    accepted = inspect.signature(torch_cls.__init__).parameters
    torch_cls([torch.zeros(0, requires_grad=True)], **{k: v for k, v in kwargs.items() if k in accepted})


def call_torch(fn, *args, **kwargs):
    """Call a torch.optim functional with the keyword arguments the installed torch knows. One it
    does not know is dropped when left at its off value (False, None, 0); otherwise this raises
    rather than compute something else."""
    accepted = inspect.signature(fn).parameters
    for key in [k for k in kwargs if k not in accepted]:
        if kwargs.pop(key):
            raise NotImplementedError(f"this torch's {fn.__name__} has no {key!r}, needed here")
    return fn(*args, **kwargs)


class FusedOptimizer(Optimizer):
    """Base class of the fused optimizers; subclasses describe one algorithm.

    A subclass provides:

    * ``_torch_cls``: its torch.optim counterpart, whose own checks validate the arguments
      (``check_like_torch``), so errors and messages match the installed torch;
    * ``_tensor_state_keys(group)``: the per-element state keys, in torch's order;
    * ``_scalar_state``: per-parameter scalar state kept on the host and its initial value
      (``{"step": 0.0}``), advanced by ``_advance_scalars``;
    * ``_step_scalars(group, scalars)``: the ``_n_step_scalars`` kernel scalars that depend on a
      parameter's scalar state (bias corrections), in float64 as torch's single-tensor code
      computes them;
    * ``_launch(group, launch, step_scalars)``: the kernel launch for one segment;
    * ``_reference(group, params, grads, states, fresh)``: torch's own implementation, for
      devices the kernels cannot run on, and for sparse gradients where ``_sparse_ok``;
    * ``_sparse_error``: torch's message for sparse gradients.

    Optional: ``_init_region`` (initial state values, zeros by default), ``_fresh_keys`` (state
    that torch creates from the first gradient: the kernel writes it on the first step, told by
    the FRESH flag), ``_eager_state`` (state created at construction, as Adagrad does).

    Arguments shared by every fused optimizer: ``foreach`` and ``fused`` are accepted for
    signature compatibility with torch.optim and change nothing (the update is always one fused
    launch per segment); ``capturable=True`` and ``differentiable=True`` raise
    ``NotImplementedError``.
    """

    _torch_cls: type[Optimizer]
    _scalar_state: ClassVar[dict[str, float]] = {"step": 0.0}
    _n_step_scalars = 0
    _sparse_ok = False
    _eager_state = False
    _sparse_error = "fused_optim does not support sparse gradients"
    _num_warps = 8  # 256 threads per program; elements per program follow from the dtype (block_size)

    def __init__(self, params, defaults: dict) -> None:
        # ``defaults`` holds exactly the constructor's keyword arguments, as in torch.optim: torch's
        # own checks see them first, so bad arguments raise torch's errors.
        check_like_torch(self._torch_cls, **defaults)
        self._check_options(defaults)
        super().__init__(params, defaults)
        self._reset_engine()
        if self._eager_state:
            for index, group in enumerate(self.param_groups):
                self._layout(index, group, None, everyone=True)
            self._tracker.dirty = False

    # --- subclass interface ------------------------------------------------------------------
    def _tensor_state_keys(self, group) -> tuple[str, ...]:
        raise NotImplementedError

    def _fresh_keys(self, group) -> tuple[str, ...]:
        return ()

    def _init_region(self, group, key: str, region: torch.Tensor, param: torch.Tensor) -> None:
        """Initial value of a state region (torch's state initialization)."""
        region.zero_()

    def _advance_scalars(self, group, scalars: dict[str, np.ndarray]) -> None:
        """Advance the host scalar state of the params being updated, in place (torch: step += 1)."""
        if "step" in scalars:
            scalars["step"] += 1

    def _step_scalars(self, group, scalars: dict[str, float]) -> tuple[float, ...]:
        return ()

    def _launch(self, group, launch: _Launch, step_scalars) -> None:
        raise NotImplementedError

    def _reference(self, group, params, grads, states, fresh) -> None:
        raise NotImplementedError

    def _lr(self, group, launch: _Launch) -> float:
        """lr for a launch; a device tensor lr read by the kernel itself (capturable) is not read
        on the host, and 0.0 stands in for it."""
        return 0.0 if launch.features.lr_tensor is not None else _as_float(group["lr"])

    def _check_sparse(self, group) -> None:
        """Called when a group holds sparse grads (``_sparse_ok``): raise what torch raises."""

    # --- engine state ------------------------------------------------------------------------
    def _reset_engine(self) -> None:
        tracker = getattr(self, "_tracker", None) or _Tracker()
        self._tracker = tracker
        if not isinstance(self.state, _TrackedState) or self.state._tracker is not tracker:
            self.state = _TrackedState(tracker, self.state)
        self._caches: dict[int, _GroupCache] = {}
        tracker.dirty = True

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._reset_engine()

    def _check_options(self, group) -> None:
        name = type(self).__name__
        for option in ("capturable", "differentiable"):
            if group.get(option):
                raise NotImplementedError(f"fused_optim.{name} does not implement {option}=True")

    # --- step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not isinstance(self.state, _TrackedState) or self.state._tracker is not self._tracker:
            self._reset_engine()  # the state container itself was replaced
        # Phase 1 checks every group and raises before anything is modified.
        work = [self._prepare(i, group) for i, group in enumerate(self.param_groups)]
        if self._tracker.dirty or any(plan is None for plan, _, _, _ in work):
            self._rebuild(work)
        # Phase 2 updates.
        for index, ((plan, grads, _, _), group) in enumerate(zip(work, self.param_groups)):
            for launch in plan.launches:
                self._run(group, launch, grads)
            if plan.sparse:
                self._run_sparse(group, plan.sparse, grads)
            if any(launch.fresh for launch in plan.launches):
                self._caches[index].plan = None  # FRESH flags hold for one step
        return loss

    def _prepare(self, index: int, group):
        """(cached plan or None, grads, pkey, gkey) for one group; validates whenever the cache misses."""
        self._check_options(group)
        params = group["params"]
        grads = [p.grad for p in params]
        try:
            gkey = tuple(map(_data_ptr, grads))  # fails on a None or sparse grad
        except (TypeError, RuntimeError):
            gkey = tuple(0 if g is None else -1 if g.layout != torch.strided else g.data_ptr() for g in grads)
        try:
            pkey = tuple(map(_data_ptr, params))
        except RuntimeError:
            pkey = None
        cache = self._caches.get(index)
        plan = cache.plan if cache is not None and cache.group is group else None
        if (
            plan is not None
            and not self._tracker.dirty
            and plan.pkey == pkey
            and plan.gkey == gkey
            and plan.keys == self._tensor_state_keys(group)
        ):
            return plan, grads, pkey, gkey
        self._validate(index, group, grads)
        return None, grads, pkey, gkey

    def _validate(self, index: int, group, grads) -> None:
        name = type(self).__name__
        params = group["params"]
        if len({id(p) for p in params}) != len(params):
            raise NotImplementedError(f"fused_optim.{name}: a param group lists the same parameter twice")
        sparse = False
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is not None and g.layout != torch.strided:
                if not self._sparse_ok:
                    raise RuntimeError(self._sparse_error)
                sparse = True
            if p.dtype not in _REAL_DTYPES and p.dtype not in _COMPLEX_DTYPES:
                raise NotImplementedError(
                    f"fused_optim.{name}: parameter {i} of param group {index} has dtype {p.dtype}; "
                    "supported are float32, float64, float16, bfloat16, complex64 and complex128"
                )
            if g is not None and (g.dtype != p.dtype or g.shape != p.shape or g.device != p.device):
                raise RuntimeError(
                    f"fused_optim.{name}: the grad of parameter {i} of param group {index} "
                    f"({g.dtype}, {tuple(g.shape)}, {g.device}) does not match the parameter "
                    f"({p.dtype}, {tuple(p.shape)}, {p.device})"
                )
            state = self.state.get(p)
            if state:
                self._check_state(state, p, group, where=f"parameter {i} of param group {index}")
        if sparse:
            self._check_sparse(group)

    def _check_state(self, state: dict, p: torch.Tensor, group, where: str) -> None:
        """Raise a clear error if ``state`` cannot serve as ``p``'s state under ``group``'s options."""
        for key in self._scalar_state:
            value = state.get(key)
            if value is None:
                raise ValueError(f"state of {where} has no {key!r}")
            if isinstance(value, torch.Tensor) and value.numel() != 1:
                raise ValueError(f"state {key!r} of {where} must hold one value, got shape {tuple(value.shape)}")
        for key in self._tensor_state_keys(group):
            value = state.get(key)
            if value is None and key in self._fresh_keys(group):
                continue  # created by the first step
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"state of {where} has no tensor {key!r} (found {type(value).__name__})")
            if value.shape != p.shape or value.is_complex() != p.is_complex():
                raise ValueError(
                    f"state {key!r} of {where} has shape {tuple(value.shape)} and dtype {value.dtype}, "
                    f"but the parameter has shape {tuple(p.shape)} and dtype {p.dtype}"
                )

    # --- layout and plans ------------------------------------------------------------------
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
            cache = self._caches[index] = _GroupCache(group)
        keys = self._tensor_state_keys(group)
        params = group["params"]
        members: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            grad = grads[i] if grads is not None else None
            state = self.state.get(p)
            if (
                everyone
                or _is_dense_grad(grad)
                or (
                    state and not any(isinstance(v, torch.Tensor) and v.layout != torch.strided for v in state.values())
                )
            ):
                members.setdefault((p.device, _real_dtype(p.dtype)), []).append(i)
        segments = {}
        for key, positions in members.items():
            seg = cache.segments.get(key)
            same = (
                seg is not None
                and not self._tracker.dirty
                and seg.tensor_keys == keys
                and len(seg.members) == len(positions)
                and all(m is params[i] for m, i in zip(seg.members, positions))
                and all(_real(m).stride() == st or not d for m, st, d in zip(seg.members, seg.strides, seg.dense))
            )
            segments[key] = seg if same else self._new_segment(group, key, [params[i] for i in positions], positions)
        cache.segments = segments
        cache.plan = None

    def _new_segment(self, group, key, members, positions) -> _Segment:
        keys = self._tensor_state_keys(group)
        fresh_keys = self._fresh_keys(group)
        seg = _Segment(key, members, positions, keys, self._scalar_state)
        tracker = self._tracker
        for i, p in enumerate(members):
            old = self.state.get(p) or {}
            for k in keys:
                src = old.get(k)
                region = seg.region(i, k)
                if src is not None:
                    region.copy_(_real(src.to_dense() if src.layout != torch.strided else src))
                elif k in fresh_keys:
                    seg.fresh.add(i)  # the kernel writes it on this param's first step
                else:
                    self._init_region(group, k, region, p)
            for k, initial in self._scalar_state.items():
                seg.scalars[k][i] = _as_float(old[k]) if k in old else initial
            new = _ParamState(tracker)
            for k in self._scalar_state:
                dict.__setitem__(new, k, seg.scalars[k][i])
            for k in keys:
                dict.__setitem__(new, k, seg.view(i, k))
            for k, v in old.items():  # keep keys this configuration does not use
                if k not in new:
                    dict.__setitem__(new, k, v)
            if new:  # no empty entries: torch.optim.SGD without momentum keeps no state at all
                dict.__setitem__(self.state, p, new)
        return seg

    def _plan(self, index: int, group, grads, pkey, gkey) -> _Plan:
        launches = []
        for seg in self._caches[index].segments.values():
            rows = np.asarray([i for i, g in enumerate(seg.group_index) if _is_dense_grad(grads[g])], dtype=np.int64)
            if len(rows) == 0:
                continue
            all_rows = len(rows) == len(seg.members)
            launch = _Launch(seg, rows, all_rows, None if all_rows else torch.from_numpy(rows), None)
            device = seg.device
            uses_triton = (device.type == "cuda" and not INTERPRETED) or (device.type == "cpu" and INTERPRETED)
            if uses_triton:
                launch.tables = self._tables(seg, rows, grads, launch)
            else:
                _warn_fallback(device)
            launches.append(launch)
        # Sparse grads (where the algorithm allows them) take torch's own code, param by param.
        sparse = [i for i, g in enumerate(grads) if g is not None and g.layout != torch.strided]
        return _Plan(pkey, gkey, self._tensor_state_keys(group), launches, sparse)

    def _tables(self, seg: _Segment, rows: np.ndarray, grads, launch: _Launch) -> Tables:
        n = len(rows)
        p_addr = np.empty(n, dtype=np.int64)
        g_addr = np.empty(n, dtype=np.int64)
        for j, i in enumerate(rows.tolist()):
            p = _real(seg.members[i])
            g = _real(grads[seg.group_index[i]])
            shape, strides = seg.shapes[i], seg.strides[i]
            if seg.dense[i]:
                p_addr[j] = p.data_ptr()
            else:
                buf = torch.empty_strided(shape, strides, dtype=seg.dtype, device=seg.device)
                launch.stage_params.append((i, buf))
                p_addr[j] = buf.data_ptr()
            if _same_layout(g, strides):
                g_addr[j] = g.data_ptr()
            else:
                buf = torch.empty_strided(shape, strides, dtype=seg.dtype, device=seg.device)
                launch.stage_grads.append((int(seg.group_index[i]), buf))
                g_addr[j] = buf.data_ptr()
        vec_ok = (p_addr % VEC_BYTES == 0) & (g_addr % VEC_BYTES == 0)
        flags = np.asarray([FLAG_FRESH if i in seg.fresh else 0 for i in rows.tolist()], dtype=np.int64)
        launch.fresh = bool(flags.any())
        return build_tables(
            p_addr,
            g_addr,
            seg.offsets[rows],
            seg.numels[rows],
            vec_ok,
            flags,
            rows,
            block_size(self._num_warps, seg.flat_itemsize),
            seg.device,
        )

    # --- running a launch --------------------------------------------------------------------
    def _run(self, group, launch: _Launch, grads) -> None:
        seg = launch.seg
        if launch.tables is None:
            rows = launch.rows.tolist()
            params = [seg.members[i] for i in rows]
            self._reference(
                group,
                params,
                [grads[seg.group_index[i]] for i in rows],
                [self.state[p] for p in params],
                [i in seg.fresh for i in rows],
            )
        else:
            for pos, buf in launch.stage_grads:
                buf.copy_(_real(grads[pos]))
            for i, buf in launch.stage_params:
                buf.copy_(_real(seg.members[i]))
            self._launch(group, launch, self._advance(group, launch))
            for i, buf in launch.stage_params:
                _real(seg.members[i]).copy_(buf)
        if seg.fresh:  # this step wrote them
            seg.fresh.difference_update(launch.rows.tolist())

    def _run_sparse(self, group, positions: list[int], grads) -> None:
        params = [group["params"][i] for i in positions]
        stateful = self._scalar_state or self._tensor_state_keys(group)
        self._reference(
            group,
            params,
            [grads[i] for i in positions],
            [self.state[p] if stateful else {} for p in params],
            [False] * len(params),
        )

    def _advance(self, group, launch: _Launch):
        """Advance the host scalar state of the rows being updated (torch: ``step += 1`` per param);
        return the step-dependent kernel scalars: a tuple when every row has the same scalar state,
        else a per-row float64 device table."""
        seg = launch.seg
        if not seg.scalars:
            return ()
        rows = None if launch.all_rows else launch.rows
        values = {k: a if rows is None else a[rows] for k, a in seg.scalars_np.items()}
        self._advance_scalars(group, values)
        if rows is not None:
            for k, a in seg.scalars_np.items():
                a[rows] = values[k]
        if not self._n_step_scalars:
            return ()
        if all(v.min() == v.max() for v in values.values()):
            return self._step_scalars(group, {k: float(v[0]) for k, v in values.items()})
        keys = list(values)
        distinct, inverse = np.unique(np.stack([values[k] for k in keys], axis=1), axis=0, return_inverse=True)
        per_row = [self._step_scalars(group, dict(zip(keys, map(float, row)))) for row in distinct]
        return scalar_table(np.asarray(per_row, dtype=np.float64)[inverse.reshape(-1)], seg.device)

    # --- introspection ---------------------------------------------------------------------------
    def bytes_per_step(self) -> int:
        """Bytes one step moves through the kernels when every param that has state takes a step:
        each param, grad and state element read once, each param and state element written once,
        counted with their real element sizes (alignment padding excluded). The memory-bandwidth
        floor of a step is this divided by the device's copy bandwidth."""
        total = 0
        for cache in self._caches.values():
            for seg in cache.segments.values():
                n = int(seg.numels.sum())
                total += 3 * n * seg.dtype.itemsize  # param read and written, grad read
                total += sum(2 * n * flat.dtype.itemsize for flat in seg.flat.values())
        return total

    # --- torch.optim compatibility -----------------------------------------------------------
    def state_dict(self):
        state_dict = super().state_dict()
        state_dict["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in state_dict["state"].items()}
        return state_dict

    def load_state_dict(self, state_dict) -> None:
        # The check runs as the last pre-hook, so it sees the dict the user's hooks produced and
        # rejects it before torch modifies anything; adoption runs as the first post-hook, so the
        # flat buffers hold the loaded values as soon as loading returns.
        check = self.register_load_state_dict_pre_hook(FusedOptimizer._check_loadable)
        adopt = self.register_load_state_dict_post_hook(FusedOptimizer._adopt_loaded, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            check.remove()
            adopt.remove()

    @staticmethod
    def _check_loadable(opt: FusedOptimizer, state_dict) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(opt.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, opt.param_groups)
        ):
            return  # torch raises its own error for these, before modifying anything
        for index, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
            options = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            opt._check_options(options)
            for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                state = state_dict["state"].get(pid)
                if state:
                    opt._check_state(state, p, options, where=f"parameter {i} of param group {index}")

    @staticmethod
    def _adopt_loaded(opt: FusedOptimizer) -> None:
        opt._reset_engine()
        for index, group in enumerate(opt.param_groups):
            opt._layout(index, group, None)
        opt._tracker.dirty = False
