"""Checks: everything that can fail is checked for every group before the first param changes.

Arguments are checked by torch.optim's own code (same errors, same messages, for the installed
torch); options, grads and state are checked whenever a group's cached plan misses, and a
checkpoint is checked before torch's ``load_state_dict`` modifies anything.
"""

from __future__ import annotations

import inspect

import torch

from . import _dtensor
from ._fallback import uses_triton
from ._quant import CODES, QB, QUANT_DTYPES
from ._segments import COMPLEX_DTYPES, REAL_DTYPES, real_dtype

PLACEHOLDER_SHAPES: dict[type, tuple[int, ...]] = {}  # torch classes that refuse a 1-D placeholder (Muon: 2-D)


def check_like_torch(torch_cls, **kwargs) -> None:
    """Run ``torch_cls``'s own argument checks, raising its errors with its messages for the
    installed torch version, by building it over a placeholder parameter (empty, 1-D unless
    ``PLACEHOLDER_SHAPES`` says otherwise). Arguments that this torch version does not know are
    left out."""
    accepted = inspect.signature(torch_cls.__init__).parameters
    placeholder = torch.zeros(PLACEHOLDER_SHAPES.get(torch_cls, (0,)), requires_grad=True)
    torch_cls([placeholder], **{k: v for k, v in kwargs.items() if k in accepted})


def check_extensions(options: dict) -> None:
    """fused_optim's own arguments (``master_weights``, ``stochastic_rounding``, ``rounding_seed``,
    ``state_dtype``, ``stochastic_state_rounding``, ``max_grad_norm``)."""
    dtypes = (*REAL_DTYPES, *QUANT_DTYPES)
    if options["state_dtype"] is not None and options["state_dtype"] not in dtypes:
        raise ValueError(f"Invalid state_dtype: {options['state_dtype']} (choose among {', '.join(map(str, dtypes))})")
    if options["stochastic_state_rounding"] and options["state_dtype"] not in QUANT_DTYPES:
        raise ValueError(
            "stochastic_state_rounding rounds 8-bit states: it needs state_dtype=torch.int8 or torch.float8_e4m3fn"
        )
    if options["master_weights"] and options["stochastic_rounding"]:
        raise ValueError("master_weights and stochastic_rounding are exclusive: the master copy keeps full precision")
    if not isinstance(options["rounding_seed"], int) or isinstance(options["rounding_seed"], bool):
        raise TypeError(f"rounding_seed must be an int, not {type(options['rounding_seed']).__name__}")
    if options["max_grad_norm"] is not None and not options["max_grad_norm"] > 0:
        raise ValueError(f"Invalid max_grad_norm value: {options['max_grad_norm']}")


