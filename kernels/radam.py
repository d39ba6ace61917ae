"""RAdam (rectified Adam): one segment in one launch."""

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

_SCALARS = [
    "decay", "lerp_w", "beta2", "sq_w", "eps", "bc1", "bc2_sqrt", "rect", "rectify", "beta1", "weight_decay",
    *UNSPECIALIZED,
]  # fmt: skip


@triton.jit
def _radam_block(
    p_addr,  # param address (the grad has the same layout)
    g_addr,  # grad address
    exp_avg,  # flat state
    exp_avg_sq,  # flat state
    master,  # flat fp32 master copy (MASTER)
    s_off,  # this tensor's offset in the flat state
    offs,  # element offsets of this block within the tensor
    numel,  # elements of the tensor
    g_mult,  # grads are multiplied by this (1 / grad_scale * clip coefficient)
    seed,  # stochastic rounding seed
    lr,  # lr, in C_DTYPE like every scalar below
    decay,  # 1 - lr * weight_decay (DECOUPLED) or weight_decay
    lerp_w,  # 1 - beta1
    beta2,  # beta2
    sq_w,  # 1 - beta2
    eps,  # eps
    bc1,  # 1 - beta1 ** step
    bc2_sqrt,  # sqrt(1 - beta2 ** step)
    rect,  # the variance rectification term
    rectify,  # 1.0 when the SMA length rho_t exceeds 5 (use the adaptive step), else 0.0
    P_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    C_DTYPE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    DECOUPLED: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    SCALE_GRAD: tl.constexpr,
    MASTER: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    FULL: tl.constexpr,  # an unmasked block of 16-byte-aligned tensors: 128-bit accesses
):
    p_ptr = as_ptr(p_addr, P_DTYPE, FULL)
    g_ptr = as_ptr(g_addr, P_DTYPE, FULL)
    m_ptr = region(exp_avg, s_off, FULL)
    v_ptr = region(exp_avg_sq, s_off, FULL)
    w_ptr = region(master, s_off, FULL)
    mask = None if FULL else offs < numel
    p = load_param(p_ptr, w_ptr, offs, mask, C_DTYPE, MASTER)
    g = load_grad(g_ptr, offs, mask, g_mult, C_DTYPE, SCALE_GRAD)
    m = tl.load(m_ptr + offs, mask=mask).to(C_DTYPE)
    v = tl.load(v_ptr + offs, mask=mask).to(C_DTYPE)
    p, g = prepare_grad(p, g, decay, MAXIMIZE, WEIGHT_DECAY, DECOUPLED)
    m = torch_lerp(m, g, lerp_w)  # exp_avg.lerp_(grad, 1 - beta1)
    v = decay_addcmul(v, g, beta2, sq_w)  # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    update = ieee_div(m, bc1, C_DTYPE) * lr  # bias_corrected_exp_avg * lr
    if rectify != 0:
        # * (bc2_sqrt / (exp_avg_sq.sqrt() + eps)), a reciprocal then a product as torch's rdiv, * rect
        adaptive = ieee_div(tl.full(v.shape, 1.0, C_DTYPE), ieee_sqrt(v, C_DTYPE) + eps, C_DTYPE) * bc2_sqrt
        update = update * adaptive * rect
    p = p - update  # param.add_(update, alpha=-1.0)
    store_param(p_ptr, w_ptr, p, offs, mask, seed, s_off + offs, P_DTYPE, MASTER, STOCHASTIC)
    tl.store(m_ptr + offs, to_storage(m, S_DTYPE), mask=mask)
    tl.store(v_ptr + offs, to_storage(v, S_DTYPE), mask=mask)


