"""AdEMAMix (Pagliardini, Ablin and Grangier, 2024, "The AdEMAMix Optimizer: Better, Faster,
Older"): the math of one block, and its step scalars on the device.

Two layouts of the same math, because the device needs more constants than the hyperparameter
slots hold once the warm-up is on:

* ``ADEMAMIX``: h = (1 - beta1, beta2, 1 - beta2, eps, alpha, beta3); k = (1 - beta1**t,
  sqrt(1 - beta2**t), alpha_t, 1 - beta3_t), from the host (every path without device step
  counts) or from ``ademamix_scalars`` on the device, which needs no warm-up (alpha_t = alpha,
  beta3_t = beta3).
* ``ADEMAMIX_WARMUP``, device step counts with the warm-up on: h = (beta1, beta2, beta3, alpha,
  t_alpha_beta3, eps); k = (1 - beta1**t, sqrt(1 - beta2**t), alpha_t, 1 - beta3_t, 1 - beta1,
  1 - beta2), written by ``ademamix_warmup_scalars`` into the per-tensor table (more than the
  four step-scalar slots of a launch: it is only used with that table).

Weight decay (L2, or decoupled: the param scaled by 1 - lr * wd, or by 1 - wd with
``fixed_decay``) and maximize are applied by the skeleton.
"""

# No `from __future__ import annotations`: see _jit.
import triton
import triton.language as tl

from ._jit import decay_addcmul, ieee_div, ieee_sqrt, pow64, torch_lerp
from ._update import Algorithm


@triton.jit
def _ademamix(p, g, s, lr, w1, beta2, w2, eps, bc1, bc2_sq, alpha_t, w3, C_DTYPE: tl.constexpr):
    exp_avg, exp_avg_sq, exp_avg_slow = s
    # exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2);
    # exp_avg_slow.lerp_(grad, 1 - beta3_t)
    exp_avg = torch_lerp(exp_avg, g, w1)
    exp_avg_sq = decay_addcmul(exp_avg_sq, g, beta2, w2)
    exp_avg_slow = torch_lerp(exp_avg_slow, g, w3)
    denom = ieee_div(ieee_sqrt(exp_avg_sq, C_DTYPE), bc2_sq, C_DTYPE) + eps  # exp_avg_sq.sqrt().div_(bc2_sq).add_(eps)
    # exp_avg.div(bc1).add_(exp_avg_slow, alpha=alpha_t): one fused multiply-add, as torch's CPU add
    update = tl.fma(exp_avg_slow, alpha_t, ieee_div(exp_avg, bc1, C_DTYPE))
    p = p + ieee_div(-lr * update, denom, C_DTYPE)  # param.addcdiv_(update, de_nom, value=-lr)
    return p, (exp_avg, exp_avg_sq, exp_avg_slow)


@triton.jit
def ademamix_math(p, g, s, fresh, lr, h, k, O0, O1, O2, C_DTYPE: tl.constexpr):
    w1, beta2, w2, eps, _, _ = h
    bc1, bc2_sq, alpha_t, w3 = k
    return _ademamix(p, g, s, lr, w1, beta2, w2, eps, bc1, bc2_sq, alpha_t, w3, C_DTYPE)


@triton.jit
def ademamix_scalars(step, aux, lr, h, O0, O1, O2):
    w1, beta2, _, _, alpha, beta3 = h
    bc1 = 1.0 - pow64(1.0 - w1, step)  # 1 - beta1 ** step (beta1 = 1 - (1 - beta1): exact for beta1 >= 0.5)
    bc2_sq = tl.sqrt(1.0 - pow64(beta2, step))
    return bc1, bc2_sq, tl.zeros_like(step) + alpha, tl.zeros_like(step) + (1.0 - beta3)


@triton.jit
def ademamix_warmup_math(p, g, s, fresh, lr, h, k, O0, O1, O2, C_DTYPE: tl.constexpr):
    _, beta2, _, _, _, eps = h
    bc1, bc2_sq, alpha_t, w3, w1, w2 = k
    return _ademamix(p, g, s, lr, w1, beta2, w2, eps, bc1, bc2_sq, alpha_t, w3, C_DTYPE)


@triton.jit
def ademamix_warmup_scalars(step, aux, lr, h, O0, O1, O2):
    beta1, beta2, beta3, alpha, t_warm, _ = h
    bc1 = 1.0 - pow64(beta1, step)
    bc2_sq = tl.sqrt(1.0 - pow64(beta2, step))
    # the paper's schedules: alpha_t = min(t * alpha / T, alpha);
    # beta3_t = min(exp(ln(beta1) ln(beta3) / ((1 - t / T) ln(beta3) + (t / T) ln(beta1))), beta3)
    alpha_t = tl.minimum(step * alpha / t_warm, alpha)
    log1 = tl.log(beta1)
    log3 = tl.log(beta3)
    beta3_t = tl.minimum(tl.exp(log1 * log3 / ((1.0 - step / t_warm) * log3 + (step / t_warm) * log1)), beta3)
    zero = tl.zeros_like(step)
    return bc1, bc2_sq, alpha_t, 1.0 - beta3_t, zero + (1.0 - beta1), zero + (1.0 - beta2)


ADEMAMIX = Algorithm(
    ademamix_math, ("exp_avg", "exp_avg_sq", "exp_avg_slow"), n_hyper=6, n_step=4, device_scalars=ademamix_scalars
)
ADEMAMIX_WARMUP = Algorithm(
    ademamix_warmup_math,
    ("exp_avg", "exp_avg_sq", "exp_avg_slow"),
    n_hyper=6,
    n_step=6,
    device_scalars=ademamix_warmup_scalars,
)
