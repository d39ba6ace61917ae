"""FusedOptimizer: the public base class every fused algorithm declares itself against.

One ``step()`` runs, per param group, a cached *plan* (``_plans``), then one launch of the update
kernel per *segment* (params of one device and dtype; ``_segments``), with the training features
switched on for it (``_features``), or torch's own code where the kernels cannot run
(``_fallback``). Everything that can fail is checked before the first param changes
(``_checks``); the state containers notice replaced entries (``_state``).
"""

from __future__ import annotations

import inspect
from typing import ClassVar

import numpy as np
import torch
from torch.optim import Optimizer

from ._checks import ChecksMixin, check_extensions, check_like_torch
from ._fallback import FallbackMixin
from ._features import FeaturesMixin, StepInputs
from ._plans import PlansMixin
from ._quant import CODES, dequantize
from ._segments import Launch, as_float
from ._state import TrackedState, Tracker
from .kernels import Algorithm, advance, step_table, update_step

__all__ = ["FusedOptimizer"]

# fused_optim's own constructor arguments (keyword-only, after torch's) and their defaults
_EXTENSIONS = {
    "master_weights": False,
    "stochastic_rounding": False,
    "rounding_seed": 0,
    "state_dtype": None,
    "stochastic_state_rounding": False,
    "max_grad_norm": None,
}


def _sums_combiner(classes: list, device: torch.device):
    """``_combine_sums``' function for a launch on ``device`` whose rows have these norm classes
    (None: none sharded)."""
    if all(c is None for c in classes):
        return None  # (params with Partial placements were refused by _validate)
    masks = [  # the same order on every rank
        (cls, torch.tensor([c == cls for c in classes], device=device)[:, None])
        for cls in dict.fromkeys(c for c in classes if c is not None)
    ]

    def combine(sums: torch.Tensor) -> None:
        import torch.distributed as dist

        for (mesh, dims), rows in masks:
            part = sums * rows
            for dim in dims:
                dist.all_reduce(part, group=mesh.get_group(dim))
            sums.copy_(torch.where(rows, part, sums))

    return combine


