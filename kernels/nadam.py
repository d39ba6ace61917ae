"""NAdam (Nesterov-accelerated Adam, with momentum decay): one segment in one launch."""

# No `from __future__ import annotations`: see _tables.
import torch
import triton
import triton.language as tl

from ._tables import (
    Tables,
    as_ptr,
    compute_dtype,
    decay_addcmul,
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
    torch_lerp,
    triton_dtype,
)

_SCALARS = ["decay", "lerp_w", "beta2", "sq_w", "eps", "bc2", "grad_coef", "avg_coef"]


@triton.jit
def _nadam_block(
    p_addr,  # param address (the grad has the same layout)
    g_addr,  # grad address
    exp_avg,  # flat state
    exp_avg_sq,  # flat state
    s_off,  # this tensor's offset in the flat state
    offs,  # element offsets of this block within the tensor
    numel,  # elements of the tensor
    decay,  # 1 - lr * weight_decay (DECOUPLED) or weight_decay, in C_DTYPE like every scalar below
    lerp_w,  # 1 - beta1
    beta2,  # beta2
    sq_w,  # 1 - beta2
    eps,  # eps
    bc2,  # 1 - beta2 ** step
    grad_coef,  # -lr * (1 - mu) / (1 - mu_product)
    avg_coef,  # -lr * mu_next / (1 - mu_product * mu_next)
    P_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    C_DTYPE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    DECOUPLED: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FULL: tl.constexpr,  # an unmasked block of 16-byte-aligned tensors: 128-bit accesses
):
    p_ptr = as_ptr(p_addr, P_DTYPE, FULL)
    g_ptr = as_ptr(g_addr, P_DTYPE, FULL)
    m_ptr = region(exp_avg, s_off, FULL)
    v_ptr = region(exp_avg_sq, s_off, FULL)
    mask = None if FULL else offs < numel
    p = tl.load(p_ptr + offs, mask=mask).to(C_DTYPE)
    g = tl.load(g_ptr + offs, mask=mask).to(C_DTYPE)
    m = tl.load(m_ptr + offs, mask=mask).to(C_DTYPE)
    v = tl.load(v_ptr + offs, mask=mask).to(C_DTYPE)
    p, g = prepare_grad(p, g, decay, MAXIMIZE, WEIGHT_DECAY, DECOUPLED)
    m = torch_lerp(m, g, lerp_w)  # exp_avg.lerp_(grad, 1 - beta1)
    v = decay_addcmul(v, g, beta2, sq_w)  # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = ieee_sqrt(ieee_div(v, bc2, C_DTYPE), C_DTYPE) + eps  # exp_avg_sq.div(bc2).sqrt().add_(eps)
    p = p + ieee_div(grad_coef * g, denom, C_DTYPE)  # param.addcdiv_(grad, denom, value=grad_coef)
    p = p + ieee_div(avg_coef * m, denom, C_DTYPE)  # param.addcdiv_(exp_avg, denom, value=avg_coef)
    tl.store(p_ptr + offs, to_storage(p, P_DTYPE), mask=mask)
    tl.store(m_ptr + offs, to_storage(m, S_DTYPE), mask=mask)
    tl.store(v_ptr + offs, to_storage(v, S_DTYPE), mask=mask)


