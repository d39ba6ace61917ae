"""Adam / AdamW / AMSGrad: the whole update of one segment in one launch."""

# No `from __future__ import annotations` here: Triton 3.0's interpreter recognizes
# `tl.constexpr` parameters only from evaluated annotations.
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
    "decay", "lerp_w", "beta2", "sq_w", "eps", "neg_step_size", "bc2_sqrt", "beta1", "weight_decay",
    *UNSPECIALIZED,
]  # fmt: skip


@triton.jit
def _adam_block(
    p_addr,  # param address (the grad has the same layout)
    g_addr,  # grad address
    exp_avg,  # flat state buffers, at the segment's first element
    exp_avg_sq,
    max_exp_avg_sq,  # (AMSGRAD)
    master,  # flat fp32 master copy (MASTER)
    s_off,  # this tensor's offset in the flat state
    offs,  # element offsets of this block within the tensor
    numel,  # elements of the tensor
    g_mult,  # grads are multiplied by this (1 / grad_scale * clip coefficient)
    seed,  # stochastic rounding seed
    decay,  # 1 - lr * weight_decay (DECOUPLED) or weight_decay, in C_DTYPE like every scalar below
    lerp_w,  # 1 - beta1
    beta2,  # beta2
    sq_w,  # 1 - beta2
    eps,  # eps
    neg_step,  # -lr / (1 - beta1 ** step)
    bc2s,  # sqrt(1 - beta2 ** step)
    P_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    C_DTYPE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
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
    vmax_ptr = region(max_exp_avg_sq, s_off, FULL)
    w_ptr = region(master, s_off, FULL)
    mask = None if FULL else offs < numel
    p = load_param(p_ptr, w_ptr, offs, mask, C_DTYPE, MASTER)
    g = load_grad(g_ptr, offs, mask, g_mult, C_DTYPE, SCALE_GRAD)
    m = tl.load(m_ptr + offs, mask=mask).to(C_DTYPE)
    v = tl.load(v_ptr + offs, mask=mask).to(C_DTYPE)
    p, g = prepare_grad(p, g, decay, MAXIMIZE, WEIGHT_DECAY, DECOUPLED)
    m = torch_lerp(m, g, lerp_w)  # exp_avg.lerp_(grad, 1 - beta1)
    v = decay_addcmul(v, g, beta2, sq_w)  # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if AMSGRAD:
        vmax = tl.load(vmax_ptr + offs, mask=mask).to(C_DTYPE)
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        tl.store(vmax_ptr + offs, to_storage(vmax, S_DTYPE), mask=mask)
        denom = ieee_div(ieee_sqrt(vmax, C_DTYPE), bc2s, C_DTYPE) + eps
    else:
        denom = ieee_div(ieee_sqrt(v, C_DTYPE), bc2s, C_DTYPE) + eps
    # param.addcdiv_(exp_avg, denom, value=-step_size)
    p = p + ieee_div(neg_step * m, denom, C_DTYPE)
    store_param(p_ptr, w_ptr, p, offs, mask, seed, s_off + offs, P_DTYPE, MASTER, STOCHASTIC)
    tl.store(m_ptr + offs, to_storage(m, S_DTYPE), mask=mask)
    tl.store(v_ptr + offs, to_storage(v, S_DTYPE), mask=mask)


@jit_kernel(unspecialized=_SCALARS)
def _adam_kernel(
    tensor_table,  # *i64 [n, ROW]: param/grad addresses, state offset, numel, vector end, flags, member
    block_table,  # *i64 [n_blocks]: tensor index << 32 | block index in the tensor
    exp_avg,  # flat state: first moment
    exp_avg_sq,  # flat state: second moment
    max_exp_avg_sq,  # flat state: running max of exp_avg_sq (AMSGRAD), else any tensor
    step_table,  # *f64 [n, 2]: per-tensor (neg_step_size, bc2_sqrt) (PER_TENSOR_STEP), else any
    steps,  # device step counts (DEVICE_STEP); this and the next five: see _features
    lr_ptr,
    grad_scale,
    found_inf,
    clip_coef,
    master,
    decay: tl.int64,  # 1 - lr * weight_decay (DECOUPLED) or weight_decay, as float_bits
    lerp_w: tl.int64,  # 1 - beta1
    beta2: tl.int64,  # beta2
    sq_w: tl.int64,  # 1 - beta2
    eps: tl.int64,  # eps
    neg_step_size: tl.int64,  # -lr / (1 - beta1 ** step) (host steps)
    bc2_sqrt: tl.int64,  # sqrt(1 - beta2 ** step) (host steps)
    beta1: tl.int64,  # beta1 (device steps)
    weight_decay: tl.int64,  # weight_decay (device steps)
    lr: tl.int64,  # lr (device steps)
    seed: tl.int64,  # stochastic rounding seed
    P_DTYPE: tl.constexpr,  # param and grad element type
    S_DTYPE: tl.constexpr,  # state element type
    C_DTYPE: tl.constexpr,  # math type: fp32, or fp64 for fp64 params
    WEIGHT_DECAY: tl.constexpr,  # weight_decay != 0
    DECOUPLED: tl.constexpr,  # AdamW-style decay of the param
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    PER_TENSOR_STEP: tl.constexpr,  # tensors of this launch are at different (host) steps
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
            neg_step = (-(lr64 / (1.0 - pow64(hp(beta1, tl.float64), step)))).to(C_DTYPE)
            bc2s = tl.sqrt(1.0 - pow64(hp(beta2, tl.float64), step)).to(C_DTYPE)
            if DECOUPLED:
                decay_c = (1.0 - lr64 * hp(weight_decay, tl.float64)).to(C_DTYPE)
            else:
                decay_c = hp(weight_decay, C_DTYPE)
        else:
            step = 0.0
            neg_step = step_scalar(step_table, t, 0, 2, neg_step_size, PER_TENSOR_STEP, C_DTYPE)
            bc2s = step_scalar(step_table, t, 1, 2, bc2_sqrt, PER_TENSOR_STEP, C_DTYPE)
            decay_c = hp(decay, C_DTYPE)
        g_mult = grad_multiplier(grad_scale, clip_coef, HAS_GRAD_SCALE, HAS_CLIP)
        rseed = random_seed(seed, step, DEVICE_STEP)
        lerp_c = hp(lerp_w, C_DTYPE)
        beta2_c = hp(beta2, C_DTYPE)
        sq_c = hp(sq_w, C_DTYPE)
        eps_c = hp(eps, C_DTYPE)
        scale_grad = HAS_GRAD_SCALE or HAS_CLIP
        if full:
            _adam_block(
                p_addr, g_addr, exp_avg, exp_avg_sq, max_exp_avg_sq, master, s_off, offs, numel, g_mult, rseed,
                decay_c, lerp_c, beta2_c, sq_c, eps_c, neg_step, bc2s,
                P_DTYPE, S_DTYPE, C_DTYPE, WEIGHT_DECAY, DECOUPLED, AMSGRAD, MAXIMIZE, scale_grad, MASTER, STOCHASTIC,
                True,
            )  # fmt: skip
        else:  # a tensor's last block, or a tensor whose address is not 16-byte aligned
            _adam_block(
                p_addr, g_addr, exp_avg, exp_avg_sq, max_exp_avg_sq, master, s_off, offs, numel, g_mult, rseed,
                decay_c, lerp_c, beta2_c, sq_c, eps_c, neg_step, bc2s,
                P_DTYPE, S_DTYPE, C_DTYPE, WEIGHT_DECAY, DECOUPLED, AMSGRAD, MAXIMIZE, scale_grad, MASTER, STOCHASTIC,
                False,
            )  # fmt: skip


def adam_step(
    tables: Tables,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    *,
    param_dtype: torch.dtype,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    amsgrad: bool,
    maximize: bool,
    step_scalars: tuple[float, float] | torch.Tensor,
    features: Features,
    num_warps: int = 8,
) -> None:
    """One Adam/AdamW step over a segment.

    ``step_scalars`` (host step counts) is ``(-lr / (1 - beta1**step), sqrt(1 - beta2**step))`` when
    every tensor of the launch is at the same step, else a float64 device tensor holding that pair
    per tensor; with device step counts (``features.steps``) the kernel computes them itself.
    """
    if features.steps is not None:
        step_scalars = (0.0, 1.0)
    step_table, step_bits, per_tensor = step_args(step_scalars, 2, tables)  # -lr / bc1, sqrt(bc2)
    common, common_bits, common_flags = feature_args(features, lr, tables.tensor_table)
    decay = 1.0 - lr * weight_decay if decoupled else weight_decay
    args = (
        exp_avg,
        exp_avg_sq,
        max_exp_avg_sq if amsgrad else exp_avg,
        step_table,
        *common,
        float_bits(decay),  # 1 - lr * weight_decay, or weight_decay
        float_bits(1.0 - beta1),  # lerp weight of exp_avg
        float_bits(beta2),
        float_bits(1.0 - beta2),  # addcmul value of exp_avg_sq
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
        "AMSGRAD": amsgrad,
        "MAXIMIZE": maximize,
        "PER_TENSOR_STEP": per_tensor,
        **common_flags,
    }
    launch(_adam_kernel, tables, args, constexprs, num_warps)
