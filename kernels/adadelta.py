"""Adadelta: one segment in one launch."""

# No `from __future__ import annotations`: see _tables.
import torch
import triton
import triton.language as tl

from ._features import (
    UNSPECIALIZED,
    Features,
    feature_args,
    grad_multiplier,
    load_grad,
    load_param,
    lr_value,
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
    to_storage,
    triton_dtype,
)

_SCALARS = ["neg_lr", "rho", "rho_w", "eps", "decay", *UNSPECIALIZED]


@triton.jit
def _adadelta_block(
    p_addr,  # param address (the grad has the same layout)
    g_addr,  # grad address
    square_avg,  # flat state
    acc_delta,  # flat state
    master,  # flat fp32 master copy (MASTER)
    s_off,  # this tensor's offset in the flat state
    offs,  # element offsets of this block within the tensor
    numel,  # elements of the tensor
    g_mult,  # grads are multiplied by this (1 / grad_scale * clip coefficient)
    seed,  # stochastic rounding seed
    neg_lr,  # -lr, in C_DTYPE like every scalar below
    rho,  # rho
    rho_w,  # 1 - rho
    eps,  # eps
    decay,  # weight_decay
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
    sq_ptr = region(square_avg, s_off, FULL)
    acc_ptr = region(acc_delta, s_off, FULL)
    w_ptr = region(master, s_off, FULL)
    mask = None if FULL else offs < numel
    p = load_param(p_ptr, w_ptr, offs, mask, C_DTYPE, MASTER)
    g = load_grad(g_ptr, offs, mask, g_mult, C_DTYPE, SCALE_GRAD)
    sq = tl.load(sq_ptr + offs, mask=mask).to(C_DTYPE)
    acc = tl.load(acc_ptr + offs, mask=mask).to(C_DTYPE)
    p, g = prepare_grad(p, g, decay, MAXIMIZE, WEIGHT_DECAY, False)
    sq = decay_addcmul(sq, g, rho, rho_w)  # square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
    std = ieee_sqrt(sq + eps, C_DTYPE)  # square_avg.add(eps).sqrt_()
    delta = ieee_div(ieee_sqrt(acc + eps, C_DTYPE), std, C_DTYPE) * g  # acc_delta.add(eps).sqrt_().div_(std).mul_(grad)
    acc = decay_addcmul(acc, delta, rho, rho_w)  # acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
    p = tl.fma(neg_lr, delta, p)  # param.add_(delta, alpha=-lr)
    store_param(p_ptr, w_ptr, p, offs, mask, seed, s_off + offs, P_DTYPE, MASTER, STOCHASTIC)
    tl.store(sq_ptr + offs, to_storage(sq, S_DTYPE), mask=mask)
    tl.store(acc_ptr + offs, to_storage(acc, S_DTYPE), mask=mask)


@jit_kernel(unspecialized=_SCALARS)
def _adadelta_kernel(
    tensor_table,  # *i64 [n, ROW]: param/grad addresses, state offset, numel, vector end, flags
    block_table,  # *i64 [n_blocks]: tensor index << 32 | block index in the tensor
    square_avg,  # flat state: running average of squared grads
    acc_delta,  # flat state: running average of squared updates
    steps,  # device step counts (unused: no step-dependent scalars); this and the next five: _features
    lr_ptr,
    grad_scale,
    found_inf,
    clip_coef,
    master,
    neg_lr: tl.int64,  # -lr, as float_bits
    rho: tl.int64,  # rho
    rho_w: tl.int64,  # 1 - rho
    eps: tl.int64,  # eps
    decay: tl.int64,  # weight_decay
    lr: tl.int64,  # lr (device lr)
    seed: tl.int64,  # stochastic rounding seed
    P_DTYPE: tl.constexpr,  # param and grad element type
    S_DTYPE: tl.constexpr,  # state element type
    C_DTYPE: tl.constexpr,  # math type: fp32, or fp64 for fp64 params
    WEIGHT_DECAY: tl.constexpr,  # weight_decay != 0
    MAXIMIZE: tl.constexpr,
    DEVICE_STEP: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    MASTER: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    BLOCK: tl.constexpr,  # elements per program
):
    _, offs, p_addr, g_addr, s_off, numel, full = locate(tensor_table, block_table, BLOCK)
    if HAS_FOUND_INF:
        go = tl.load(found_inf) == 0
    else:
        go = True
    if go:  # AMP: a step with inf/nan grads changes nothing
        if LR_ON_DEVICE:
            neg_lr_c = (-lr_value(lr, lr_ptr, True)).to(C_DTYPE)
        else:
            neg_lr_c = hp(neg_lr, C_DTYPE)
        g_mult = grad_multiplier(grad_scale, clip_coef, HAS_GRAD_SCALE, HAS_CLIP)
        rho_c = hp(rho, C_DTYPE)
        rho_w_c = hp(rho_w, C_DTYPE)
        eps_c = hp(eps, C_DTYPE)
        decay_c = hp(decay, C_DTYPE)
        scale_grad = HAS_GRAD_SCALE or HAS_CLIP
        if full:
            _adadelta_block(
                p_addr, g_addr, square_avg, acc_delta, master, s_off, offs, numel, g_mult, seed,
                neg_lr_c, rho_c, rho_w_c, eps_c, decay_c,
                P_DTYPE, S_DTYPE, C_DTYPE, WEIGHT_DECAY, MAXIMIZE, scale_grad, MASTER, STOCHASTIC, True,
            )  # fmt: skip
        else:  # a tensor's last block, or a tensor whose address is not 16-byte aligned
            _adadelta_block(
                p_addr, g_addr, square_avg, acc_delta, master, s_off, offs, numel, g_mult, seed,
                neg_lr_c, rho_c, rho_w_c, eps_c, decay_c,
                P_DTYPE, S_DTYPE, C_DTYPE, WEIGHT_DECAY, MAXIMIZE, scale_grad, MASTER, STOCHASTIC, False,
            )  # fmt: skip


def adadelta_step(
    tables: Tables,
    square_avg: torch.Tensor,
    acc_delta: torch.Tensor,
    *,
    param_dtype: torch.dtype,
    lr: float,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    features: Features,
    num_warps: int,
) -> None:
    """One Adadelta step over a segment."""
    common, common_bits, common_flags = feature_args(features, lr, tables.tensor_table)
    args = (
        square_avg,
        acc_delta,
        *common,
        float_bits(-lr),
        float_bits(rho),
        float_bits(1.0 - rho),
        float_bits(eps),
        float_bits(weight_decay),
        *common_bits,
    )
    constexprs = {
        "P_DTYPE": triton_dtype(param_dtype),
        "S_DTYPE": triton_dtype(square_avg.dtype),
        "C_DTYPE": compute_dtype(param_dtype),
        "WEIGHT_DECAY": weight_decay != 0,
        "MAXIMIZE": maximize,
        **common_flags,
    }
    launch(_adadelta_kernel, tables, args, constexprs, num_warps)
