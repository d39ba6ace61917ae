"""Global grad norm for clipping: one reduction launch per segment, partials per program.

Each program reduces its blocks of grads (sum of squares, or max |g| for the inf-norm) into one
partial; the caller combines the partials of every segment on the device (``sum().sqrt()`` or
``amax()``), in a fixed order, so the norm is deterministic and never read on the host.
"""

# No `from __future__ import annotations`: see _jit.
import torch
import triton
import triton.language as tl

from ._jit import as_ptr, triton_dtype
from ._tables import Tables, jit_kernel, launch, locate


@triton.jit
def _norm_block(g_ptr, offs, numel, MASKED: tl.constexpr, ACC_DTYPE: tl.constexpr, NORM_INF: tl.constexpr):
    if MASKED:
        g = tl.load(g_ptr + offs, mask=offs < numel, other=0.0).to(ACC_DTYPE)
    else:
        g = tl.load(g_ptr + offs).to(ACC_DTYPE)
    if NORM_INF:
        biggest = tl.max(tl.abs(g), axis=0)
        has_nan = tl.sum((g != g).to(tl.int32), axis=0) > 0
        value = tl.where(has_nan, float("nan"), biggest)
    else:
        value = tl.sum(g * g, axis=0)
    return value


@jit_kernel(unspecialized=[])
def _grad_norm_kernel(
    tensor_table,  # *i64 [n, ROW]: the launch's tensor table (grad addresses)
    block_table,  # *i64 [n_blocks]
    partials,  # [n_blocks] of ACC_DTYPE: one partial per program
    G_DTYPE: tl.constexpr,  # grad element type
    ACC_DTYPE: tl.constexpr,  # fp32, or fp64 for fp64 grads
    NORM_INF: tl.constexpr,  # max |g| instead of the sum of squares
    BLOCK: tl.constexpr,  # elements per block
    BLOCKS: tl.constexpr,  # blocks per program
):
    _, start, _, g_addr, _, numel, vec_end = locate(tensor_table, block_table, BLOCK * BLOCKS)
    value = tl.zeros((), ACC_DTYPE)  # every block's value is >= 0 (or NaN)
    for r in tl.static_range(BLOCKS):
        offs = start + r * BLOCK + tl.arange(0, BLOCK)
        if start + r * BLOCK + BLOCK <= vec_end:
            part = _norm_block(as_ptr(g_addr, G_DTYPE, True), offs, numel, False, ACC_DTYPE, NORM_INF)
        else:  # masked (past the end: nothing loaded, 0)
            part = _norm_block(as_ptr(g_addr, G_DTYPE, False), offs, numel, True, ACC_DTYPE, NORM_INF)
        if NORM_INF:  # a NaN anywhere makes the partial NaN
            value = tl.where((part != part) | (part > value), part, value)
        else:
            value += part
    tl.store(partials + tl.program_id(0), value)


def grad_norm_partials(tables: Tables, grad_dtype: torch.dtype, norm_inf: bool, num_warps: int) -> torch.Tensor:
    """Per-program partial norms of the grads in ``tables`` (sums of squares, or maxima)."""
    acc = torch.float64 if grad_dtype == torch.float64 else torch.float32
    partials = torch.zeros(max(tables.n_blocks, 1), dtype=acc, device=tables.tensor_table.device)
    constexprs = {
        "G_DTYPE": triton_dtype(grad_dtype),
        "ACC_DTYPE": tl.float64 if acc == torch.float64 else tl.float32,
        "NORM_INF": norm_inf,
    }
    launch(_grad_norm_kernel, tables, (partials,), constexprs, num_warps)
    return partials
