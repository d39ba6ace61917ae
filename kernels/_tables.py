"""Shared pieces of every fused update kernel: launch tables, jit helpers and the launcher.

One launch covers one *segment* (the tensors of a param group that share device and dtype).
Two small int64 tables on the device describe it:

* the tensor table, one row per tensor in the launch (``ROW`` columns):
  ``param address, grad address, state offset, numel, vector end, flags, member, 0``;
  ``member`` indexes the segment's per-parameter scalar state (device steps).
  The state offset indexes the optimizer-owned flat state buffers (a multiple of ``ALIGN``
  elements, so every region is 16-byte aligned). ``vector end`` is the number of leading
  elements that may take the unmasked, 128-bit path: ``numel`` rounded down to a whole block
  when param and grad are 16-byte aligned, else 0.
* the block table, one entry per program: ``tensor index << 32 | block index in the tensor``.

Hyperparameters are runtime arguments. Float scalars travel as the int64 bit pattern of their
float64 value (``float_bits``), because Triton passes Python floats as fp32 and fp64 params
need fp64 scalars; the kernel turns them back with ``hp``. Those arguments are never
specialized, so no value of lr, betas or eps can cause a new compilation.
"""

# No `from __future__ import annotations` here: Triton 3.0's interpreter recognizes
# `tl.constexpr` parameters only from evaluated annotations.
import inspect
import struct
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

ROW = 8  # columns of the tensor table (64-byte rows)
COL_PARAM, COL_GRAD, COL_STATE, COL_NUMEL, COL_VEC_END, COL_FLAGS, COL_MEMBER, _ = range(ROW)
FLAG_FRESH = 1  # flags bit: state that torch creates from the first grad is written by this step
ALIGN = 16  # state regions start at multiples of this many elements
VEC_BYTES = 16  # the vectorized path needs param and grad addresses aligned to this


def block_size(num_warps: int, itemsize: int) -> int:
    """Elements per program: every thread moves one 16-byte vector of an array of ``itemsize``-byte
    elements (fp32: 1,024 with 8 warps). Fewer elements per thread keep registers low (no spills
    on the masked path); 16 bytes keeps the full-block accesses 128-bit wide."""
    return num_warps * 32 * VEC_BYTES // itemsize


_TRITON_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


def triton_dtype(dtype: torch.dtype):
    """The Triton element type of a real floating torch dtype."""
    try:
        return _TRITON_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"fused_optim kernels do not handle {dtype}") from None


def compute_dtype(dtype: torch.dtype):
    """Math runs in fp32, or fp64 for fp64 tensors."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def float_bits(x: float) -> int:
    """The int64 bit pattern of ``float(x)`` as float64; ``hp`` undoes it inside a kernel."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under TRITON_INTERPRET=1 (it then runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def jit_kernel(*, unspecialized: list[str]):
    """``triton.jit`` for an update kernel whose ``unspecialized`` arguments (the hyperparameters)
    Triton must never specialize on; the names are kept on the kernel for ``specialization_key``."""

    def wrap(fn):
        kernel = triton.jit(do_not_specialize=unspecialized)(fn)
        kernel.unspecialized = tuple(unspecialized)
        return kernel

    return wrap


@triton.jit
def _probe():
    pass


# True when TRITON_INTERPRET=1 was set before import: kernels then run on CPU tensors.
INTERPRETED = is_interpreted(_probe)

if INTERPRETED:

    @triton.jit
    def to_storage(x, DTYPE: tl.constexpr):
        """Round to the storage dtype, to nearest even as the GPU's cvt.rn does. The interpreter
        truncates fp32 -> bf16 (and its RTNE mode rounds ties up), so bf16 is rounded here."""
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
            quiet_nan = ((bits >> 16) & 0x8000).to(tl.uint16) | 0x7FC0
            r = tl.where(x != x, quiet_nan, rounded)
        else:
            r = x.to(DTYPE)
        return r

