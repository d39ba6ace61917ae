"""Adagrad: one segment in one launch (sparse grads run through torch.optim's own code)."""

# No `from __future__ import annotations`: see _tables.
import torch
import triton
import triton.language as tl

from ._tables import (
    Tables,
    as_ptr,
    compute_dtype,
    float_bits,
    hp,
    ieee_div,
    ieee_sqrt,
    jit_kernel,
    launch,
    locate,
    prepare_grad,
    region,
    step_args,
    step_scalar,
    to_storage,
    triton_dtype,
)

_SCALARS = ["decay", "eps", "neg_clr"]


@triton.jit
def _adagrad_block(
    p_addr,  # param address (the grad has the same layout)
    g_addr,  # grad address
    state_sum,  # flat state
    s_off,  # this tensor's offset in the flat state
    offs,  # element offsets of this block within the tensor
    numel,  # elements of the tensor
    decay,  # weight_decay, in C_DTYPE like every scalar below
    eps,  # eps
    neg_clr,  # -lr / (1 + (step - 1) * lr_decay)
    P_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    C_DTYPE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FULL: tl.constexpr,  # an unmasked block of 16-byte-aligned tensors: 128-bit accesses
):
    p_ptr = as_ptr(p_addr, P_DTYPE, FULL)
    g_ptr = as_ptr(g_addr, P_DTYPE, FULL)
    s_ptr = region(state_sum, s_off, FULL)
    mask = None if FULL else offs < numel
    p = tl.load(p_ptr + offs, mask=mask).to(C_DTYPE)
    g = tl.load(g_ptr + offs, mask=mask).to(C_DTYPE)
    s = tl.load(s_ptr + offs, mask=mask).to(C_DTYPE)
    p, g = prepare_grad(p, g, decay, MAXIMIZE, WEIGHT_DECAY, False)
    s = tl.fma(g, g, s)  # state_sum.addcmul_(grad, grad, value=1)
    std = ieee_sqrt(s, C_DTYPE) + eps  # state_sum.sqrt().add_(eps)
    p = p + ieee_div(neg_clr * g, std, C_DTYPE)  # param.addcdiv_(grad, std, value=-clr)
    tl.store(p_ptr + offs, to_storage(p, P_DTYPE), mask=mask)
    tl.store(s_ptr + offs, to_storage(s, S_DTYPE), mask=mask)


@jit_kernel(unspecialized=_SCALARS)
def _adagrad_kernel(
    tensor_table,  # *i64 [n, ROW]: param/grad addresses, state offset, numel, vector end, flags
    block_table,  # *i64 [n_blocks]: tensor index << 32 | block index in the tensor
    state_sum,  # flat state: sum of squared grads
    step_table,  # *f64 [n, 1]: per-tensor neg_clr (PER_TENSOR_STEP), else any tensor
    decay: tl.int64,  # weight_decay, as float_bits
    eps: tl.int64,  # eps
    neg_clr: tl.int64,  # -lr / (1 + (step - 1) * lr_decay)
    P_DTYPE: tl.constexpr,  # param and grad element type
    S_DTYPE: tl.constexpr,  # state element type
    C_DTYPE: tl.constexpr,  # math type: fp32, or fp64 for fp64 params
    WEIGHT_DECAY: tl.constexpr,  # weight_decay != 0
    MAXIMIZE: tl.constexpr,
    PER_TENSOR_STEP: tl.constexpr,  # tensors of this launch are at different steps
    BLOCK: tl.constexpr,  # elements per program
):
    t, offs, p_addr, g_addr, s_off, numel, full = locate(tensor_table, block_table, BLOCK)
    clr = step_scalar(step_table, t, 0, 1, neg_clr, PER_TENSOR_STEP, C_DTYPE)
    decay_c = hp(decay, C_DTYPE)
    eps_c = hp(eps, C_DTYPE)
    if full:
        _adagrad_block(
            p_addr, g_addr, state_sum, s_off, offs, numel, decay_c, eps_c, clr,
            P_DTYPE, S_DTYPE, C_DTYPE, WEIGHT_DECAY, MAXIMIZE, True,
        )  # fmt: skip
    else:  # a tensor's last block, or a tensor whose address is not 16-byte aligned
        _adagrad_block(
            p_addr, g_addr, state_sum, s_off, offs, numel, decay_c, eps_c, clr,
            P_DTYPE, S_DTYPE, C_DTYPE, WEIGHT_DECAY, MAXIMIZE, False,
        )  # fmt: skip


def adagrad_step(
    tables: Tables,
    state_sum: torch.Tensor,
    *,
    param_dtype: torch.dtype,
    weight_decay: float,
    eps: float,
    maximize: bool,
    step_scalars: tuple[float] | torch.Tensor,
    num_warps: int,
) -> None:
    """One Adagrad step over a segment; ``step_scalars`` holds ``-lr / (1 + (step - 1) * lr_decay)``."""
    step_table, step_bits, per_tensor = step_args(step_scalars, 1, tables)
    args = (state_sum, step_table, float_bits(weight_decay), float_bits(eps), *step_bits)
    constexprs = {
        "P_DTYPE": triton_dtype(param_dtype),
        "S_DTYPE": triton_dtype(state_sum.dtype),
        "C_DTYPE": compute_dtype(param_dtype),
        "WEIGHT_DECAY": weight_decay != 0,
        "MAXIMIZE": maximize,
        "PER_TENSOR_STEP": per_tensor,
    }
    launch(_adagrad_kernel, tables, args, constexprs, num_warps)