@jit_kernel(unspecialized=_SCALARS)
def _radam_kernel(
    tensor_table,  # *i64 [n, ROW]: param/grad addresses, state offset, numel, vector end, flags
    block_table,  # *i64 [n_blocks]: tensor index << 32 | block index in the tensor
    exp_avg,  # flat state: first moment
    exp_avg_sq,  # flat state: second moment
    step_table,  # *f64 [n, 4]: per-tensor (bc1, bc2_sqrt, rect, rectify) (PER_TENSOR_STEP), else any
    steps,  # device step counts (DEVICE_STEP); this and the next five: see _features
    lr_ptr,
    grad_scale,
    found_inf,
    clip_coef,
    master,
    decay: tl.int64,  # 1 - lr * weight_decay (DECOUPLED) or weight_decay
    lerp_w: tl.int64,  # 1 - beta1
    beta2: tl.int64,  # beta2
    sq_w: tl.int64,  # 1 - beta2
    eps: tl.int64,  # eps
    bc1: tl.int64,  # 1 - beta1 ** step
    bc2_sqrt: tl.int64,  # sqrt(1 - beta2 ** step)
    rect: tl.int64,  # rectification term
    rectify: tl.int64,  # 1.0 if rho_t > 5 else 0.0
    beta1: tl.int64,  # beta1 (device steps)
    weight_decay: tl.int64,  # weight_decay (device steps)
    lr: tl.int64,  # lr, as float_bits
    seed: tl.int64,  # stochastic rounding seed
    P_DTYPE: tl.constexpr,  # param and grad element type
    S_DTYPE: tl.constexpr,  # state element type
    C_DTYPE: tl.constexpr,  # math type: fp32, or fp64 for fp64 params
    WEIGHT_DECAY: tl.constexpr,  # weight_decay != 0
    DECOUPLED: tl.constexpr,  # decay the param directly
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
            b2 = hp(beta2, tl.float64)
            b2_pow = pow64(b2, step)
            bias_correction2 = 1.0 - b2_pow
            rho_inf = 2.0 / (1.0 - b2) - 1.0
            rho_t = rho_inf - 2.0 * step * b2_pow / bias_correction2
            rectify_c = (rho_t > 5.0).to(C_DTYPE)
            # early steps have rho_t <= 5 (unused, possibly negative): clamp so sqrt makes no nan
            rect_sq = (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
            rect64 = tl.sqrt(tl.maximum(rect_sq, 0.0))
            rect_c = tl.where(rho_t > 5.0, rect64, 1.0).to(C_DTYPE)
            bc2_sqrt_c = tl.where(rho_t > 5.0, tl.sqrt(bias_correction2), 1.0).to(C_DTYPE)
            bc1_c = (1.0 - pow64(hp(beta1, tl.float64), step)).to(C_DTYPE)
            lr_c = lr64.to(C_DTYPE)
            if DECOUPLED:
                decay_c = (1.0 - lr64 * hp(weight_decay, tl.float64)).to(C_DTYPE)
            else:
                decay_c = hp(weight_decay, C_DTYPE)
        else:
            step = 0.0
            bc1_c = step_scalar(step_table, t, 0, 4, bc1, PER_TENSOR_STEP, C_DTYPE)
            bc2_sqrt_c = step_scalar(step_table, t, 1, 4, bc2_sqrt, PER_TENSOR_STEP, C_DTYPE)
            rect_c = step_scalar(step_table, t, 2, 4, rect, PER_TENSOR_STEP, C_DTYPE)
            rectify_c = step_scalar(step_table, t, 3, 4, rectify, PER_TENSOR_STEP, C_DTYPE)
            lr_c = hp(lr, C_DTYPE)
            decay_c = hp(decay, C_DTYPE)
        g_mult = grad_multiplier(grad_scale, clip_coef, HAS_GRAD_SCALE, HAS_CLIP)
        rseed = random_seed(seed, step, DEVICE_STEP)
        lerp_c = hp(lerp_w, C_DTYPE)
        beta2_c = hp(beta2, C_DTYPE)
        sq_c = hp(sq_w, C_DTYPE)
        eps_c = hp(eps, C_DTYPE)
        scale_grad = HAS_GRAD_SCALE or HAS_CLIP
        if full:
            _radam_block(
                p_addr, g_addr, exp_avg, exp_avg_sq, master, s_off, offs, numel, g_mult, rseed,
                lr_c, decay_c, lerp_c, beta2_c, sq_c, eps_c, bc1_c, bc2_sqrt_c, rect_c, rectify_c,
                P_DTYPE, S_DTYPE, C_DTYPE, WEIGHT_DECAY, DECOUPLED, MAXIMIZE, scale_grad, MASTER, STOCHASTIC, True,
            )  # fmt: skip
        else:  # a tensor's last block, or a tensor whose address is not 16-byte aligned
            _radam_block(
                p_addr, g_addr, exp_avg, exp_avg_sq, master, s_off, offs, numel, g_mult, rseed,
                lr_c, decay_c, lerp_c, beta2_c, sq_c, eps_c, bc1_c, bc2_sqrt_c, rect_c, rectify_c,
                P_DTYPE, S_DTYPE, C_DTYPE, WEIGHT_DECAY, DECOUPLED, MAXIMIZE, scale_grad, MASTER, STOCHASTIC, False,
            )  # fmt: skip


def radam_step(
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
    step_scalars: tuple[float, float, float, float] | torch.Tensor,
    features: Features,
    num_warps: int,
) -> None:
    """One RAdam step; ``step_scalars`` holds (bc1, sqrt(bc2), rect, 1.0 if rho_t > 5 else 0.0)
    (host step counts; with device step counts the kernel computes them)."""
    if features.steps is not None:
        step_scalars = (1.0, 1.0, 1.0, 0.0)
    step_table, step_bits, per_tensor = step_args(step_scalars, 4, tables)
    common, common_bits, common_flags = feature_args(features, lr, tables.tensor_table)
    args = (
        exp_avg,
        exp_avg_sq,
        step_table,
        *common,
        float_bits(1.0 - lr * weight_decay if decoupled else weight_decay),
        float_bits(1.0 - beta1),
        float_bits(beta2),
        float_bits(1.0 - beta2),
        float_bits(eps),
        *step_bits,
        float_bits(beta1),
        float_bits(weight_decay),
        *common_bits,
    )
    constexprs = {
        "P_DTYPE": triton_dtype(param_dtype),
        "S_DTYPE": triton_dtype(exp_avg.dtype),
        "C_DTYPE": compute_dtype(param_dtype),
        "WEIGHT_DECAY": weight_decay != 0,
        "DECOUPLED": decoupled,
        "MAXIMIZE": maximize,
        "PER_TENSOR_STEP": per_tensor,
        **common_flags,
    }
    launch(_radam_kernel, tables, args, constexprs, num_warps)