else:

    @triton.jit
    def to_storage(x, DTYPE: tl.constexpr):
        """Round to the storage dtype (to nearest even)."""
        return x.to(DTYPE)


@triton.jit
def hp(bits, DTYPE: tl.constexpr):
    """A hyperparameter passed by ``float_bits``, as a scalar of DTYPE."""
    # The interpreter types small ints (the bits of 0.0) as int32: widen before the bitcast.
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(DTYPE)


@triton.jit
def ieee_sqrt(x, C_DTYPE: tl.constexpr):
    """Correctly rounded square root (tl.sqrt may be approximate in fp32; fp64 sqrt is exact)."""
    if C_DTYPE == tl.float64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def ieee_div(x, y, C_DTYPE: tl.constexpr):
    """Correctly rounded division (fp32 ``/`` may be approximate; fp64 division is exact)."""
    if C_DTYPE == tl.float64:
        r = x / y
    else:
        r = tl.div_rn(x, y)
    return r


@triton.jit
def locate(tensor_table, block_table, BLOCK: tl.constexpr):
    """Where this program works: (tensor index, element offsets, param address, grad address,
    state offset, numel, full) where ``full`` means the block may use the unmasked 128-bit path."""
    entry = tl.load(block_table + tl.program_id(0))
    t = entry >> 32
    start = (entry & 0xFFFFFFFF) * BLOCK
    row = tensor_table + t * 8  # ROW
    p_addr = tl.load(row + 0)
    g_addr = tl.load(row + 1)
    s_off = tl.load(row + 2)
    numel = tl.load(row + 3)
    vec_end = tl.load(row + 4)
    offs = start + tl.arange(0, BLOCK)
    return t, offs, p_addr, g_addr, s_off, numel, start + BLOCK <= vec_end