@jit_kernel(unspecialized=_SCALARS)
def _nadam_kernel(
    tensor_table,  # *i64 [n, ROW]: param/grad addresses, state offset, numel, vector end, flags
    block_table,  # *i64 [n_blocks]: tensor index << 32 | block index in the tensor
    exp_avg,  # flat state: first moment
    exp_avg_sq,  # flat state: second moment
    step_table,  # *f64 [n, 3]: per-tensor (bc2, grad_coef, avg_coef) (PER_TENSOR_STEP), else any
    decay: tl.int64,  # 1 - lr * weight_decay (DECOUPLED) or weight_decay, as float_bits
    lerp_w: tl.int64,  # 1 - beta1
    beta2: tl.int64,  # beta2
    sq_w: tl.int64,  # 1 - beta2
    eps: tl.int64,  # eps
    bc2: tl.int64,  # 1 - beta2 ** step
    grad_coef: tl.int64,  # -lr * (1 - mu) / (1 - mu_product)
    avg_coef: tl.int64,  # -lr * mu_next / (1 - mu_product * mu_next)
    P_DTYPE: tl.constexpr,  # param and grad element type
    S_DTYPE: tl.constexpr,  # state element type
    C_DTYPE: tl.constexpr,  # math type: fp32, or fp64 for fp64 params
    WEIGHT_DECAY: tl.constexpr,  # weight_decay != 0
    DECOUPLED: tl.constexpr,  # decay the param directly
    MAXIMIZE: tl.constexpr,
    PER_TENSOR_STEP: tl.constexpr,  # tensors of this launch differ in step or mu_product
    BLOCK: tl.constexpr,  # elements per program
):
    t, offs, p_addr, g_addr, s_off, numel, full = locate(tensor_table, block_table, BLOCK)
    bc2_c = step_scalar(step_table, t, 0, 3, bc2, PER_TENSOR_STEP, C_DTYPE)
    grad_c = step_scalar(step_table, t, 1, 3, grad_coef, PER_TENSOR_STEP, C_DTYPE)
    avg_c = step_scalar(step_table, t, 2, 3, avg_coef, PER_TENSOR_STEP, C_DTYPE)
    decay_c = hp(decay, C_DTYPE)
    lerp_c = hp(lerp_w, C_DTYPE)
    beta2_c = hp(beta2, C_DTYPE)
    sq_c = hp(sq_w, C_DTYPE)
    eps_c = hp(eps, C_DTYPE)
    if full:
        _nadam_block(
            p_addr, g_addr, exp_avg, exp_avg_sq, s_off, offs, numel,
            decay_c, lerp_c, beta2_c, sq_c, eps_c, bc2_c, grad_c, avg_c,
            P_DTYPE, S_DTYPE, C_DTYPE, WEIGHT_DECAY, DECOUPLED, MAXIMIZE, True,
        )  # fmt: skip
    else:  # a tensor's last block, or a tensor whose address is not 16-byte aligned
        _nadam_block(
            p_addr, g_addr, exp_avg, exp_avg_sq, s_off, offs, numel,
            decay_c, lerp_c, beta2_c, sq_c, eps_c, bc2_c, grad_c, avg_c,
            P_DTYPE, S_DTYPE, C_DTYPE, WEIGHT_DECAY, DECOUPLED, MAXIMIZE, False,
        )  # fmt: skip


def nadam_step(
    tables: Tables,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    param_dtype: torch.dtype,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
    step_scalars: tuple[float, float, float] | torch.Tensor,
    num_warps: int,
) -> None:
    """One NAdam step; ``step_scalars`` holds (1 - beta2**step, grad coefficient, exp_avg coefficient)."""
    step_table, step_bits, per_tensor = step_args(step_scalars, 3, tables)
    args = (
        exp_avg,
        exp_avg_sq,
        step_table,
        float_bits(1.0 - lr * weight_decay if decoupled else weight_decay),
        float_bits(1.0 - beta1),
        float_bits(beta2),
        float_bits(1.0 - beta2),
        float_bits(eps),
        *step_bits,
    )
    constexprs = {
        "P_DTYPE": triton_dtype(param_dtype),
        "S_DTYPE": triton_dtype(exp_avg.dtype),
        "C_DTYPE": compute_dtype(param_dtype),
        "WEIGHT_DECAY": weight_decay != 0,
        "DECOUPLED": decoupled,
        "MAXIMIZE": maximize,
        "PER_TENSOR_STEP": per_tensor,
    }
    launch(_nadam_kernel, tables, args, constexprs, num_warps)