class ChecksMixin:
    """The checks of ``FusedOptimizer``."""

    def _check_state_dtype(self) -> None:
        """An 8-bit ``state_dtype`` needs an algorithm with moments to quantize."""
        state_dtype = self.options["state_dtype"]
        if state_dtype in QUANT_DTYPES and not any(k in CODES for k in getattr(self._algorithm, "state_keys", ())):
            raise NotImplementedError(
                f"fused_optim.{type(self).__name__} does not implement state_dtype={state_dtype}: its state holds "
                'no moment to quantize (8-bit states: README, "8-bit states")'
            )

    def _check_options(self, group) -> None:
        name = type(self).__name__
        if group.get("differentiable"):
            raise NotImplementedError(f"fused_optim.{name} does not implement differentiable=True")
        if group.get("capturable") and "capturable" not in inspect.signature(type(self).__init__).parameters:
            raise NotImplementedError(f"fused_optim.{name} does not implement capturable=True")
        capturable = group.get("capturable")
        for key, value in group.items():
            if key == "params":
                continue
            many = isinstance(value, (tuple, list))
            for j, v in enumerate(value if many else (value,)):
                if not isinstance(v, torch.Tensor):
                    continue
                if v.numel() != 1:  # torch's check, made here for every group before any param changes
                    raise ValueError(
                        f"Tensor {key}[{j}] must be 1-element" if many else f"Tensor {key} must be 1-element"
                    )
                # lr is read by the kernels; other hyperparameters are read on the host, which a
                # tensor on an accelerator would turn into a sync (and a failed CUDA graph capture)
                if capturable and key != "lr" and v.device.type != "cpu":
                    raise NotImplementedError(
                        f"fused_optim.{name} with capturable=True takes {key} as floats or CPU tensors, "
                        "not as tensors on an accelerator (only lr may be one)"
                    )

    def _validate(self, index: int, group, grads) -> None:
        name = type(self).__name__
        params = group["params"]
        if len({id(p) for p in params}) != len(params):
            raise NotImplementedError(f"fused_optim.{name}: a param group lists the same parameter twice")
        sparse = False
        for i, (p, g) in enumerate(zip(params, grads)):
            where = f"parameter {i} of param group {index}"
            if g is not None and g.layout != torch.strided:
                if not self._sparse_ok:
                    raise RuntimeError(self._sparse_error)
                sparse = True
            if _dtensor.local(p).is_conj():
                raise NotImplementedError(
                    f"fused_optim.{name}: {where} is a lazily conjugated view (is_conj()); step its "
                    "resolved values instead (param.data = param.resolve_conj())"
                )
            if p.dtype not in REAL_DTYPES and p.dtype not in COMPLEX_DTYPES:
                raise NotImplementedError(
                    f"fused_optim.{name}: {where} has dtype {p.dtype}; "
                    "supported are float32, float64, float16, bfloat16, complex64 and complex128"
                )
            if self._quantizes(p):
                self._check_quantizable(p, where)
            if p.is_complex() and self.options["state_dtype"] == torch.bfloat16:
                raise NotImplementedError(
                    f"fused_optim.{name}: state_dtype=torch.bfloat16 for complex params ({where}): torch has no "
                    "complex bf16 view of them"
                )
            if self.options["stochastic_rounding"] and p.dtype == torch.float16:
                raise NotImplementedError(
                    f"fused_optim.{name}: stochastic_rounding rounds to bfloat16; {where} is float16 "
                    "(use master_weights=True for fp16 params)"
                )
            q = p if _dtensor.is_dtensor(g) else _dtensor.local(p)  # grads of DTensors arrive as local shards
            if g is not None and (g.dtype != q.dtype or g.shape != q.shape or g.device != q.device):
                raise RuntimeError(
                    f"fused_optim.{name}: the grad of {where} ({g.dtype}, {tuple(g.shape)}, {g.device}) "
                    f"does not match the parameter ({q.dtype}, {tuple(q.shape)}, {q.device})"
                )
            if not uses_triton(p.device):
                self._check_fallback(group, p, where)
            if getattr(self._algorithm, "n_sums", 0) and _dtensor.norm_class(p) == _dtensor.PARTIAL:
                raise NotImplementedError(
                    f"fused_optim.{name}: {where} has a Partial placement; its per-tensor norms need the "
                    "param's values, which a Partial DTensor does not hold"
                )
            state = self.state.get(p)
            if state:
                self._check_state(state, p, group, where)
        if sparse:
            self._check_sparse(group, grads)

    def _check_quantizable(self, p: torch.Tensor, where: str) -> None:
        """8-bit states of ``p``: real, and sharded (if at all) by rows, so that no block straddles ranks."""
        name, state_dtype = type(self).__name__, self.options["state_dtype"]
        if p.is_complex():
            raise NotImplementedError(f"fused_optim.{name}: state_dtype={state_dtype} for complex params ({where})")
        placements = getattr(p, "placements", ())
        if any(not (pl.is_replicate() or (pl.is_shard() and pl.dim == 0)) for pl in placements):
            raise NotImplementedError(
                f"fused_optim.{name}: state_dtype={state_dtype} needs params sharded by rows (Shard(0)) or "
                f"replicated; {where} has placements {tuple(placements)}"
            )

    def _check_fallback(self, group, p: torch.Tensor, where: str) -> None:
        """Options torch.optim's implementation (devices the kernels do not run on) cannot honour."""
        if self._torch_cls is None:
            raise NotImplementedError(
                f"fused_optim.{type(self).__name__} has no torch.optim counterpart to run where the Triton kernels "
                f"do not, as on {p.device} ({where}): use CUDA, or set TRITON_INTERPRET=1 before importing "
                "fused_optim to run them on CPU through Triton's interpreter"
            )
        dtype = real_dtype(p.dtype)
        keys = self._key_dtypes(group, dtype, self._quantizes(p))
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
        for key in self._key_dtypes(group, real_dtype(p.dtype)):
            value = state.get(key)
            shape = p.shape if key == "master_param" else self._state_shape(group, key, tuple(p.shape))
            if value is None and key in CODES and f"{key}_codes" in state:  # 8-bit (as saved by any state_dtype)
                self._check_codes(state, key, p, where)
                continue
            if shape is None or (value is None and key in optional):
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"state of {where} has no tensor {key!r} (found {type(value).__name__})")
            if value.shape != shape or value.is_complex() != p.is_complex():
                raise ValueError(
                    f"state {key!r} of {where} has shape {tuple(value.shape)} and dtype {value.dtype}, "
                    f"but the parameter has shape {tuple(p.shape)} and dtype {p.dtype}"
                    + ("" if shape == p.shape else f" (this state has shape {tuple(shape)} for it)")
                )
            mine, its = _dtensor.local(value).shape, _dtensor.local(p).shape
            if shape == p.shape and mine != its:  # a DTensor param needs its state sharded alike
                raise ValueError(
                    f"state {key!r} of {where} holds a local shard of shape {tuple(mine)}, but the parameter's "
                    f"local shard has shape {tuple(its)} (placements {getattr(value, 'placements', None)} vs "
                    f"{getattr(p, 'placements', None)})"
                )

    def _check_codes(self, state: dict, key: str, p: torch.Tensor, where: str) -> None:
        """``{key}_codes`` and ``{key}_scales`` as an 8-bit state of ``p`` keeps them."""
        codes, scales = state[f"{key}_codes"], state.get(f"{key}_scales")
        rows = p.shape[0] if p.dim() else 0
        blocks = (rows, p.numel() // rows // QB) if rows else None
        if (
            not isinstance(codes, torch.Tensor)
            or not isinstance(scales, torch.Tensor)
            or codes.dtype not in QUANT_DTYPES
            or codes.shape != p.shape
            or scales.dtype != torch.float32
            or tuple(scales.shape) != blocks
            or p.numel() % QB
        ):
            raise ValueError(
                f"state {key!r} of {where} is stored as {key}_codes and {key}_scales, which must be int8 or "
                f"float8_e4m3fn codes shaped like the parameter {tuple(p.shape)} and float32 scales of shape "
                f"{blocks} (blocks of {QB} elements per row)"
            )
        if _dtensor.local(codes).shape != _dtensor.local(p).shape:
            raise ValueError(f"state {key!r} of {where}: its codes are sharded unlike the parameter")

    def _check_loadable(self, state_dict) -> None:
        """Runs as the last pre-hook of ``load_state_dict``: it sees the dict the user's hooks made
        and rejects it before torch modifies anything."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            return  # torch raises its own error for these, before modifying anything
        loaded = {}
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            options = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            self._check_options(options)
            for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                state = state_dict["state"].get(pid)
                if state:
                    self._check_state(state, p, options, where=f"parameter {i} of param group {index}")
                    loaded[id(p)] = state
        # torch casts loaded state to the param dtype; adoption copies from these originals, so
        # fp32 moments and master copies of bf16 params keep their precision
        self._loaded = loaded
