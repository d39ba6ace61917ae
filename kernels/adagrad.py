"""Adagrad: one segment in one launch (sparse grads run through torch.optim's own code)."""

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

_SCALARS = ["decay", "eps", "neg_clr", "lr_decay", *UNSPECIALIZED]


@triton.jit
def _adagrad_block(
    p_addr,  # param address (the grad has the same layout)
    g_addr,  # grad address
    state_sum,  # flat state
    master,  # flat fp32 master copy (MASTER)
    s_off,  # this tensor's offset in the flat state
    offs,  # element offsets of this block within the tensor
    numel,  # elements of the tensor
    g_mult,  # grads are multiplied by this (1 / grad_scale * clip coefficient)
    seed,  # stochastic rounding seed
    decay,  # weight_decay, in C_DTYPE like every scalar below
    eps,  # eps
    neg_clr,  # -lr / (1 + (step - 1) * lr_decay)
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
    s_ptr = region(state_sum, s_off, FULL)
    w_ptr = region(master, s_off, FULL)
    mask = None if FULL else offs < numel
    p = load_param(p_ptr, w_ptr, offs, mask, C_DTYPE, MASTER)
    g = load_grad(g_ptr, offs, mask, g_mult, C_DTYPE, SCALE_GRAD)
    s = tl.load(s_ptr + offs, mask=mask).to(C_DTYPE)
    p, g = prepare_grad(p, g, decay, MAXIMIZE, WEIGHT_DECAY, False)
    s = tl.fma(g, g, s)  # state_sum.addcmul_(grad, grad, value=1)
    std = ieee_sqrt(s, C_DTYPE) + eps  # state_sum.sqrt().add_(eps)
    p = p + ieee_div(neg_clr * g, std, C_DTYPE)  # param.addcdiv_(grad, std, value=-clr)
    store_param(p_ptr, w_ptr, p, offs, mask, seed, s_off + offs, P_DTYPE, MASTER, STOCHASTIC)
    tl.store(s_ptr + offs, to_storage(s, S_DTYPE), mask=mask)


@jit_kernel(unspecialized=_SCALARS)
def _adagrad_kernel(
    tensor_table,  # *i64 [n, ROW]: param/grad addresses, state offset, numel, vector end, flags, member
    block_table,  # *i64 [n_blocks]: tensor index << 32 | block index in the tensor
    state_sum,  # flat state: sum of squared grads
    step_table,  # *f64 [n, 1]: per-tensor neg_clr (PER_TENSOR_STEP), else any tensor
    steps,  # device step counts (DEVICE_STEP); this and the next five: see _features
    lr_ptr,
    grad_scale,
    found_inf,
    clip_coef,
    master,
    decay: tl.int64,  # weight_decay, as float_bits
    eps: tl.int64,  # eps
    neg_clr: tl.int64,  # -lr / (1 + (step - 1) * lr_decay) (host steps)
    lr_decay: tl.int64,  # lr_decay (device steps)
    lr: tl.int64,  # lr (device steps)
    seed: tl.int64,  # stochastic rounding seed
    P_DTYPE: tl.constexpr,  # param and grad element type
    S_DTYPE: tl.constexpr,  # state element type
    C_DTYPE: tl.constexpr,  # math type: fp32, or fp64 for fp64 params
    WEIGHT_DECAY: tl.constexpr,  # weight_decay != 0
    MAXIMIZE: tl.constexpr,
    PER_TENSOR_STEP: tl.constexpr,  # tensors of this launch are at different (host) steps
    DEVICE_STEP: tl.constexpr,
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
            clr = (-(lr64 / (1.0 + (step - 1.0) * hp(lr_decay, tl.float64)))).to(C_DTYPE)
        else:
            step = 0.0
            clr = step_scalar(step_table, t, 0, 1, neg_clr, PER_TENSOR_STEP, C_DTYPE)
        g_mult = grad_multiplier(grad_scale, clip_coef, HAS_GRAD_SCALE, HAS_CLIP)
        rseed = random_seed(seed, step, DEVICE_STEP)
        decay_c = hp(decay, C_DTYPE)
        eps_c = hp(eps, C_DTYPE)
        scale_grad = HAS_GRAD_SCALE or HAS_CLIP
        if full:
            _adagrad_block(
                p_addr, g_addr, state_sum, master, s_off, offs, numel, g_mult, rseed, decay_c, eps_c, clr,
                P_DTYPE, S_DTYPE, C_DTYPE, WEIGHT_DECAY, MAXIMIZE, scale_grad, MASTER, STOCHASTIC, True,
            )  # fmt: skip
        else:  # a tensor's last block, or a tensor whose address is not 16-byte aligned
            _adagrad_block(
                p_addr, g_addr, state_sum, master, s_off, offs, numel, g_mult, rseed, decay_c, eps_c, clr,
                P_DTYPE, S_DTYPE, C_DTYPE, WEIGHT_DECAY, MAXIMIZE, scale_grad, MASTER, STOCHASTIC, False,
            )  # fmt: skip


def adagrad_step(
    tables: Tables,
    state_sum: torch.Tensor,
    *,
    param_dtype: torch.dtype,
    lr: float,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    step_scalars: tuple[float] | torch.Tensor,
    features: Features,
    num_warps: int,
) -> None:
    """One Adagrad step over a segment; ``step_scalars`` holds ``-lr / (1 + (step - 1) * lr_decay)``
    (host step counts; with device step counts the kernel computes it)."""
    if features.steps is not None:
        step_scalars = (0.0,)
    step_table, step_bits, per_tensor = step_args(step_scalars, 1, tables)
    common, common_bits, common_flags = feature_args(features, lr, tables.tensor_table)
    args = (
        state_sum,
        step_table,
        *common,
        float_bits(weight_decay),
        float_bits(eps),
        *step_bits,
        float_bits(lr_decay),
        *common_bits,
    )
    constexprs = {
        "P_DTYPE": triton_dtype(param_dtype),
        "S_DTYPE": triton_dtype(state_sum.dtype),
        "C_DTYPE": compute_dtype(param_dtype),
        "WEIGHT_DECAY": weight_decay != 0,
        "MAXIMIZE": maximize,
        "PER_TENSOR_STEP": per_tensor,
        **common_flags,
    }
    launch(_adagrad_kernel, tables, args, constexprs, num_warps)
