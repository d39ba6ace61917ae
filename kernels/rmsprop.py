"""RMSprop, plain, centered and with momentum: one segment in one launch."""

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
    to_storage,
    torch_lerp,
    triton_dtype,
)

_SCALARS = ["neg_lr", "alpha", "alpha_w", "eps", "decay", "momentum"]


@triton.jit
def _rmsprop_block(
    p_addr,  # param address (the grad has the same layout)
    g_addr,  # grad address
    square_avg,  # flat state
    momentum_buffer,  # flat state (MOMENTUM)
    grad_avg,  # flat state (CENTERED)
    s_off,  # this tensor's offset in the flat state
    offs,  # element offsets of this block within the tensor
    numel,  # elements of the tensor
    neg_lr,  # -lr, in C_DTYPE like every scalar below
    alpha,  # alpha
    alpha_w,  # 1 - alpha
    eps,  # eps
    decay,  # weight_decay
    momentum,  # momentum
    P_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    C_DTYPE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    MOMENTUM: tl.constexpr,
    CENTERED: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FULL: tl.constexpr,  # an unmasked block of 16-byte-aligned tensors: 128-bit accesses
):
    p_ptr = as_ptr(p_addr, P_DTYPE, FULL)
    g_ptr = as_ptr(g_addr, P_DTYPE, FULL)
    sq_ptr = region(square_avg, s_off, FULL)
    buf_ptr = region(momentum_buffer, s_off, FULL)
    ga_ptr = region(grad_avg, s_off, FULL)
    mask = None if FULL else offs < numel
    p = tl.load(p_ptr + offs, mask=mask).to(C_DTYPE)
    g = tl.load(g_ptr + offs, mask=mask).to(C_DTYPE)
    sq = tl.load(sq_ptr + offs, mask=mask).to(C_DTYPE)
    p, g = prepare_grad(p, g, decay, MAXIMIZE, WEIGHT_DECAY, False)
    sq = decay_addcmul(sq, g, alpha, alpha_w)  # square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
    tl.store(sq_ptr + offs, to_storage(sq, S_DTYPE), mask=mask)
    if CENTERED:
        ga = torch_lerp(tl.load(ga_ptr + offs, mask=mask).to(C_DTYPE), g, alpha_w)  # grad_avg.lerp_(grad, 1 - alpha)
        tl.store(ga_ptr + offs, to_storage(ga, S_DTYPE), mask=mask)
        avg = ieee_sqrt(tl.fma(-ga, ga, sq), C_DTYPE)  # square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
    else:
        avg = ieee_sqrt(sq, C_DTYPE)
    avg = avg + eps
    if MOMENTUM:
        buf = tl.load(buf_ptr + offs, mask=mask).to(C_DTYPE)
        buf = buf * momentum + ieee_div(g, avg, C_DTYPE)  # buf.mul_(momentum).addcdiv_(grad, avg)
        tl.store(buf_ptr + offs, to_storage(buf, S_DTYPE), mask=mask)
        p = tl.fma(neg_lr, buf, p)  # param.add_(buf, alpha=-lr)
    else:
        p = p + ieee_div(neg_lr * g, avg, C_DTYPE)  # param.addcdiv_(grad, avg, value=-lr)
    tl.store(p_ptr + offs, to_storage(p, P_DTYPE), mask=mask)


@jit_kernel(unspecialized=_SCALARS)
def _rmsprop_kernel(
    tensor_table,  # *i64 [n, ROW]: param/grad addresses, state offset, numel, vector end, flags
    block_table,  # *i64 [n_blocks]: tensor index << 32 | block index in the tensor
    square_avg,  # flat state: running average of squared grads
    momentum_buffer,  # flat state (MOMENTUM), else any tensor
    grad_avg,  # flat state: running average of grads (CENTERED), else any tensor
    neg_lr: tl.int64,  # -lr, as float_bits
    alpha: tl.int64,  # alpha
    alpha_w: tl.int64,  # 1 - alpha
    eps: tl.int64,  # eps
    decay: tl.int64,  # weight_decay
    momentum: tl.int64,  # momentum
    P_DTYPE: tl.constexpr,  # param and grad element type
    S_DTYPE: tl.constexpr,  # state element type
    C_DTYPE: tl.constexpr,  # math type: fp32, or fp64 for fp64 params
    WEIGHT_DECAY: tl.constexpr,  # weight_decay != 0
    MOMENTUM: tl.constexpr,  # momentum > 0
    CENTERED: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    BLOCK: tl.constexpr,  # elements per program
):
    _, offs, p_addr, g_addr, s_off, numel, full = locate(tensor_table, block_table, BLOCK)
    neg_lr_c = hp(neg_lr, C_DTYPE)
    alpha_c = hp(alpha, C_DTYPE)
    alpha_w_c = hp(alpha_w, C_DTYPE)
    eps_c = hp(eps, C_DTYPE)
    decay_c = hp(decay, C_DTYPE)
    momentum_c = hp(momentum, C_DTYPE)
    if full:
        _rmsprop_block(
            p_addr, g_addr, square_avg, momentum_buffer, grad_avg, s_off, offs, numel,
            neg_lr_c, alpha_c, alpha_w_c, eps_c, decay_c, momentum_c,
            P_DTYPE, S_DTYPE, C_DTYPE, WEIGHT_DECAY, MOMENTUM, CENTERED, MAXIMIZE, True,
        )  # fmt: skip
    else:  # a tensor's last block, or a tensor whose address is not 16-byte aligned
        _rmsprop_block(
            p_addr, g_addr, square_avg, momentum_buffer, grad_avg, s_off, offs, numel,
            neg_lr_c, alpha_c, alpha_w_c, eps_c, decay_c, momentum_c,
            P_DTYPE, S_DTYPE, C_DTYPE, WEIGHT_DECAY, MOMENTUM, CENTERED, MAXIMIZE, False,
        )  # fmt: skip


def rmsprop_step(
    tables: Tables,
    square_avg: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    grad_avg: torch.Tensor | None,
    *,
    param_dtype: torch.dtype,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    num_warps: int,
) -> None:
    """One RMSprop step over a segment."""
    args = (
        square_avg,
        square_avg if momentum_buffer is None else momentum_buffer,
        square_avg if grad_avg is None else grad_avg,
        float_bits(-lr),
        float_bits(alpha),
        float_bits(1.0 - alpha),
        float_bits(eps),
        float_bits(weight_decay),
        float_bits(momentum),
    )
    constexprs = {
        "P_DTYPE": triton_dtype(param_dtype),
        "S_DTYPE": triton_dtype(square_avg.dtype),
        "C_DTYPE": compute_dtype(param_dtype),
        "WEIGHT_DECAY": weight_decay != 0,
        "MOMENTUM": momentum > 0,
        "CENTERED": centered,
        "MAXIMIZE": maximize,
    }
    launch(_rmsprop_kernel, tables, args, constexprs, num_warps)
