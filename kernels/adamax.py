"""Adamax (Adam with the infinity norm): one segment in one launch."""

# No `from __future__ import annotations`: see _tables.
import torch
import triton
import triton.language as tl

from ._features import (
    UNSPECIALIZED,
    Features,
    device_step,
    feature_args,
    grad_multiplier,
    load_grad,
    load_param,
    lr_value,
    pow64,
    random_seed,
    store_param,
)
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

_SCALARS = ["decay", "lerp_w", "beta2", "eps", "neg_clr", "beta1", *UNSPECIALIZED]


@triton.jit
def _adamax_block(
    p_addr,  # param address (the grad has the same layout)
    g_addr,  # grad address
    exp_avg,  # flat state
    exp_inf,  # flat state
    master,  # flat fp32 master copy (MASTER)
    s_off,  # this tensor's offset in the flat state
    offs,  # element offsets of this block within the tensor
    numel,  # elements of the tensor
    g_mult,  # grads are multiplied by this (1 / grad_scale * clip coefficient)
    seed,  # stochastic rounding seed
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
    SCALE_GRAD: tl.constexpr,
    MASTER: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    FULL: tl.constexpr,  # an unmasked block of 16-byte-aligned tensors: 128-bit accesses
):
    p_ptr = as_ptr(p_addr, P_DTYPE, FULL)
    g_ptr = as_ptr(g_addr, P_DTYPE, FULL)
    m_ptr = region(exp_avg, s_off, FULL)
    u_ptr = region(exp_inf, s_off, FULL)
    w_ptr = region(master, s_off, FULL)
    mask = None if FULL else offs < numel
    p = load_param(p_ptr, w_ptr, offs, mask, C_DTYPE, MASTER)
    g = load_grad(g_ptr, offs, mask, g_mult, C_DTYPE, SCALE_GRAD)
    m = tl.load(m_ptr + offs, mask=mask).to(C_DTYPE)
    u = tl.load(u_ptr + offs, mask=mask).to(C_DTYPE)
    p, g = prepare_grad(p, g, decay, MAXIMIZE, WEIGHT_DECAY, False)
    m = torch_lerp(m, g, lerp_w)  # exp_avg.lerp_(grad, 1 - beta1)
    # torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
    u = tl.maximum(u * beta2, tl.abs(g) + eps, propagate_nan=tl.PropagateNan.ALL)
    p = p + ieee_div(neg_clr * m, u, C_DTYPE)  # param.addcdiv_(exp_avg, exp_inf, value=-clr)
    store_param(p_ptr, w_ptr, p, offs, mask, seed, s_off + offs, P_DTYPE, MASTER, STOCHASTIC)
    tl.store(m_ptr + offs, to_storage(m, S_DTYPE), mask=mask)
    tl.store(u_ptr + offs, to_storage(u, S_DTYPE), mask=mask)


