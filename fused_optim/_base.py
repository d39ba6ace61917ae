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
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch.optim import Optimizer

from .kernels import INTERPRETED
from .kernels._features import Features, advance_steps
from .kernels._tables import (
    ALIGN,
    FLAG_FRESH,
    Tables,
    block_size,
    build_tables,
    repoint_grads,
    scalar_table,
)
from .kernels.clip import grad_norm_partials

__all__ = ["FusedOptimizer", "call_torch", "check_like_torch"]

_data_ptr = torch.Tensor.data_ptr
try:  # DTensor (FSDP2, tensor parallel): the kernels run on each rank's local shard
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch < 2.5, or built without distributed
    try:
        from torch.distributed._tensor import DTensor as _DTensor
    except ImportError:
        _DTensor = None
_MISSING = object()
_PARTIAL = ("partial",)  # norm class of a param with a Partial placement: not clipped
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
def _is_dtensor(t) -> bool:
    return _DTensor is not None and isinstance(t, _DTensor)


def _local(t):
    """The tensor the kernels work on: a DTensor's local shard, or the tensor itself."""
    return t._local_tensor if _is_dtensor(t) else t


def _like_param(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``local`` (shaped like ``param``'s local shard) as ``param`` is seen: a DTensor with its
    mesh and placements for a DTensor param, else ``local`` itself."""
    if not _is_dtensor(param):
        return local
    return _DTensor.from_local(
        local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


def _real(t: torch.Tensor) -> torch.Tensor:
    """Complex tensors are updated as their real view, as torch.optim does; DTensors as their
    local shard."""
    t = _local(t)
    return torch.view_as_real(t) if t.is_complex() else t


def _mesh_device(mesh) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, getattr(torch, mesh.device_type).current_device())


def _norm_class(p):
    """How a param's share of a global grad norm is combined across ranks: None for a plain
    tensor (or a replicated DTensor), else (mesh, the mesh dims its placements shard)."""
    if not _is_dtensor(p):
        return None
    if any(placement.is_partial() for placement in p.placements):
        return _PARTIAL
    dims = tuple(dim for dim, placement in enumerate(p.placements) if not placement.is_replicate())
    return (p.device_mesh, dims) if dims else None


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
    """Params of one group with one device and real dtype, and the flat state they own.

    ``key_dtypes`` maps every tensor state key to its dtype (the param's, ``state_dtype``, or fp32
    for the master copy). Scalar state (step counts) lives on the host and is advanced in numpy,
    or, with ``device_step``, on the params' device, advanced by a kernel (capturable, AMP)."""

    def __init__(self, key, members, group_index, key_dtypes: dict, scalar_keys, device_step: bool, stochastic: bool):
        self.key = key
        self.device, self.dtype = key
        self.members = members
        self.group_index = np.asarray(group_index, dtype=np.int64)  # position of each member in the group
        self.tensor_keys = tuple(key_dtypes)
        self.key_dtypes = dict(key_dtypes)
        self.master = "master_param" in key_dtypes
        self.stochastic = stochastic
        self.device_step = device_step
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
        self.flat = {k: torch.zeros(total, dtype=dt, device=self.device) for k, dt in key_dtypes.items()}
        # The narrowest element of the params and states sets the block size.
        self.flat_itemsize = min([self.dtype.itemsize] + [f.dtype.itemsize for f in self.flat.values()])
        scalar_device = self.device if device_step else torch.device("cpu")
        self.scalars = {k: torch.zeros(len(members), dtype=_scalar_dtype(), device=scalar_device) for k in scalar_keys}
        self.scalars_np = {} if device_step else {k: v.numpy() for k, v in self.scalars.items()}
        self.fresh: set[int] = set()  # members whose FRESH state the next launch writes
        self.norm_classes = [_norm_class(p) for p in members]  # for clipping across ranks
        self.uniform_norm_class = len(set(self.norm_classes)) <= 1

    def region(self, i: int, key: str) -> torch.Tensor:
        """Member ``i``'s region of ``key`` in its real dtype and layout."""
        return self.flat[key].as_strided(self.shapes[i], self.strides[i], int(self.offsets[i]))

    def view(self, i: int, key: str) -> torch.Tensor:
        """The tensor stored as ``state[member][key]``: shaped like the member (complex if it is)."""
        region = self.region(i, key)
        member = self.members[i]
        return _like_param(torch.view_as_complex(region) if member.is_complex() else region, member)


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
    where: dict = field(default_factory=dict)  # group position -> (launch, row in its tables)


class _GroupCache:
    __slots__ = ("group", "norm_classes", "plan", "segments", "signature")

    def __init__(self, group) -> None:
        self.group = group
        self.norm_classes: list = []  # distinct _norm_class of the group's params, in order
        self.segments: dict = {}
        self.plan: _Plan | None = None
        self.signature: tuple | None = None


_warned_fallback = False


def _uses_triton(device: torch.device) -> bool:
    """Whether the kernels run on ``device`` (else torch.optim's own implementation does)."""
    return (device.type == "cuda" and not INTERPRETED) or (device.type == "cpu" and INTERPRETED)


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


_SEED = 0x5EED5EED  # stochastic rounding: base of the per-step seeds


@dataclass
class _StepInputs:
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
    * ``_scalar_state``: per-parameter scalar state and its initial value (``{"step": 0.0}``),
      advanced by ``_advance_scalars`` on the host, or by the advance kernel on the device;
    * ``_step_scalars(group, scalars)``: the ``_n_step_scalars`` kernel scalars that depend on a
      parameter's scalar state (bias corrections), in float64 as torch's single-tensor code
      computes them;
    * ``_launch(group, launch, step_scalars)``: the kernel launch for one segment;
    * ``_reference(group, params, grads, states, fresh)``: torch's own implementation, for
      devices the kernels cannot run on, and for sparse gradients where ``_sparse_ok``;
    * ``_sparse_error``: torch's message for sparse gradients.

    Optional: ``_init_region`` (initial state values, zeros by default), ``_fresh_keys`` (state
    that torch creates from the first gradient: the kernel writes it on the first step, told by
    the FRESH flag), ``_eager_state`` (state created at construction, as Adagrad does),
    ``_device_advance_args`` (what the advance kernel needs beyond ``step += 1``).

    Arguments shared by every fused optimizer, beyond torch's (keyword-only):

    * ``master_weights`` (bool): bf16/fp16 params get an fp32 master copy (state key
      ``master_param``) that the kernel updates, writing the param back rounded; moments are then
      fp32 unless ``state_dtype`` says otherwise.
    * ``stochastic_rounding`` (bool): bf16 params without a master copy are stored with unbiased
      stochastic rounding.
    * ``state_dtype`` (torch.dtype): dtype of the per-element state (default: the param's).
    * ``max_grad_norm`` (float): clip the global grad norm (2-norm over every group) inside each
      step, as ``torch.nn.utils.clip_grad_norm_`` then ``step()`` would.

    ``foreach`` and ``fused`` are accepted for compatibility with torch.optim and change nothing
    (the update is always one fused launch per segment). ``capturable=True`` keeps step counts on
    the device and computes bias corrections there, so ``step()`` can be captured in a CUDA
    graph. ``differentiable=True`` raises ``NotImplementedError``. AMP: ``GradScaler`` hands its
    scale and inf flag to ``step()``, which unscales and skips inside the kernels, without a host
    synchronisation.
    """

    _torch_cls: type[Optimizer]
    _scalar_state: ClassVar[dict[str, float]] = {"step": 0.0}
    _n_step_scalars = 0
    _sparse_ok = False
    _eager_state = False
    _sparse_error = "fused_optim does not support sparse gradients"
    _num_warps = 8  # 256 threads per program; elements per program follow from the dtype (block_size)
    _step_supports_amp_scaling = True  # GradScaler passes grad_scale and found_inf to step()

    def __init__(
        self,
        params,
        defaults: dict,
        *,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        state_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        # ``defaults`` holds exactly the constructor's torch.optim arguments: torch's own checks
        # see them first, so bad arguments raise torch's errors.
        check_like_torch(self._torch_cls, **defaults)
        self._check_options(defaults)
        # Optimizer-wide settings, outside param_groups so that those stay torch's.
        self.options = {
            "master_weights": bool(master_weights),
            "stochastic_rounding": bool(stochastic_rounding),
            "state_dtype": state_dtype,
            "max_grad_norm": max_grad_norm,
        }
        self._check_extensions()
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

    def _device_advance_args(self, group) -> dict:
        """Arguments of the advance kernel beyond ``step += 1`` (NAdam: its mu_product)."""
        return {}

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
        self._amp_steps = getattr(self, "_amp_steps", False)  # AMP moved step counts to the device
        self._pending_clip = None  # (max_norm, total norm) from clip_grad_norm_, for the next step
        self._loaded = getattr(self, "_loaded", {})  # id(param) -> its state as saved (dtypes kept), while loading
        self._step_count = getattr(self, "_step_count", 0)  # seeds stochastic rounding
        tracker.dirty = True

    @property
    def max_grad_norm(self) -> float | None:
        return self.options["max_grad_norm"]

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "options": self.options}

    def __setstate__(self, state: dict) -> None:
        if "options" in state:  # pickled or deep-copied; load_state_dict keeps the current ones
            self.options = state.pop("options")
        super().__setstate__(state)
        self._reset_engine()

    def _check_extensions(self) -> None:
        o = self.options
        if o["state_dtype"] is not None and o["state_dtype"] not in _REAL_DTYPES:
            raise ValueError(
                f"Invalid state_dtype: {o['state_dtype']} (choose among {', '.join(map(str, _REAL_DTYPES))})"
            )
        if o["master_weights"] and o["stochastic_rounding"]:
            raise ValueError(
                "master_weights and stochastic_rounding are exclusive: the master copy keeps full precision"
            )
        if o["max_grad_norm"] is not None and not o["max_grad_norm"] > 0:
            raise ValueError(f"Invalid max_grad_norm value: {o['max_grad_norm']}")

    def _check_options(self, group) -> None:
        name = type(self).__name__
        if group.get("differentiable"):
            raise NotImplementedError(f"fused_optim.{name} does not implement differentiable=True")
        if group.get("capturable") and "capturable" not in inspect.signature(self._torch_cls.__init__).parameters:
            raise NotImplementedError(f"fused_optim.{name} does not implement capturable=True")
        if group.get("capturable"):
            # lr is read by the kernels; other hyperparameters are read on the host, which a tensor
            # on an accelerator would turn into a sync (and a failed CUDA graph capture)
            for key, value in group.items():
                values = value if isinstance(value, (tuple, list)) and key != "params" else (value,)
                if key != "lr" and any(isinstance(v, torch.Tensor) and v.device.type != "cpu" for v in values):
                    raise NotImplementedError(
                        f"fused_optim.{name} with capturable=True takes {key} as floats or CPU tensors, "
                        "not as tensors on an accelerator (only lr may be one)"
                    )

    def _device_steps(self, group) -> bool:
        """Step counts on the device: capturable groups, and every group once AMP skips steps."""
        return bool(self._scalar_state) and (bool(group.get("capturable")) or self._amp_steps)

    def _key_dtypes(self, group, dtype: torch.dtype) -> dict[str, torch.dtype]:
        """The per-element state of params of (real) ``dtype`` in ``group``, with its dtypes."""
        master = self.options["master_weights"] and dtype in (torch.float16, torch.bfloat16)
        state_dtype = self.options["state_dtype"] or (torch.float32 if master else dtype)
        keys = dict.fromkeys(self._tensor_state_keys(group), state_dtype)
        if master:
            keys["master_param"] = torch.float32
        return keys

    def _signature(self, group) -> tuple:
        """What the layout of a group depends on beyond its params."""
        o = self.options
        keys = self._tensor_state_keys(group)
        return (keys, o["master_weights"], o["state_dtype"], o["stochastic_rounding"], self._device_steps(group))

    # --- step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
            grad_scale (Tensor, optional): AMP loss scale: grads are divided by it inside the kernels.
                ``GradScaler`` passes it as the attribute ``grad_scale``.
            found_inf (Tensor, optional): AMP: when nonzero, the step changes nothing (params, state,
                step counts), decided on the device. ``GradScaler`` passes it as ``found_inf``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = grad_scale if grad_scale is not None else getattr(self, "grad_scale", None)
        found_inf = found_inf if found_inf is not None else getattr(self, "found_inf", None)
        if found_inf is not None and not self._amp_steps and self._scalar_state:
            # A skipped step must not advance step counts, and reading found_inf on the host
            # would synchronise: from now on step counts live on the device.
            self._amp_steps = True
            self._tracker.dirty = True
        work = self._plans()  # checks every group and raises before anything is modified
        inputs = _StepInputs(grad_scale, found_inf, self._clip_coef(work, grad_scale))
        for index, ((plan, grads, _, _), group) in enumerate(zip(work, self.param_groups)):
            for launch in plan.launches:
                self._run(group, launch, grads, inputs)
            if plan.sparse:
                self._run_sparse(group, plan.sparse, grads)
            if any(launch.fresh for launch in plan.launches):
                self._caches[index].plan = None  # FRESH flags hold for one step
        self._pending_clip = None
        self._step_count += 1
        return loss

    def _plans(self):
        """Phase 1 of a step: a checked plan for every group, rebuilt where the cache misses."""
        if not isinstance(self.state, _TrackedState) or self.state._tracker is not self._tracker:
            self._reset_engine()  # the state container itself was replaced
        work = [self._prepare(i, group) for i, group in enumerate(self.param_groups)]
        if self._tracker.dirty or any(plan is None for plan, _, _, _ in work):
            self._rebuild(work)
        return work

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._pending_clip = None  # a clip coefficient belongs to the grads it was computed on
        super().zero_grad(set_to_none)

    def _prepare(self, index: int, group):
        """(cached plan or None, grads, pkey, gkey) for one group; validates whenever the cache misses."""
        self._check_options(group)
        params = group["params"]
        grads = [p.grad for p in params]
        try:
            pkey = tuple(map(_data_ptr, params))
        except RuntimeError:
            pkey = None
        if pkey is not None and 0 in pkey:  # a DTensor (its data_ptr is 0), or an empty tensor
            pkey = tuple(_data_ptr(_local(p)) for p in params)
            grads = [None if g is None else _local(g) for g in grads]
        try:
            gkey = tuple(map(_data_ptr, grads))  # fails on a None or sparse grad
        except (TypeError, RuntimeError):
            # -2: no grad (an empty grad's address is 0), -1: sparse
            gkey = tuple(-2 if g is None else -1 if g.layout != torch.strided else g.data_ptr() for g in grads)
        cache = self._caches.get(index)
        plan = cache.plan if cache is not None and cache.group is group else None
        if (
            plan is not None
            and not self._tracker.dirty
            and plan.pkey == pkey
            and plan.keys == self._signature(group)
            and (plan.gkey == gkey or self._regrad(plan, grads, gkey))
        ):
            return plan, grads, pkey, gkey
        self._validate(index, group, grads)
        return None, grads, pkey, gkey

    @staticmethod
    def _regrad(plan: _Plan, grads, gkey) -> bool:
        """The cached plan with only grad storage changed (autograd allocated new grads, as after
        ``zero_grad(set_to_none=True)`` when the allocator hands out other addresses): point the
        tables at the new grads and keep the rest. Each moved grad must match the one the plan was
        checked with in dtype, device, shape and strides, so every check and layout decision still
        holds. Otherwise (a grad appeared, vanished, turned sparse or changed) False, having
        changed nothing: the full check then runs and raises where torch would."""
        old = plan.gkey
        if len(old) != len(gkey):
            return False
        moved: dict = {}  # id(launch) -> (launch, [row], [new address])
        for i, (a, b) in enumerate(zip(old, gkey)):
            if a == b:
                continue
            if a <= 0 or b <= 0:  # -2: no grad, -1: sparse, 0: empty
                return False
            launch, j, meta = plan.where[i]
            g = grads[i]
            if g.dtype != meta[0] or g.device != meta[1] or g.shape != meta[2] or g.stride() != meta[3]:
                return False
            if launch.tables is None or j < 0:
                continue  # torch's implementation, or a staging copy, reads the grad where it is now
            entry = moved.setdefault(id(launch), (launch, [], []))
            entry[1].append(j)
            entry[2].append(b)
        if any(launch.seg.device.type == "cuda" for launch, _, _ in moved.values()) and (
            torch.cuda.is_current_stream_capturing()
        ):
            return False  # no host-to-device copy inside a graph capture: the full path decides
        for launch, rows, addrs in moved.values():
            repoint_grads(launch.tables, np.asarray(rows, dtype=np.int64), np.asarray(addrs, dtype=np.int64))
        plan.gkey = gkey
        return True

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
            if self.options["stochastic_rounding"] and p.dtype == torch.float16:
                raise NotImplementedError(
                    f"fused_optim.{name}: stochastic_rounding rounds to bfloat16; parameter {i} of param group "
                    f"{index} is float16 (use master_weights=True for fp16 params)"
                )
            q = p if _is_dtensor(g) else _local(p)  # grads of DTensors arrive here as local shards
            if g is not None and (g.dtype != q.dtype or g.shape != q.shape or g.device != q.device):
                raise RuntimeError(
                    f"fused_optim.{name}: the grad of parameter {i} of param group {index} "
                    f"({g.dtype}, {tuple(g.shape)}, {g.device}) does not match the parameter "
                    f"({q.dtype}, {tuple(q.shape)}, {q.device})"
                )
            if not _uses_triton(p.device):
                self._check_fallback(group, p, f"parameter {i} of param group {index}")
            state = self.state.get(p)
            if state:
                self._check_state(state, p, group, where=f"parameter {i} of param group {index}")
        if sparse:
            self._check_sparse(group)

    def _check_fallback(self, group, p: torch.Tensor, where: str) -> None:
        """Options torch.optim's implementation (devices the kernels do not run on) cannot honour."""
        dtype = _real_dtype(p.dtype)
        keys = self._key_dtypes(group, dtype)
        master = "master_param" in keys
        if self.options["stochastic_rounding"] and dtype == torch.bfloat16:
            option = "stochastic_rounding"
        elif not master and any(dt != dtype for dt in keys.values()):
            option = f"state_dtype={self.options['state_dtype']}"
        else:
            return
        raise NotImplementedError(
            f"fused_optim.{type(self).__name__}: {option} needs the Triton kernels, which do not run on "
            f"{p.device} ({where}): use CUDA, or set TRITON_INTERPRET=1 before importing fused_optim to run "
            "them on CPU through Triton's interpreter"
        )

    def _check_state(self, state: dict, p: torch.Tensor, group, where: str) -> None:
        """Raise a clear error if ``state`` cannot serve as ``p``'s state under ``group``'s options."""
        for key in self._scalar_state:
            value = state.get(key)
            if value is None:
                raise ValueError(f"state of {where} has no {key!r}")
            if isinstance(value, torch.Tensor) and value.numel() != 1:
                raise ValueError(f"state {key!r} of {where} must hold one value, got shape {tuple(value.shape)}")
        optional = {*self._fresh_keys(group), "master_param"}  # first step / made from the param
        for key in self._key_dtypes(group, _real_dtype(p.dtype)):
            value = state.get(key)
            if value is None and key in optional:
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"state of {where} has no tensor {key!r} (found {type(value).__name__})")
            if value.shape != p.shape or value.is_complex() != p.is_complex():
                raise ValueError(
                    f"state {key!r} of {where} has shape {tuple(value.shape)} and dtype {value.dtype}, "
                    f"but the parameter has shape {tuple(p.shape)} and dtype {p.dtype}"
                )
            if _local(value).shape != _local(p).shape:  # a DTensor param needs its state sharded alike
                raise ValueError(
                    f"state {key!r} of {where} holds a local shard of shape {tuple(_local(value).shape)}, "
                    f"but the parameter's local shard has shape {tuple(_local(p).shape)} (placements "
                    f"{getattr(value, 'placements', None)} vs {getattr(p, 'placements', None)})"
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
        signature = self._signature(group)
        params = group["params"]
        members: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            grad = grads[i] if grads is not None else None
            state = self.state.get(p)
            sparse_state = state and any(
                isinstance(v, torch.Tensor) and v.layout != torch.strided for v in state.values()
            )
            if everyone or _is_dense_grad(grad) or (state and not sparse_state):
                members.setdefault((p.device, _real_dtype(p.dtype)), []).append(i)
        segments = {}
        for key, positions in members.items():
            seg = cache.segments.get(key)
            same = (
                seg is not None
                and not self._tracker.dirty
                and cache.signature == signature
                and len(seg.members) == len(positions)
                and all(m is params[i] for m, i in zip(seg.members, positions))
                and all(_real(m).stride() == st or not d for m, st, d in zip(seg.members, seg.strides, seg.dense))
            )
            segments[key] = seg if same else self._new_segment(group, key, [params[i] for i in positions], positions)
        cache.segments = segments
        cache.norm_classes = list(dict.fromkeys(map(_norm_class, params)))
        cache.signature = signature
        cache.plan = None

    def _new_segment(self, group, key, members, positions) -> _Segment:
        _, dtype = key
        key_dtypes = self._key_dtypes(group, dtype)
        fresh_keys = self._fresh_keys(group)
        stochastic = self.options["stochastic_rounding"] and dtype == torch.bfloat16
        seg = _Segment(key, members, positions, key_dtypes, self._scalar_state, self._device_steps(group), stochastic)
        scalar_values = {k: [] for k in self._scalar_state}
        tracker = self._tracker
        for i, p in enumerate(members):
            old = self.state.get(p) or {}
            source = self._loaded.get(id(p), old)  # a loaded checkpoint, before torch cast it
            for k in key_dtypes:
                src = source.get(k)
                region = seg.region(i, k)
                if src is not None:
                    region.copy_(_real(src.to_dense() if src.layout != torch.strided else src))
                elif k == "master_param":
                    region.copy_(_real(p))
                elif k in fresh_keys:
                    seg.fresh.add(i)  # the kernel writes it on this param's first step
                else:
                    self._init_region(group, k, region, p)
            for k, initial in self._scalar_state.items():
                scalar_values[k].append(_as_float(source[k]) if k in source else initial)
            new = _ParamState(tracker)
            for k in self._scalar_state:
                dict.__setitem__(new, k, seg.scalars[k][i])
            for k in key_dtypes:
                dict.__setitem__(new, k, seg.view(i, k))
            for k, v in old.items():  # keep keys this configuration does not use
                if k not in new:
                    dict.__setitem__(new, k, v)
            if new:  # no empty entries: torch.optim.SGD without momentum keeps no state at all
                dict.__setitem__(self.state, p, new)
        for k, values in scalar_values.items():
            seg.scalars[k].copy_(torch.tensor(values, dtype=seg.scalars[k].dtype))
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
            if _uses_triton(device):
                launch.tables = self._tables(seg, rows, grads, launch)
            else:
                _warn_fallback(device)
            launches.append(launch)
        # Sparse grads (where the algorithm allows them) take torch's own code, param by param.
        sparse = [i for i, g in enumerate(grads) if g is not None and g.layout != torch.strided]
        # For grads that move later (_regrad): each position's launch, its row in the tensor table
        # (-1: staged or no table) and the metadata of the grad this plan was checked with.
        where = {}
        for launch in launches:
            staged = {pos for pos, _ in launch.stage_grads}
            for j, i in enumerate(launch.rows.tolist()):
                pos = int(launch.seg.group_index[i])
                g = grads[pos]
                row = -1 if launch.tables is None or pos in staged else j
                where[pos] = (launch, row, (g.dtype, g.device, g.shape, g.stride()))
        return _Plan(pkey, gkey, self._signature(group), launches, sparse, where)

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
        flags = np.asarray([FLAG_FRESH if i in seg.fresh else 0 for i in rows.tolist()], dtype=np.int64)
        launch.fresh = bool(flags.any())
        return build_tables(
            p_addr,
            g_addr,
            seg.offsets[rows],
            seg.numels[rows],
            flags,
            rows,
            block_size(self._num_warps, seg.flat_itemsize),
            seg.device,
        )

    # --- running a launch --------------------------------------------------------------------
    def _run(self, group, launch: _Launch, grads, inputs: _StepInputs) -> None:
        seg = launch.seg
        if launch.tables is None:
            self._run_reference(group, launch, grads, inputs)
        else:
            self._stage_grads(launch, grads)
            for i, buf in launch.stage_params:
                buf.copy_(_real(seg.members[i]))
            launch.features = self._features(group, launch, inputs)
            self._launch(group, launch, self._advance(group, launch))
            for i, buf in launch.stage_params:
                _real(seg.members[i]).copy_(buf)
        if seg.fresh:
            if launch.fresh and inputs.found_inf is not None and bool(inputs.found_inf):
                return  # a skipped first step (AMP) leaves fresh state for the next one (reads found_inf once)
            seg.fresh.difference_update(launch.rows.tolist())  # this step wrote them

    @staticmethod
    def _stage_grads(launch: _Launch, grads) -> None:
        for pos, buf in launch.stage_grads:
            buf.copy_(_real(grads[pos]))

    def _features(self, group, launch: _Launch, inputs: _StepInputs) -> Features:
        """What the kernels of this launch switch on: AMP, clipping, master copy, rounding, device steps."""
        seg = launch.seg
        f = Features()
        if seg.device_step:
            f.steps = seg.scalars["step"]
            lr = group["lr"]
            if isinstance(lr, torch.Tensor) and (lr.device.type != "cpu" or lr.device == seg.device):
                f.lr_tensor = lr.to(seg.device)  # read by the kernel: no host read, capturable
            f.seed = _SEED + hash(seg.key) % 65536  # the kernel adds the step count
        else:
            f.seed = _SEED + self._step_count * 7919 + hash(seg.key) % 65536
        f.grad_scale = inputs.on(seg.device, "grad_scale")
        f.found_inf = inputs.on(seg.device, "found_inf")
        f.clip_coef = inputs.on(seg.device, "clip_coef")
        if seg.master:
            f.master = seg.flat["master_param"]
        f.stochastic = seg.stochastic
        return f

    def _run_reference(self, group, launch: _Launch, grads, inputs: _StepInputs) -> None:
        """torch.optim's own implementation, for devices the kernels cannot run on (CPU without the
        interpreter), with AMP, clipping and master weights applied around it."""
        seg = launch.seg  # options only the kernels honour were refused by _check_fallback
        if inputs.found_inf is not None and bool(inputs.found_inf):  # this path runs on CPU: no sync to avoid
            return
        rows = launch.rows.tolist()
        params = [seg.members[i] for i in rows]
        grads = [_local(grads[seg.group_index[i]]) for i in rows]
        factor = inputs.factor()
        if factor is not None:
            grads = [g * factor.to(g.device) for g in grads]
        grads = [_like_param(g, p) for g, p in zip(grads, params)]  # DTensor params get DTensor grads
        states = [self.state[p] for p in params]
        fresh = [i in seg.fresh for i in rows]
        if seg.master:  # update the fp32 master copies, then round them into the params
            masters = [s["master_param"] for s in states]
            self._reference(group, masters, [g.to(m.dtype) for g, m in zip(grads, masters)], states, fresh)
            for p, m in zip(params, masters):
                p.copy_(m)
        else:
            self._reference(group, params, grads, states, fresh)

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
        """Advance the scalar state of the rows being updated (torch: ``step += 1`` per param) and
        return the step-dependent kernel scalars: a tuple when every row has the same scalar state,
        else a per-row float64 device table. Device step counts are advanced by a kernel, and the
        update kernel computes its scalars itself."""
        seg = launch.seg
        if not seg.scalars:
            return ()
        if seg.device_step:
            advance_steps(
                launch.tables,
                seg.scalars["step"],
                launch.features.found_inf,
                seg.scalars.get("mu_product"),
                **self._device_advance_args(group),
            )
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

    # --- global-norm clipping ------------------------------------------------------------------
    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach=None
    ) -> torch.Tensor:
        """Clip the global norm of every grad of this optimizer, as
        ``torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)`` would, and return the total
        norm (a tensor, never read on the host). The grads are not modified: the next ``step()``
        multiplies them by ``min(max_norm / (total_norm + 1e-6), 1)`` inside its kernels, so call it
        right before ``step()`` (``zero_grad()`` drops it). ``norm_type``: 2.0 or inf."""
        total = self._total_norm(self._plans(), norm_type, None)
        if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
            raise RuntimeError(
                f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, so it "
                "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
                "anyway, set `error_if_nonfinite=False`"
            )
        self._pending_clip = (float(max_norm), total)
        return total

    def _clip_coef(self, work, grad_scale) -> torch.Tensor | None:
        if self.max_grad_norm is not None:
            max_norm, total = self.max_grad_norm, self._total_norm(work, 2.0, grad_scale)
        elif self._pending_clip is not None:
            max_norm, total = self._pending_clip
        else:
            return None
        return torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch.nn.utils.clip_grad_norm_'s coefficient

    def _total_norm(self, work, norm_type: float, grad_scale) -> torch.Tensor:
        """Global grad norm over every segment: one reduction launch per segment, combined on the device."""
        if norm_type not in (2.0, math.inf):
            raise NotImplementedError(f"fused_optim clips by the 2-norm or the inf-norm, not norm_type={norm_type}")
        inf = norm_type == math.inf
        parts: dict = defaultdict(list)  # norm class -> partial norms (None: needs no reduction across ranks)
        torch_norms = []  # per-tensor norms as torch computes them, for grads outside the kernels
        for plan, grads, _, _ in work:
            if plan.sparse:
                raise NotImplementedError("fused_optim does not clip sparse gradients")
            for launch in plan.launches:
                seg, rows = launch.seg, launch.rows.tolist()
                if launch.tables is not None:
                    self._stage_grads(launch, grads)
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
                        g = _local(grads[seg.group_index[i]])
                        if inf and not g.numel():
                            continue  # an empty grad adds nothing (torch's inf-norm refuses it)
                        norm = torch.linalg.vector_norm(g, norm_type)  # torch.nn.utils.clip_grad_norm_'s
                        torch_norms.append(norm)
                        parts[seg.norm_classes[i]].append(norm.double() if inf else norm.double().square())
        if _PARTIAL in parts:
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
        dtype = (
            torch.float64
            if all(launch.seg.dtype == torch.float64 for p, *_ in work for launch in p.launches)
            else torch.float32
        )
        return total.to(dtype)

    def _mesh_classes(self) -> list:
        """The norm classes of DTensor params (mesh, sharded dims), in the same order on every rank."""
        ordered = (c for _, cache in sorted(self._caches.items()) for c in cache.norm_classes)
        return list(dict.fromkeys(c for c in ordered if c is not None and c != _PARTIAL))

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
                value = torch.zeros((), dtype=torch.float64, device=_mesh_device(mesh))
            for dim in dims:
                dist.all_reduce(value, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=mesh.get_group(dim))
            device = device or value.device
            totals.append(value.to(device))
        stacked = torch.stack(totals)
        return stacked.amax() if inf else stacked.sum().sqrt()

    # --- introspection ---------------------------------------------------------------------------
    def bytes_per_step(self) -> int:
        """Bytes one step moves through the kernels when every param that has state takes a step:
        each param, grad and state element read once, each param and state element written once,
        counted with their real element sizes (alignment padding excluded; with a master copy the
        param is only written). The memory-bandwidth floor of a step is this divided by the
        device's copy bandwidth."""
        total = 0
        for cache in self._caches.values():
            for seg in cache.segments.values():
                n = int(seg.numels.sum())
                param_passes = 1 if seg.master else 2  # the master copy is read instead of the param
                total += n * (param_passes + 1) * seg.dtype.itemsize  # param (write[, read]) and grad read
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
            self._loaded = {}

    @staticmethod
    def _check_loadable(opt: FusedOptimizer, state_dict) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(opt.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, opt.param_groups)
        ):
            return  # torch raises its own error for these, before modifying anything
        loaded = {}
        for index, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
            options = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            opt._check_options(options)
            for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                state = state_dict["state"].get(pid)
                if state:
                    opt._check_state(state, p, options, where=f"parameter {i} of param group {index}")
                    loaded[id(p)] = state
        # torch casts loaded state to the param dtype; adoption copies from these originals, so
        # fp32 moments and master copies of bf16 params keep their precision
        opt._loaded = loaded

    @staticmethod
    def _adopt_loaded(opt: FusedOptimizer) -> None:
        opt._reset_engine()
        for index, group in enumerate(opt.param_groups):
            opt._layout(index, group, None)
        opt._tracker.dirty = False
