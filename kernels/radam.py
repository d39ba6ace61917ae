"""RAdam (rectified Adam): the math of one block, and its step scalars on the device.

h = (1 - beta1, beta2, 1 - beta2, eps, beta1); k = (1 - beta1**step, sqrt(1 - beta2**step), rect,
rectify) where rectify is 1.0 once the SMA length rho_t exceeds 5 (adaptive step), else 0.0.
Weight decay (L2 or decoupled) and maximize are applied by the skeleton.
"""

# No `from __future__ import annotations`: see _jit.
import triton
import triton.language as tl

from ._jit import decay_addcmul, ieee_div, ieee_sqrt, pow64, torch_lerp
from ._update import Algorithm


@triton.jit
def radam_math(p, g, s, fresh, lr, h, k, O0, O1, O2, C_DTYPE: tl.constexpr):
    exp_avg, exp_avg_sq = s
    lerp_w, beta2, sq_w, eps, _ = h
    bc1, bc2_sqrt, rect, rectify = k
    # exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    exp_avg = torch_lerp(exp_avg, g, lerp_w)
    exp_avg_sq = decay_addcmul(exp_avg_sq, g, beta2, sq_w)
    update = ieee_div(exp_avg, bc1, C_DTYPE) * lr  # bias_corrected_exp_avg * lr
    if rectify != 0:
        # * (bc2_sqrt / (exp_avg_sq.sqrt() + eps)), a reciprocal then a product as torch's rdiv, * rect
        adaptive = ieee_div(tl.full(exp_avg_sq.shape, 1.0, C_DTYPE), ieee_sqrt(exp_avg_sq, C_DTYPE) + eps, C_DTYPE)
        update = update * (adaptive * bc2_sqrt) * rect
    p = p - update  # param.add_(update, alpha=-1.0)
    return p, (exp_avg, exp_avg_sq)


@triton.jit
def radam_scalars(step, aux, lr, h, O0, O1, O2):
    beta2_pow = pow64(h[1], step)
    bias_correction2 = 1.0 - beta2_pow
    rho_inf = 2.0 / (1.0 - h[1]) - 1.0
    rho_t = rho_inf - 2.0 * step * beta2_pow / bias_correction2
    # early steps have rho_t <= 5 (unused, possibly negative): clamp so sqrt makes no nan
    rect_sq = (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
    rect = tl.where(rho_t > 5.0, tl.sqrt(tl.maximum(rect_sq, 0.0)), 1.0)
    bc2_sqrt = tl.where(rho_t > 5.0, tl.sqrt(bias_correction2), 1.0)
    return 1.0 - pow64(h[4], step), bc2_sqrt, rect, (rho_t > 5.0).to(tl.float64)


RADAM = Algorithm(radam_math, ("exp_avg", "exp_avg_sq"), n_hyper=5, n_step=4, device_scalars=radam_scalars)