@jit_kernel(unspecialized=_SCALARS)
def _adamax_kernel(
    tensor_table,  # *i64 [n, ROW]: param/grad addresses, state offset, numel, vector end, flags
    block_table,  # *i64 [n_blocks]: tensor index << 32 | block index in the tensor
    exp_avg,  # flat state: first moment
    exp_inf,  # flat state: exponentially weighted infinity norm
    step_table,  # *f64 [n, 1]: per-tensor neg_clr (PER_TENSOR_STEP), else any tensor
    steps,  # device step counts (DEVICE_STEP); this and the next five: see _features
    lr_ptr,
    grad_scale,
    found_inf,
    clip_coef,
    master,
    decay: tl.int64,  # weight_decay, as float_bits
    lerp_w: tl.int64,  # 1 - beta1
    beta2: tl.int64,  # beta2
    eps: tl.int64,  # eps
    neg_clr: tl.int64,  # -lr / (1 - beta1 ** step) (host steps)
    beta1: tl.int64,  # beta1 (device steps)
    lr: tl.int64,  # lr (device steps)
    seed: tl.int64,  # stochastic rounding seed
    P_DTYPE: tl.constexpr,  # param and grad element type
    S_DTYPE: tl.constexpr,  # state element type
    C_DTYPE: tl.constexpr,  # math type: fp32, or fp64 for fp64 params
    WEIGHT_DECAY: tl.constexpr,  # weight_decay != 0
    MAXIMIZE: tl.constexpr,
    PER_TENSOR_STEP: tl.constexpr,  # tensors of this launch are at different steps
    DEVICE_STEP: tl.constexpr,  # step counts on the device; step scalars computed here
    LR_ON_DEVICE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    MASTER: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    BLOCK: tl.constexpr,  # elements per program
):
    t, offs, p_addr, g_addr, s_off, numel, full = locate(tensor_table, block_table, BLOCK)
    if HAS_FOUND_INF:
        go = tl.load(found_inf) == 0
    else:
        go = True
    if go:  # AMP: a step with inf/nan grads changes nothing
        if DEVICE_STEP:
            step = device_step(steps, tensor_table, t)
            lr64 = lr_value(lr, lr_ptr, LR_ON_DEVICE)
            clr = (-(lr64 / (1.0 - pow64(hp(beta1, tl.float64), step)))).to(C_DTYPE)
        else:
            step = 0.0
            clr = step_scalar(step_table, t, 0, 1, neg_clr, PER_TENSOR_STEP, C_DTYPE)
        g_mult = grad_multiplier(grad_scale, clip_coef, HAS_GRAD_SCALE, HAS_CLIP)
        rseed = random_seed(seed, step, DEVICE_STEP)
        decay_c = hp(decay, C_DTYPE)
        lerp_c = hp(lerp_w, C_DTYPE)
        beta2_c = hp(beta2, C_DTYPE)
        eps_c = hp(eps, C_DTYPE)
        scale_grad = HAS_GRAD_SCALE or HAS_CLIP
        if full:
            _adamax_block(
                p_addr, g_addr, exp_avg, exp_inf, master, s_off, offs, numel, g_mult, rseed,
                decay_c, lerp_c, beta2_c, eps_c, clr,
                P_DTYPE, S_DTYPE, C_DTYPE, WEIGHT_DECAY, MAXIMIZE, scale_grad, MASTER, STOCHASTIC, True,
            )  # fmt: skip
        else:  # a tensor's last block, or a tensor whose address is not 16-byte aligned
            _adamax_block(
                p_addr, g_addr, exp_avg, exp_inf, master, s_off, offs, numel, g_mult, rseed,
                decay_c, lerp_c, beta2_c, eps_c, clr,
                P_DTYPE, S_DTYPE, C_DTYPE, WEIGHT_DECAY, MAXIMIZE, scale_grad, MASTER, STOCHASTIC, False,
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
    lr: float,
    step_scalars: tuple[float] | torch.Tensor,
    features: Features,
    num_warps: int,
) -> None:
    """One Adamax step; ``step_scalars`` holds ``-lr / (1 - beta1 ** step)`` (host step counts; with
    device step counts the kernel computes it)."""
    if features.steps is not None:
        step_scalars = (0.0,)
    step_table, step_bits, per_tensor = step_args(step_scalars, 1, tables)
    common, common_bits, common_flags = feature_args(features, lr, tables.tensor_table)
    args = (
        exp_avg,
        exp_inf,
        step_table,
        *common,
        float_bits(weight_decay),
        float_bits(1.0 - beta1),
        float_bits(beta2),
        float_bits(eps),
        *step_bits,
        float_bits(beta1),
        *common_bits,
    )
    constexprs = {
        "P_DTYPE": triton_dtype(param_dtype),
        "S_DTYPE": triton_dtype(exp_avg.dtype),
        "C_DTYPE": compute_dtype(param_dtype),
        "WEIGHT_DECAY": weight_decay != 0,
        "MAXIMIZE": maximize,
        "PER_TENSOR_STEP": per_tensor,
        **common_flags,
    }
    launch(_adamax_kernel, tables, args, constexprs, num_warps)
