"""The launch tables of one segment: built on the host, read by every kernel.

One launch covers one *segment* (the tensors of a param group that share device and dtype).
Two small int64 tables on the device describe it:

* the tensor table, one row per tensor in the launch (``ROW`` columns):
  ``param address, grad address, state offset, numel, vector end, flags, member, 0``;
  ``member`` indexes the segment's per-parameter scalar state (device steps).
  The state offset indexes the optimizer-owned flat state buffers (a multiple of ``ALIGN``
  elements, so every region is 16-byte aligned). ``vector end`` is the number of leading
  elements that may take the unmasked, 128-bit path: ``numel`` rounded down to a whole block
  when param and grad are 16-byte aligned, else 0.
* the block table, one entry per program: ``tensor index << 32 | chunk index in the tensor``,
  where a chunk is ``blocks`` consecutive blocks of ``block`` elements (``Tables.blocks``: one
  block per program, or several, so that the two dependent table loads of a program are paid
  once for more data; a compile-time constant of the kernels, to be tuned on the GPU).

Also here: the launch wrapper (one place that calls Triton, so tests can record launches) and the
specialization key a launch compiles under.
"""

# No `from __future__ import annotations`: see _jit.
import inspect
from contextlib import contextmanager, nullcontext
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


def jit_kernel(*, unspecialized: list[str]):
    """``triton.jit`` for an update kernel whose ``unspecialized`` arguments (the hyperparameters)
    Triton must never specialize on; the names are kept on the kernel for ``specialization_key``."""

    def wrap(fn):
        kernel = triton.jit(do_not_specialize=unspecialized)(fn)
        kernel.unspecialized = tuple(unspecialized)
        return kernel

    return wrap


@triton.jit
def locate(tensor_table, block_table, CHUNK: tl.constexpr):
    """Where this program works: (tensor index, first element, param address, grad address, state
    offset, numel, vector end); a block of the chunk that ends by the vector end may take the
    unmasked 128-bit path."""
    entry = tl.load(block_table + tl.program_id(0))
    t = entry >> 32
    start = (entry & 0xFFFFFFFF) * CHUNK
    row = tensor_table + t * 8  # ROW
    p_addr = tl.load(row + 0)
    g_addr = tl.load(row + 1)
    s_off = tl.load(row + 2)
    numel = tl.load(row + 3)
    vec_end = tl.load(row + 4)
    return t, start, p_addr, g_addr, s_off, numel, vec_end


@triton.jit
def is_fresh(tensor_table, t):
    """Whether tensor ``t`` carries FLAG_FRESH (1)."""
    return (tl.load(tensor_table + t * 8 + 5) & 1) != 0  # ROW, COL_FLAGS, FLAG_FRESH


@dataclass
class Tables:
    """Device tables for one launch; built once and reused while no storage changes."""

    tensor_table: torch.Tensor  # int64 [n, ROW]
    block_table: torch.Tensor  # int64 [n_blocks]: one entry per program
    n_blocks: int  # programs
    block: int  # elements per block
    rows: np.ndarray  # the tensor table on the host (shares memory with it on CPU)
    step_table: torch.Tensor | None = None  # per-tensor step scalars written on the device (device steps)
    sums: torch.Tensor | None = None  # per-tensor sums of a reduction pass (algorithms with ``n_sums``)
    scratch: torch.Tensor | None = None  # what a kernel of its own reduces into (Adafactor's ``_scratch``)
    blocks: int = 1  # blocks per program
    stream: object = None  # CUDA stream the tables were last used on (``device_guard``)
    uploaded: object = None  # CUDA event recorded after the upload (``device_guard``)
    graph_written: bool = False  # a captured graph rewrites the device table at replay (``repoint_grads``)


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    host = torch.from_numpy(array)
    if device.type == "cpu":
        return host
    # Pinned memory + non_blocking: a pageable copy would wait for the stream (a host sync).
    return host.pin_memory().to(device, non_blocking=True)