@triton.jit
def as_ptr(addr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """A typed pointer from a table address; ALIGNED adds the 16-byte hint that lets the
    compiler emit 128-bit accesses (only valid on the full-block path)."""
    # Literal element types: Triton 3.0 passes DTYPE to tl.pointer_type still wrapped as a constexpr.
    if DTYPE == tl.float32:
        ptr = addr.to(tl.pointer_type(tl.float32))
    elif DTYPE == tl.float64:
        ptr = addr.to(tl.pointer_type(tl.float64))
    elif DTYPE == tl.bfloat16:
        ptr = addr.to(tl.pointer_type(tl.bfloat16))
    else:
        tl.static_assert(DTYPE == tl.float16)
        ptr = addr.to(tl.pointer_type(tl.float16))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def region(base, s_off, ALIGNED: tl.constexpr):
    """Pointer to a tensor's region of a flat state buffer. Regions start at multiples of ALIGN
    elements; ALIGNED adds the 16-byte hint for the full-block path. (Hints attach to the op that
    makes a value, so they are applied here, on a pointer this helper creates, and in ``as_ptr``:
    a hint on a value passed into a helper would be lost.)"""
    ptr = base + s_off
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def is_fresh(tensor_table, t):
    """Whether tensor ``t`` carries FLAG_FRESH (1)."""
    return (tl.load(tensor_table + t * 8 + 5) & 1) != 0  # ROW, COL_FLAGS, FLAG_FRESH


@triton.jit
def step_scalar(step_table, t, j, WIDTH: tl.constexpr, bits, PER_TENSOR: tl.constexpr, C_DTYPE: tl.constexpr):
    """Step-dependent scalar ``j``: from the per-tensor float64 table (tensors at different steps),
    else the launch-wide argument passed by ``float_bits``."""
    if PER_TENSOR:
        v = tl.load(step_table + t * WIDTH + j).to(C_DTYPE)
    else:
        v = hp(bits, C_DTYPE)
    return v


@triton.jit
def torch_lerp(start, end, weight):
    """``start.lerp_(end, weight)`` as torch computes it: two-sided, exact at weight 0 and 1."""
    small = weight < 0.5
    return tl.fma(tl.where(small, weight, weight - 1.0), end - start, tl.where(small, start, end))


@triton.jit
def decay_addcmul(avg, x, beta, weight):
    """``avg.mul_(beta).addcmul_(x, x, value=weight)``: one rounding for the product, one fused
    multiply-add, as torch's CPU kernels do."""
    return tl.fma(weight * x, x, avg * beta)


@triton.jit
def prepare_grad(p, g, decay, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr):
    """The grad every algorithm starts from, in torch's order: negated if MAXIMIZE, then L2 decay
    ``g + decay * p`` (``grad.add(param, alpha=weight_decay)``) or, DECOUPLED, the param decayed
    as ``p * decay`` with ``decay = 1 - lr * weight_decay``. Returns (p, g)."""
    if MAXIMIZE:
        g = -g
    if WEIGHT_DECAY:
        if DECOUPLED:
            p = p * decay
        else:
            g = tl.fma(decay, p, g)
    return p, g


@dataclass
class Tables:
    """Device tables for one launch; built once and reused while no storage changes."""

    tensor_table: torch.Tensor  # int64 [n, ROW]
    block_table: torch.Tensor  # int64 [n_blocks]
    n_blocks: int
    block: int
    rows: np.ndarray  # the tensor table on the host (shares memory with it on CPU)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    host = torch.from_numpy(array)
    if device.type == "cpu":
        return host
    # Pinned memory + non_blocking: a pageable copy would wait for the stream (a host sync).
    return host.pin_memory().to(device, non_blocking=True)


def _vector_end(param_addrs: np.ndarray, grad_addrs: np.ndarray, numels: np.ndarray, block: int) -> np.ndarray:
    """The table's vector end: whole blocks when param and grad are 16-byte aligned, else 0."""
    aligned = (param_addrs % VEC_BYTES == 0) & (grad_addrs % VEC_BYTES == 0)
    return np.where(aligned, numels // block * block, 0)


def build_tables(
    param_addrs: np.ndarray,
    grad_addrs: np.ndarray,
    state_offsets: np.ndarray,
    numels: np.ndarray,
    flags: np.ndarray,
    members: np.ndarray,
    block: int,
    device: torch.device,
) -> Tables:
    """Tensor and block tables for tensors laid end to end (all arrays have one entry per tensor)."""
    n = len(numels)
    numels = numels.astype(np.int64)
    rows = np.empty((n, ROW), dtype=np.int64)
    rows[:, COL_PARAM] = param_addrs
    rows[:, COL_GRAD] = grad_addrs
    rows[:, COL_STATE] = state_offsets
    rows[:, COL_NUMEL] = numels
    rows[:, COL_VEC_END] = _vector_end(rows[:, COL_PARAM], rows[:, COL_GRAD], numels, block)
    rows[:, COL_FLAGS] = flags
    rows[:, COL_MEMBER] = members
    rows[:, 7] = 0
    per_tensor = -(-numels // block)  # blocks per tensor (0 for empty tensors)
    total = int(per_tensor.sum())
    tensor_of_block = np.repeat(np.arange(n, dtype=np.int64), per_tensor)
    first_block = np.repeat(np.cumsum(per_tensor) - per_tensor, per_tensor)
    blocks = (tensor_of_block << 32) | (np.arange(total, dtype=np.int64) - first_block)
    return Tables(_to_device(rows, device), _to_device(blocks, device), total, block, rows)


def repoint_grads(tables: Tables, which: np.ndarray, grad_addrs: np.ndarray) -> None:
    """Point rows ``which`` of the tensor table at new grad addresses (grads that autograd
    reallocated), keeping everything else: the block table depends on numels only. The vector end
    follows the new grad's alignment. On an accelerator the table is rewritten in place by a
    stream-ordered copy, so kernels already queued read the old addresses and later ones the new."""
    rows = tables.rows
    rows[which, COL_GRAD] = grad_addrs
    rows[which, COL_VEC_END] = _vector_end(rows[which, COL_PARAM], grad_addrs, rows[which, COL_NUMEL], tables.block)
    if tables.tensor_table.device.type != "cpu":
        tables.tensor_table.copy_(torch.from_numpy(rows).pin_memory(), non_blocking=True)


def scalar_table(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """Per-tensor float64 scalars (used only when tensors of one launch are at different steps)."""
    return _to_device(np.ascontiguousarray(values, dtype=np.float64), device)


def step_args(step_scalars, width: int, tables: Tables):
    """Kernel arguments for step-dependent scalars: (table tensor, per-scalar bits, PER_TENSOR).
    ``step_scalars`` is a tuple of floats (one step value for the launch) or a float64 device table
    of ``width`` columns, one row per tensor."""
    if isinstance(step_scalars, torch.Tensor):
        return step_scalars, (0,) * width, True
    assert len(step_scalars) == width, (step_scalars, width)
    return tables.tensor_table, tuple(float_bits(x) for x in step_scalars), False


_recorders: list[list] = []


@contextmanager
def record_launches():
    """Collect ``(kernel name, specialization key)`` for every launch inside the block (tests)."""
    log: list = []
    _recorders.append(log)
    try:
        yield log
    finally:
        _recorders.remove(log)


def launch(kernel, tables: Tables, args: tuple, constexprs: dict, num_warps: int) -> None:
    """Launch ``kernel`` over the blocks of ``tables``; ``args`` follow the two table pointers."""
    if tables.n_blocks == 0:
        return
    if _recorders:
        key = specialization_key(
            kernel, (tables.tensor_table, tables.block_table, *args), {**constexprs, "BLOCK": tables.block}
        )
        for log in _recorders:
            log.append((getattr(kernel, "__name__", None) or kernel.fn.__name__, key))
    kernel[(tables.n_blocks,)](
        tables.tensor_table,
        tables.block_table,
        *args,
        BLOCK=tables.block,
        **constexprs,
        num_warps=num_warps,
        # Explicit so that results do not depend on the Triton version's default; separate
        # rounding of multiply and add follows torch's CPU single-tensor arithmetic.
        enable_fp_fusion=False,
    )


def specialization_key(kernel, args: tuple, constexprs: dict) -> tuple:
    """What Triton's jit cache keys a launch on, from the launcher's side: the constexpr values and,
    for every runtime argument, its type plus the properties Triton specializes on (16-byte
    alignment of pointers, divisibility by 16 and equality to 1 of ints not listed in
    ``do_not_specialize``). Equal keys mean no new compilation; the interpreter compiles nothing,
    so tests on CPU check this key, and tests on CUDA also check the real jit cache. Kernels are
    made with ``jit_kernel``, which records the arguments Triton is told not to specialize."""
    fn = getattr(kernel, "fn", kernel)
    names = [n for n in inspect.signature(fn).parameters if n not in constexprs]
    dns = set(kernel.unspecialized)
    key = []
    for name, value in zip(names, args, strict=True):
        if isinstance(value, torch.Tensor):
            key.append((name, str(value.dtype), value.data_ptr() % 16 == 0))
        elif isinstance(value, bool):
            key.append((name, "i1", value))
        elif isinstance(value, int):
            if name in dns:
                key.append((name, "i64"))
            else:
                key.append((name, "i64", value % 16 == 0, value == 1))
        elif isinstance(value, float):
            key.append((name, "fp32"))
        else:
            key.append((name, repr(value)))
    key.extend(sorted((k, repr(v)) for k, v in constexprs.items()))
    return tuple(key)


def jit_cache_size(kernel) -> int:
    """Number of compiled specializations of a (non-interpreted) kernel, across devices."""
    caches = getattr(kernel, "device_caches", None)
    if caches is not None:  # Triton >= 3.1
        return sum(len(entry[0]) for entry in caches.values())
    return sum(len(c) for c in getattr(kernel, "cache", {}).values())  # Triton 3.0
