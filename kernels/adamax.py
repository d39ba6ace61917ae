"""Adamax (Adam with the infinity norm): one segment in one launch."""

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
    jit_kernel,
    launch,
    locate,
    prepare_grad,
    region,
    step_args,
    step_scalar,
    to_storage,
    torch_lerp,
    triton_dtype,
)

_SCALARS = ["decay", "lerp_w", "beta2", "eps", "neg_clr"]


@triton.jit
def _adamax_block(
    p_addr,  # param address (the grad has the same layout)
    g_addr,  # grad address
    exp_avg,  # flat state
    exp_inf,  # flat state
    s_off,  # this tensor's offset in the flat state
    offs,  # element offsets of this block within the tensor
    numel,  # elements of the tensor
    decay,  # weight_decay, in C_DTYPE like every scalar below
    lerp_w,  # 1 - beta1
    beta2,  # beta2
    eps,  # eps
    neg_clr,  # -lr / (1 - beta1 ** step)
    P_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    C_DTYPE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FULL: tl.constexpr,  # an unmasked block of 16-byte-aligned tensors: 128-bit accesses
):
    p_ptr = as_ptr(p_addr, P_DTYPE, FULL)
    g_ptr = as_ptr(g_addr, P_DTYPE, FULL)
    m_ptr = region(exp_avg, s_off, FULL)
    u_ptr = region(exp_inf, s_off, FULL)
    mask = None if FULL else offs < numel
    p = tl.load(p_ptr + offs, mask=mask).to(C_DTYPE)
    g = tl.load(g_ptr + offs, mask=mask).to(C_DTYPE)
    m = tl.load(m_ptr + offs, mask=mask).to(C_DTYPE)
    u = tl.load(u_ptr + offs, mask=mask).to(C_DTYPE)
    p, g = prepare_grad(p, g, decay, MAXIMIZE, WEIGHT_DECAY, False)
    m = torch_lerp(m, g, lerp_w)  # exp_avg.lerp_(grad, 1 - beta1)
    # torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
    u = tl.maximum(u * beta2, tl.abs(g) + eps, propagate_nan=tl.PropagateNan.ALL)
    p = p + ieee_div(neg_clr * m, u, C_DTYPE)  # param.addcdiv_(exp_avg, exp_inf, value=-clr)
    tl.store(p_ptr + offs, to_storage(p, P_DTYPE), mask=mask)
    tl.store(m_ptr + offs, to_storage(m, S_DTYPE), mask=mask)
    tl.store(u_ptr + offs, to_storage(u, S_DTYPE), mask=mask)


@jit_kernel(unspecialized=_SCALARS)
def _adamax_kernel(
    tensor_table,  # *i64 [n, ROW]: param/grad addresses, state offset, numel, vector end, flags
    block_table,  # *i64 [n_blocks]: tensor index << 32 | block index in the tensor
    exp_avg,  # flat state: first moment
    exp_inf,  # flat state: exponentially weighted infinity norm
    step_table,  # *f64 [n, 1]: per-tensor neg_clr (PER_TENSOR_STEP), else any tensor
    decay: tl.int64,  # weight_decay, as float_bits
    lerp_w: tl.int64,  # 1 - beta1
    beta2: tl.int64,  # beta2
    eps: tl.int64,  # eps
    neg_clr: tl.int64,  # -lr / (1 - beta1 ** step)
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
    lerp_c = hp(lerp_w, C_DTYPE)
    beta2_c = hp(beta2, C_DTYPE)
    eps_c = hp(eps, C_DTYPE)
    if full:
        _adamax_block(
            p_addr, g_addr, exp_avg, exp_inf, s_off, offs, numel, decay_c, lerp_c, beta2_c, eps_c, clr,
            P_DTYPE, S_DTYPE, C_DTYPE, WEIGHT_DECAY, MAXIMIZE, True,
        )  # fmt: skip
    else:  # a tensor's last block, or a tensor whose address is not 16-byte aligned
        _adamax_block(
            p_addr, g_addr, exp_avg, exp_inf, s_off, offs, numel, decay_c, lerp_c, beta2_c, eps_c, clr,
            P_DTYPE, S_DTYPE, C_DTYPE, WEIGHT_DECAY, MAXIMIZE, False,
        )  # fmt: skip


def adamax_step(
    tables: Tables,
    exp_avg: torch.Tensor,
    exp_inf: torch.Tensor,
    *,
    param_dtype: torch.dtype,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    step_scalars: tuple[float] | torch.Tensor,
    num_warps: int,
) -> None:
    """One Adamax step; ``step_scalars`` holds ``-lr / (1 - beta1 ** step)``."""
    step_table, step_bits, per_tensor = step_args(step_scalars, 1, tables)
    args = (
        exp_avg,
        exp_inf,
        step_table,
        float_bits(weight_decay),
        float_bits(1.0 - beta1),
        float_bits(beta2),
        float_bits(eps),
        *step_bits,
    )
    constexprs = {
        "P_DTYPE": triton_dtype(param_dtype),
        "S_DTYPE": triton_dtype(exp_avg.dtype),
        "C_DTYPE": compute_dtype(param_dtype),
        "WEIGHT_DECAY": weight_decay != 0,
        "MAXIMIZE": maximize,
        "PER_TENSOR_STEP": per_tensor,
    }
    launch(_adamax_kernel, tables, args, constexprs, num_warps)