def _vector_end(param_addrs: np.ndarray, grad_addrs: np.ndarray, numels: np.ndarray, block: int) -> np.ndarray:
    """The table's vector end: whole blocks when param and grad are 16-byte aligned, else 0 (with
    bit masks where ``block`` is a power of two: every grad move recomputes it)."""
    aligned = ((param_addrs | grad_addrs) & (VEC_BYTES - 1)) == 0
    return np.where(aligned, numels & -block if block & (block - 1) == 0 else numels // block * block, 0)


def build_tables(
    param_addrs: np.ndarray,
    grad_addrs: np.ndarray,
    state_offsets: np.ndarray,
    numels: np.ndarray,
    flags: np.ndarray,
    members: np.ndarray,
    block: int,
    device: torch.device,
    blocks: int = 1,
) -> Tables:
    """Tensor and block tables for tensors laid end to end (all arrays have one entry per tensor),
    one program per ``blocks`` blocks of ``block`` elements."""
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
    per_tensor = -(-numels // (block * blocks))  # programs per tensor (0 for empty tensors)
    total = int(per_tensor.sum())
    tensor_of_block = np.repeat(np.arange(n, dtype=np.int64), per_tensor)
    first_block = np.repeat(np.cumsum(per_tensor) - per_tensor, per_tensor)
    entries = (tensor_of_block << 32) | (np.arange(total, dtype=np.int64) - first_block)
    tables = Tables(to_device(rows, device), to_device(entries, device), total, block, rows, blocks=blocks)
    if device.type == "cuda":
        tables.stream = torch.cuda.current_stream(device)  # the copies above ran there
        tables.uploaded = torch.cuda.Event()
        tables.uploaded.record(tables.stream)
    return tables


def repoint_grads(tables: Tables, which: np.ndarray, grad_addrs: np.ndarray) -> None:
    """Point rows ``which`` (distinct, increasing) of the host tensor table at new grad addresses
    (grads that autograd reallocated), keeping everything else: the block table depends on numels
    only. The vector end follows the new grad's alignment. The device table then follows by
    ``upload`` (a stream-ordered copy: kernels already queued read the old addresses, later ones
    the new) or, inside a graph capture, by ``write_in_graph``."""
    rows = tables.rows
    if len(which) == len(rows):  # every row (``which`` is then every index, in order): slices
        which = slice(None)
    rows[which, COL_GRAD] = grad_addrs
    rows[which, COL_VEC_END] = _vector_end(rows[which, COL_PARAM], grad_addrs, rows[which, COL_NUMEL], tables.block)


def upload(tables: Tables) -> None:
    """Copy the host rows into the device table, on the stream the kernels will read it from. A
    table a captured graph rewrites at replay is uploaded again before every eager launch
    (``graph_written``): after a replay its grad columns hold the graph's grads."""
    if tables.tensor_table.device.type != "cpu":  # on CPU the table is the host rows
        with device_guard(tables):
            tables.tensor_table.copy_(torch.from_numpy(tables.rows).pin_memory(), non_blocking=True)
            tables.uploaded.record(tables.stream)


def write_in_graph(tables: Tables) -> None:
    """Rewrite the grad columns of every row of the device table the way a CUDA graph being
    captured allows: the values travel as kernel arguments (the scalars of two foreach launches),
    with no host memory a replay would read and no allocation. Every replay rewrites the same
    values, the addresses of the graph's own grads, whatever eager steps wrote in between."""
    n = len(tables.rows)
    views = [tables.tensor_table[j, c] for j in range(n) for c in (COL_GRAD, COL_VEC_END)]
    values = tables.rows[:, [COL_GRAD, COL_VEC_END]].reshape(-1).tolist()
    with device_guard(tables):
        torch._foreach_zero_(views)
        torch._foreach_add_(views, values)
    tables.graph_written = True


def capturing() -> bool:
    """Whether work queued now on the current CUDA stream is being captured into a CUDA graph
    (without initializing CUDA where nothing has used it: then nothing can be capturing)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


@contextmanager
def device_guard(tables: Tables):
    """The device and stream every launch on ``tables`` runs on. Triton launches on the *current*
    CUDA device and that device's current stream, whatever its arguments' device: the guard makes
    the tables' device current (when it is not), so params on ``cuda:1`` run there, on that
    device's current stream. When that stream is not the one the tables were last used on, it
    first waits for their upload (an event), and the tables are marked as used by it
    (``record_stream``), so that the caching allocator does not hand their memory out while this
    stream may still read them. (Inside a graph capture nothing is waited for or marked: capture
    starts after a device synchronization, and the optimizer keeps what a graph reads alive.)"""
    device = tables.tensor_table.device
    if device.type != "cuda":
        yield
        return
    switch = device.index != torch.cuda.current_device()
    with torch.cuda.device(device) if switch else nullcontext():
        stream = torch.cuda.current_stream(device)
        if stream != tables.stream and not torch.cuda.is_current_stream_capturing():
            stream.wait_event(tables.uploaded)
            for t in (tables.tensor_table, tables.block_table, tables.step_table, tables.sums):
                if t is not None:
                    t.record_stream(stream)
            tables.stream = stream
        yield


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


def _name(jit_function) -> str:
    return getattr(jit_function, "__name__", None) or jit_function.fn.__name__


def launch(kernel, tables: Tables, args: tuple, constexprs: dict, num_warps: int, grid: tuple | None = None) -> None:
    """Launch ``kernel`` on the tables' device (``device_guard``): over the blocks of ``tables``
    with ``args`` after the two table pointers, or, given a ``grid``, with ``args`` as they are."""
    if grid is None:
        if tables.n_blocks == 0:
            return
        grid = (tables.n_blocks,)
        args = (tables.tensor_table, tables.block_table, *args)
        constexprs = {**constexprs, "BLOCK": tables.block, "BLOCKS": tables.blocks}
    if _recorders:
        key = specialization_key(kernel, args, constexprs)
        name = _name(kernel)
        if "MATH" in constexprs:  # the update kernel: which algorithm
            name += f"[{_name(constexprs['MATH'])}]"
        for log in _recorders:
            log.append((name, key))
    with device_guard(tables):
        # enable_fp_fusion explicit so that results do not depend on the Triton version's default;
        # separate rounding of multiply and add follows torch's CPU single-tensor arithmetic.
        kernel[grid](*args, **constexprs, num_warps=num_warps, enable_fp_fusion=False)


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
    key = [(name, *_arg_key(value, name in dns)) for name, value in zip(names, args, strict=True)]
    key.extend(sorted((k, repr(v)) for k, v in constexprs.items()))
    return tuple(key)


def _arg_key(value, unspecialized: bool) -> tuple:
    if isinstance(value, tuple):  # a tuple argument: each element is specialized as an argument
        return tuple(_arg_key(v, False) for v in value)
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return ("i1", value)
    if isinstance(value, int):
        return ("i64",) if unspecialized else ("i64", value % 16 == 0, value == 1)
    if isinstance(value, float):
        return ("fp32",)
    return (repr(value),)


def jit_cache_size(kernel) -> int:
    """Number of compiled specializations of a (non-interpreted) kernel, across devices."""
    caches = getattr(kernel, "device_caches", None)
    if caches is not None:  # Triton >= 3.1
        return sum(len(entry[0]) for entry in caches.values())
    return sum(len(c) for c in getattr(kernel, "cache", {}).values())  # Triton 3.0
