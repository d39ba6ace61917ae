"""SGD with momentum, dampening, Nesterov and weight decay: one segment in one launch."""

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
    store_param,
)
from ._tables import (
    Tables,
    as_ptr,
    compute_dtype,
    float_bits,
    hp,
    is_fresh,
    jit_kernel,
    launch,
    locate,
    prepare_grad,
    region,
    to_storage,
    triton_dtype,
)

_SCALARS = ["neg_lr", "decay", "momentum", "damp_w", *UNSPECIALIZED]


@triton.jit
def _sgd_block(
    p_addr,  # param address (the grad has the same layout)
    g_addr,  # grad address
    momentum_buffer,  # flat state (MOMENTUM)
    master,  # flat fp32 master copy (MASTER)
    s_off,  # this tensor's offset in the flat state
    offs,  # element offsets of this block within the tensor
    numel,  # elements of the tensor
    fresh,  # the tensor's first step with momentum: the buffer starts as the grad
    g_mult,  # grads are multiplied by this (1 / grad_scale * clip coefficient)
    seed,  # stochastic rounding seed
    neg_lr,  # -lr, in C_DTYPE like every scalar below
    decay,  # weight_decay
    momentum,  # momentum
    damp_w,  # 1 - dampening
    P_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    C_DTYPE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    SCALE_GRAD: tl.constexpr,
    MASTER: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    FULL: tl.constexpr,  # an unmasked block of 16-byte-aligned tensors: 128-bit accesses
):
    p_ptr = as_ptr(p_addr, P_DTYPE, FULL)
    g_ptr = as_ptr(g_addr, P_DTYPE, FULL)
    b_ptr = region(momentum_buffer, s_off, FULL)
    w_ptr = region(master, s_off, FULL)
    mask = None if FULL else offs < numel
    p = load_param(p_ptr, w_ptr, offs, mask, C_DTYPE, MASTER)
    g = load_grad(g_ptr, offs, mask, g_mult, C_DTYPE, SCALE_GRAD)
    p, g = prepare_grad(p, g, decay, MAXIMIZE, WEIGHT_DECAY, False)
    if MOMENTUM:
        if fresh:
            buf = g  # buf = grad.detach().clone()
        else:  # buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            buf = tl.fma(damp_w, g, tl.load(b_ptr + offs, mask=mask).to(C_DTYPE) * momentum)
        tl.store(b_ptr + offs, to_storage(buf, S_DTYPE), mask=mask)
        if NESTEROV:
            g = tl.fma(momentum, buf, g)  # grad.add(buf, alpha=momentum)
        else:
            g = buf
    p = tl.fma(neg_lr, g, p)  # param.add_(grad, alpha=-lr)
    store_param(p_ptr, w_ptr, p, offs, mask, seed, s_off + offs, P_DTYPE, MASTER, STOCHASTIC)


@jit_kernel(unspecialized=_SCALARS)
def _sgd_kernel(
    tensor_table,  # *i64 [n, ROW]: param/grad addresses, state offset, numel, vector end, flags, member
    block_table,  # *i64 [n_blocks]: tensor index << 32 | block index in the tensor
    momentum_buffer,  # flat state: momentum buffer (MOMENTUM), else any tensor
    steps,  # unused: SGD keeps no step count; this and the next five: see _features
    lr_ptr,
    grad_scale,
    found_inf,
    clip_coef,
    master,
    neg_lr: tl.int64,  # -lr, as float_bits
    decay: tl.int64,  # weight_decay
    momentum: tl.int64,  # momentum
    damp_w: tl.int64,  # 1 - dampening
    lr: tl.int64,  # lr (unused here: SGD has no device-side step scalars)
    seed: tl.int64,  # stochastic rounding seed
    P_DTYPE: tl.constexpr,  # param and grad element type
    S_DTYPE: tl.constexpr,  # state element type
    C_DTYPE: tl.constexpr,  # math type: fp32, or fp64 for fp64 params
    WEIGHT_DECAY: tl.constexpr,  # weight_decay != 0
    MOMENTUM: tl.constexpr,  # momentum != 0
    NESTEROV: tl.constexpr,
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
    t, offs, p_addr, g_addr, s_off, numel, full = locate(tensor_table, block_table, BLOCK)
    if HAS_FOUND_INF:
        go = tl.load(found_inf) == 0
    else:
        go = True
    if go:  # AMP: a step with inf/nan grads changes nothing
        fresh = is_fresh(tensor_table, t)
        g_mult = grad_multiplier(grad_scale, clip_coef, HAS_GRAD_SCALE, HAS_CLIP)
        neg_lr_c = hp(neg_lr, C_DTYPE)
        decay_c = hp(decay, C_DTYPE)
        momentum_c = hp(momentum, C_DTYPE)
        damp_c = hp(damp_w, C_DTYPE)
        scale_grad = HAS_GRAD_SCALE or HAS_CLIP
        if full:
            _sgd_block(
                p_addr, g_addr, momentum_buffer, master, s_off, offs, numel, fresh, g_mult, seed,
                neg_lr_c, decay_c, momentum_c, damp_c,
                P_DTYPE, S_DTYPE, C_DTYPE, WEIGHT_DECAY, MOMENTUM, NESTEROV, MAXIMIZE, scale_grad, MASTER, STOCHASTIC,
                True,
            )  # fmt: skip
        else:  # a tensor's last block, or a tensor whose address is not 16-byte aligned
            _sgd_block(
                p_addr, g_addr, momentum_buffer, master, s_off, offs, numel, fresh, g_mult, seed,
                neg_lr_c, decay_c, momentum_c, damp_c,
                P_DTYPE, S_DTYPE, C_DTYPE, WEIGHT_DECAY, MOMENTUM, NESTEROV, MAXIMIZE, scale_grad, MASTER, STOCHASTIC,
                False,
            )  # fmt: skip


def sgd_step(
    tables: Tables,
    momentum_buffer: torch.Tensor | None,
    *,
    param_dtype: torch.dtype,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    features: Features,
    num_warps: int,
) -> None:
    """One SGD step over a segment; tensors flagged FLAG_FRESH start their momentum buffer.
    (SGD keeps no step count, so ``features.steps`` is never set.)"""
    common, common_bits, common_flags = feature_args(features, lr, tables.tensor_table)
    args = (
        momentum_buffer if momentum != 0 else tables.tensor_table,
        *common,
        float_bits(-lr),
        float_bits(weight_decay),
        float_bits(momentum),
        float_bits(1.0 - dampening),
        *common_bits,
    )
    constexprs = {
        "P_DTYPE": triton_dtype(param_dtype),
        "S_DTYPE": triton_dtype(param_dtype if momentum_buffer is None else momentum_buffer.dtype),
        "C_DTYPE": compute_dtype(param_dtype),
        "WEIGHT_DECAY": weight_decay != 0,
        "MOMENTUM": momentum != 0,
        "NESTEROV": nesterov,
        "MAXIMIZE": maximize,
        **common_flags,
    }
    launch(_sgd_kernel, tables, args, constexprs, num_warps)