class FusedOptimizer(PlansMixin, FeaturesMixin, ChecksMixin, FallbackMixin, Optimizer):
    """Base class of the fused optimizers; a subclass declares one algorithm.

    A subclass has torch's constructor signature followed by ``**extensions`` and passes its
    arguments on as ``super().__init__(params, locals())``; its published signature lists
    fused_optim's own arguments in place of ``**extensions``. It declares:

    * ``_torch_cls``: its torch.optim counterpart, whose own checks validate the arguments
      (``check_like_torch``), so errors and messages match the installed torch, and whose
      functional form is the fallback (``_reference``); None for an algorithm torch.optim lacks,
      which checks its arguments in ``_check_arguments`` and has no fallback (its params need the
      kernels: CUDA, or the interpreter on CPU);
    * ``_algorithm``: the kernels' ``Algorithm`` (its math, state keys, device step scalars);
    * ``_hyper(group)``: the hyperparameters its math reads as ``h``, and ``_options(group)`` its
      constexpr options;
    * ``_step_scalars(group, scalars)``: the step scalars ``k`` from a parameter's host scalar
      state, in float64 as torch's single-tensor code computes them;
    * where they differ from the defaults: ``_tensor_state_keys(group)`` (the states this group
      keeps, in torch's order), ``_scalar_state`` (per-parameter scalar state and its initial
      value, or ``_initial_scalars(group)`` where that depends on the group; advanced by
      ``_advance_scalars`` on the host, by the kernels on the device),
      ``_init_region`` (initial state values), ``_state_shape`` (state not shaped like the param),
      ``_fresh_keys`` (state torch creates from the first
      grad), ``_eager_state`` (state made at construction), ``_sparse_ok``/``_sparse_error``,
      ``_fixed`` (group entries the class forces, as AdamW's decoupled decay).

    Arguments as in torch.optim, where the optimizer has them:

    * ``params``: an iterable of parameters or named parameters, or of dicts defining param groups.
    * ``maximize`` (bool): maximize the objective instead of minimizing it.
    * ``foreach``, ``fused``: accepted for compatibility, change nothing: the update is always one
      fused launch per segment.
    * ``capturable`` (bool): step counts and step scalars stay on the device, and a tensor ``lr``
      on the device is read by the kernels, so ``step()`` can be captured in a CUDA graph.
    * ``differentiable``: ``True`` raises ``NotImplementedError``.

    Arguments shared by every fused optimizer, beyond torch's (keyword-only):

    * ``master_weights`` (bool): bf16/fp16 params get an fp32 master copy (state key
      ``master_param``) that the kernel updates, writing the param back rounded; moments are then
      fp32 unless ``state_dtype`` says otherwise.
    * ``stochastic_rounding`` (bool): bf16 params without a master copy are stored with unbiased
      stochastic rounding.
    * ``rounding_seed`` (int): seeds stochastic rounding. The random bits of an element depend on
      this seed, the param group, the dtype, the step and the element's place in the group, never
      on the process or the device index: replicated params round alike on every rank, and a rerun
      gives the same bits. (Without device step counts, "the step" is this optimizer's count of
      ``step()`` calls, which a checkpoint does not keep: a resumed run draws other bits than an
      uninterrupted one, equally unbiased.)
    * ``state_dtype`` (torch.dtype): dtype of the per-element state (default: the param's), or
      ``torch.int8`` / ``torch.float8_e4m3fn``: 8-bit moments with one fp32 scale per 256
      elements (state keys ``{key}_codes``, ``{key}_scales``) for params of 4,096+ elements whose
      rows are whole blocks; other params and states keep fp32 (README, "8-bit states").
    * ``stochastic_state_rounding`` (bool): 8-bit states are rounded stochastically (unbiased)
      instead of to the nearest code.
    * ``max_grad_norm`` (float): clip the global grad norm (2-norm over every group) inside each
      step, as ``torch.nn.utils.clip_grad_norm_`` then ``step()`` would.

    AMP: ``GradScaler`` hands its scale and inf flag to ``step()``, which unscales and skips inside
    the kernels, without a host synchronisation.
    """

    _torch_cls: type[Optimizer] | None  # None: an algorithm torch.optim lacks (``_check_arguments``)
    _algorithm: Algorithm
    _scalar_state: ClassVar[dict[str, float]] = {"step": 0.0}
    _fixed: ClassVar[dict] = {}
    _sparse_ok = False
    _eager_state = False
    _row_major = False  # kernels that need each param's rows: non-contiguous params are staged
    _num_warps = 8  # 256 threads per block; elements per block follow from the dtype (block_size)
    # Blocks per program: each program pays two dependent table loads before its first access, so
    # light kernels may gain from several blocks per program, at the cost of registers and code
    # (README, "How it works"). 1 until measured on a GPU.
    _blocks_per_program = 1
    _step_supports_amp_scaling = True  # GradScaler passes grad_scale and found_inf to step()
    _own_extensions: ClassVar[dict] = {}  # a class's own options beyond _EXTENSIONS, with defaults (Muon's)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)
        torch_args = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        if len(torch_args) < len(signature.parameters):  # publish **extensions as named arguments
            ours = [
                inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in cls._extensions().items()
            ]
            init.__signature__ = signature.replace(parameters=torch_args + ours)

    def __init__(self, params, arguments: dict) -> None:
        # ``arguments`` holds the subclass constructor's arguments (its locals()): torch's own
        # checks see torch's arguments first, so bad arguments raise torch's errors.
        extensions = arguments.get("extensions", {})
        for key in extensions.keys() - self._extensions().keys():
            raise TypeError(f"{type(self).__name__}.__init__() got an unexpected keyword argument {key!r}")
        defaults = {k: v for k, v in arguments.items() if k not in ("self", "params", "__class__", "extensions")}
        defaults = self._normalize({**defaults, **self._fixed})
        if self._torch_cls is None:  # beyond torch.optim: the class checks its own arguments
            self._check_arguments(defaults)
        else:
            check_like_torch(self._torch_cls, **defaults)
        self._check_options(defaults)
        # Optimizer-wide settings, outside param_groups so that those stay torch's.
        self.options = {**self._extensions(), **extensions}
        self.options["master_weights"] = bool(self.options["master_weights"])
        self.options["stochastic_rounding"] = bool(self.options["stochastic_rounding"])
        check_extensions(self.options)
        self._check_state_dtype()
        super().__init__(params, defaults)
        self._reset_engine()
        if self._eager_state:
            for index, group in enumerate(self.param_groups):
                self._layout(index, group, None, everyone=True)
            self._tracker.dirty = False

    @classmethod
    def _extensions(cls) -> dict:
        """fused_optim's keyword arguments beyond torch's, with their defaults."""
        return {**_EXTENSIONS, **cls._own_extensions}

    # --- what a subclass declares ---------------------------------------------------------------
    def _check_arguments(self, defaults: dict) -> None:
        """Raise ``ValueError`` for bad arguments (classes without ``_torch_cls``)."""
        raise NotImplementedError

    def _normalize(self, defaults: dict) -> dict:
        """The constructor's torch arguments as torch keeps them in ``defaults``."""
        return defaults

    def _hyper(self, group) -> tuple[float, ...]:
        raise NotImplementedError

    def _options(self, group) -> tuple[bool, ...]:
        return ()

    def _step_scalars(self, group, scalars: dict[str, float]) -> tuple[float, ...]:
        return ()

    def _weight_decay(self, group) -> tuple[float, bool]:
        """The weight decay the kernel's skeleton applies before the math, and whether it is
        decoupled (torch's ``weight_decay``, ``decoupled_weight_decay``); (0, False) for an
        algorithm whose math applies its own (LAMB, LARS)."""
        return as_float(group.get("weight_decay", 0.0)), bool(group.get("decoupled_weight_decay", False))

    def _tensor_state_keys(self, group) -> tuple[str, ...]:
        return self._algorithm.state_keys

    def _fresh_keys(self, group) -> tuple[str, ...]:
        return ()

    def _state_shape(self, group, key: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """Shape of state ``key`` for a param of ``shape`` (None: no such state for it)."""
        return shape

    def _init_region(self, group, key: str, region: torch.Tensor, param: torch.Tensor) -> None:
        """Initial value of a state region (torch's state initialization)."""
        region.zero_()

    def _initial_scalars(self, group) -> dict[str, float]:
        """Initial values of the per-parameter scalar state (``_scalar_state``) in ``group``."""
        return self._scalar_state

    def _advance_scalars(self, group, scalars: dict[str, np.ndarray]) -> None:
        """Advance the host scalar state of the params being updated, in place (torch: step += 1)."""
        scalars["step"] += 1

    def _check_sparse(self, group, grads) -> None:
        """Called when a group holds sparse grads (``_sparse_ok``): raise what torch raises."""

    @property
    def _sparse_error(self) -> str:
        """torch's message for sparse grads where the algorithm refuses them."""
        return f"{type(self).__name__} does not support sparse gradients"

    # --- engine state ------------------------------------------------------------------------
    def _reset_engine(self) -> None:
        tracker = getattr(self, "_tracker", None) or Tracker()
        self._tracker = tracker
        if not isinstance(self.state, TrackedState) or self.state._tracker is not tracker:
            self.state = TrackedState(tracker, self.state)
        self._caches: dict = {}  # group index -> GroupCache
        self._amp_steps = getattr(self, "_amp_steps", False)  # AMP moved step counts to the device
        self._pending_clip = None  # (coefficient, the grads it is for) from clip_grad_norm_, for the next step
        self._loaded = getattr(self, "_loaded", {})  # id(param) -> its state as saved (dtypes kept), while loading
        self._step_count = getattr(self, "_step_count", 0)  # seeds stochastic rounding
        self._graph_launches = getattr(self, "_graph_launches", {})  # what captured graphs read: kept alive
        tracker.dirty = True

    @property
    def max_grad_norm(self) -> float | None:
        return self.options["max_grad_norm"]

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "options": self.options}

    def __setstate__(self, state: dict) -> None:
        if "options" in state:  # pickled or deep-copied; load_state_dict keeps the current ones
            self.options = {**self._extensions(), **state.pop("options")}  # options added since then: defaults
        super().__setstate__(state)
        # groups saved by an older version get the constructor's defaults, as torch.optim does
        defaults = {
            name: arg.default
            for name, arg in inspect.signature(type(self).__init__).parameters.items()
            if arg.default is not arg.empty and name not in self._extensions()
        }
        for group in self.param_groups:
            for key, value in defaults.items():
                group.setdefault(key, value)
            group.update(self._fixed)
        self._reset_engine()

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
        inputs = StepInputs(grad_scale, found_inf, self._clip_coef(work, grad_scale))
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

    def _step_with_group_counters(self, closure, grad_scale, found_inf, advance, commit):
        """``step()`` of an algorithm whose counters live in its param groups on the host, as its
        reference keeps them (ScheduleFreeAdamW's ``k``, StableAdamW's ``step``). AMP's
        ``found_inf`` is read on the host, and a skipped step advances nothing. ``advance(group)``
        returns (the group's step scalars, which ``_host_step_scalars`` reads back from
        ``self._group_scalars``, and what ``commit(group, it)`` then writes into the group, with
        or without grads)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = found_inf if found_inf is not None else getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf):  # as GradScaler skips the reference's step()
            self._pending_clip = None
            return loss
        for group in self.param_groups:  # before advance() reads them
            self._check_options(group)
        advanced = [advance(group) for group in self.param_groups]
        self._group_scalars = {id(group): scalars for group, (scalars, _) in zip(self.param_groups, advanced)}
        try:
            FusedOptimizer.step(self, grad_scale=grad_scale, found_inf=found_inf)
        finally:
            self._group_scalars = {}
        for group, (_, entries) in zip(self.param_groups, advanced):
            commit(group, entries)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._pending_clip = None  # a clip coefficient belongs to the grads it was computed on
        super().zero_grad(set_to_none)

    def _run(self, group, launch: Launch, grads, inputs: StepInputs) -> None:
        seg = launch.seg
        if launch.tables is None:
            self._run_reference(group, launch, grads, inputs)
        else:
            launch.stage_in(grads)
            launch.stage_params_in()
            launch.features = self._features(group, launch, inputs)
            self._launch(group, launch)
            launch.stage_params_out()
        if seg.fresh:
            if launch.fresh and inputs.found_inf is not None and bool(inputs.found_inf):
                return  # a skipped first step (AMP) leaves fresh state for the next one (reads found_inf once)
            seg.fresh.difference_update(launch.rows.tolist())  # this step wrote them

    def _launch(self, group, launch: Launch) -> None:
        """Advance the scalar state of the launch's rows, then one launch of the update kernel."""
        seg, features = launch.seg, launch.features
        lr = 0.0 if features.lr_tensor is not None else as_float(group["lr"])  # a device lr is read on the device
        weight_decay, decoupled = self._weight_decay(group)
        hyper, options = self._hyper(group), self._options(group)
        if seg.device_step:
            aux = tuple(v for k, v in seg.scalars.items() if k != "step")  # NAdam's mu_product, ASGD's eta, mu
            scalars = advance(
                self._algorithm, launch.tables, features, lr=lr, hyper=hyper, options=options,
                weight_decay=weight_decay, decoupled=decoupled, aux=aux,
            )  # fmt: skip
        else:
            scalars = self._host_step_scalars(group, launch, lr, weight_decay, decoupled)
        update_step(
            self._algorithm, launch.tables, seg.flat, param_dtype=seg.dtype, lr=lr, hyper=hyper, options=options,
            step_scalars=scalars, weight_decay=weight_decay, decoupled=decoupled,
            maximize=bool(group.get("maximize", False)), features=features, num_warps=self._num_warps,
            combine_sums=self._combine_sums(launch), **self._codes(seg),
        )  # fmt: skip

    def _codes(self, seg) -> dict:
        """``update_step``'s arguments for the 8-bit states of a segment."""
        return {"scales": seg.scales, "stochastic_codes": self.options["stochastic_state_rounding"]}

    def _combine_sums(self, launch: Launch):
        """For per-tensor sums (LAMB's norms) of DTensor params: a function that adds up each sharded
        param's sums over the ranks that shard it, so that they are the whole tensor's; None when
        the launch holds no sharded param. Made once per launch: its row masks are device tensors,
        which a step inside a CUDA graph capture could not copy from the host."""
        if not self._algorithm.n_sums:
            return None
        if launch.combine_sums is None:
            classes = [launch.seg.norm_classes[i] for i in launch.rows.tolist()]
            launch.combine_sums = (_sums_combiner(classes, launch.tables.tensor_table.device),)
        return launch.combine_sums[0]

    def _host_step_scalars(self, group, launch: Launch, lr: float, weight_decay: float, decoupled: bool):
        """Advance the host scalar state of the launch's rows (torch: ``step += 1`` per param) and
        return their step scalars: a tuple when every row has the same scalar state, else a
        per-tensor table. The advance is kept only once the scalars are computed."""
        seg = launch.seg
        if not seg.scalars_np:
            return ()
        rows = slice(None) if launch.all_rows else launch.rows
        values = {k: a[rows].copy() for k, a in seg.scalars_np.items()}
        self._advance_scalars(group, values)
        scalars = self._step_scalars_of(group, values, lr, weight_decay, decoupled, seg.device)
        for k, a in seg.scalars_np.items():
            a[rows] = values[k]
        return scalars

    def _step_scalars_of(self, group, values: dict, lr: float, weight_decay: float, decoupled: bool, device):
        if not self._algorithm.n_step:
            return ()
        if all(v.min() == v.max() for v in values.values()):
            return self._step_scalars(group, {k: float(v[0]) for k, v in values.items()})
        keys = list(values)
        distinct, inverse = np.unique(np.stack([values[k] for k in keys], axis=1), axis=0, return_inverse=True)
        per_row = [self._step_scalars(group, dict(zip(keys, map(float, row)))) for row in distinct]
        per_row = np.asarray(per_row, dtype=np.float64)[inverse.reshape(-1)]
        return step_table(per_row, lr, weight_decay, decoupled, values["step"], device)

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
                total += sum(2 * seg.key_numel(k) * flat.dtype.itemsize for k, flat in seg.flat.items())
                total += sum(2 * scales.numel() * scales.dtype.itemsize for scales in seg.scales.values())
        return total

    # --- torch.optim compatibility -----------------------------------------------------------
    def state_dict(self):
        state_dict = super().state_dict()
        state_dict["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in state_dict["state"].items()}
        return state_dict

    def dequantized_state_dict(self) -> dict:
        """``state_dict()`` with every 8-bit state (``{key}_codes``, ``{key}_scales``) replaced by its
        fp32 values under torch's key: a checkpoint that ``torch.optim`` (and this optimizer with
        any ``state_dtype``) loads."""
        state_dict = self.state_dict()
        for state in state_dict["state"].values():
            for key in [k for k in CODES if f"{k}_codes" in state]:
                state[key] = dequantize(state.pop(f"{key}_codes"), state.pop(f"{key}_scales"), CODES[key])
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

    def _adopt_loaded(self) -> None:
        self._reset_engine()
        for index, group in enumerate(self.param_groups):
            self._layout(index, group, None)
        self._tracker.dirty = False
