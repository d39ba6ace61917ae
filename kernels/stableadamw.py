"""StableAdamW (``optimi.StableAdamW``): AdamW with debiased betas and the lr clipped per tensor by
the RMS of g^2 / v, so each step is two launches of the update kernel per segment
(``Algorithm.reduce``): the first adds up, per tensor, ``g^2 / max(v, eps_sq)`` (``v`` the new
second moment, recomputed here and not stored) and the element count; the second updates the
moments and the param with ``lr / max(1, sqrt(sum / count))``.

h = (eps, decay_rate, host_decay): ``host_decay`` the decay factor of an unclipped step as optimi
computes it on the host in float64 (``1 - lr * weight_decay``, or ``1 - (lr / max_lr) *
weight_decay`` with ``decouple_lr``); ``decay_rate`` weight_decay (or weight_decay / max_lr), for a
clipped step's factor ``1 - lr_clipped * decay_rate``.
k = (1 - beta1_hat, beta2_hat, 1 - beta2_hat, eps_sq) with optimi's debiased betas of the group's
step, then the two sums of the reduction pass. O0 = weight_decay != 0 (optimi decays only then).
"""

# No `from __future__ import annotations`: see _jit.
import triton
import triton.language as tl

from ._jit import decay_addcmul, ieee_div, ieee_sqrt, torch_lerp
from ._update import Algorithm


@triton.jit
def stableadamw_reduce(p, g, s, fresh, lr, h, k, O0, O1, O2, C_DTYPE: tl.constexpr):
    v = decay_addcmul(s[1], g, k[1], k[2])  # the new exp_avg_sq, as the update pass computes it
    # grad.pow(2).div_(exp_avg_sq.maximum(eps_sq)), summed; the count makes .mean() of the sum
    ratio = ieee_div(g * g, tl.maximum(v, k[3], propagate_nan=tl.PropagateNan.ALL), C_DTYPE)
    return ratio, tl.zeros_like(g) + 1.0


@triton.jit
def stableadamw_math(p, g, s, fresh, lr, h, k, WEIGHT_DECAY: tl.constexpr, O1, O2, C_DTYPE: tl.constexpr):
    m, v = s
    eps, decay_rate, host_decay = h
    # exp_avg.lerp_(grad, weight=beta1_comp); exp_avg_sq.mul_(beta2_hat).addcmul_(grad, grad, value=beta2_comp)
    m = torch_lerp(m, g, k[0])
    v = decay_addcmul(v, g, k[1], k[2])
    rms = ieee_sqrt(ieee_div(k[4], k[5], C_DTYPE), C_DTYPE)  # (...).mean().sqrt()
    clipped = rms > 1.0  # lr / max(1, rms): a NaN rms leaves lr as it is, as Python's max(1, nan)
    lr = tl.where(clipped, ieee_div(lr, rms, C_DTYPE), lr)
    if WEIGHT_DECAY:  # param.mul_(1 - lr * weight_decay)
        p = p * tl.where(clipped, tl.fma(-lr, decay_rate, 1.0), host_decay)
    # param.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-lr)
    p = p + ieee_div(-lr * m, ieee_sqrt(v, C_DTYPE) + eps, C_DTYPE)
    return p, (m, v)


STABLEADAMW = Algorithm(
    stableadamw_math, ("exp_avg", "exp_avg_sq"), n_hyper=3, n_step=4, reduce=stableadamw_reduce, n_sums=2
)
