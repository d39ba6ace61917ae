"""LAMB and LARS: element-wise updates scaled by a per-tensor trust ratio, so each step is two
launches of the update kernel per segment (the norms, then the update; ``Algorithm.reduce``).

LAMB (timm's ``Lamb`` with ``always_adapt=True``): h = (1 - beta1, beta2, 1 - beta2, eps, weight_decay);
k = (bias_correction1, sqrt(bias_correction2), sum p^2, sum u^2) with
``u = (m / bias_correction1) / (sqrt(v) / sqrt(bias_correction2) + eps) + weight_decay * p``;
``p -= lr * r * u``, ``r = ||p|| / ||u||`` (1 where either norm is 0).

LARS: h = (momentum, weight_decay, trust_coefficient, eps); k = (sum p^2, sum g^2);
``r = trust_coefficient * ||p|| / (||g|| + weight_decay * ||p|| + eps)`` (1 where ``||p||`` or
``||g||`` is 0), ``buf = momentum * buf + r * (g + weight_decay * p)``, ``p -= lr * buf``.
"""

# No `from __future__ import annotations`: see _jit.
import triton
import triton.language as tl

from ._jit import decay_addcmul, ieee_div, ieee_sqrt, pow64, torch_lerp
from ._update import Algorithm


@triton.jit
def _lamb_update(p, g, s, h, k, C_DTYPE: tl.constexpr):
    """The new moments and the update u (before the trust ratio)."""
    m, v = s
    lerp_w, beta2, sq_w, eps, weight_decay = h
    bc1, bc2_sqrt = k[0], k[1]
    m = torch_lerp(m, g, lerp_w)  # exp_avg.lerp_(grad, 1 - beta1)
    v = decay_addcmul(v, g, beta2, sq_w)  # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = ieee_div(ieee_sqrt(v, C_DTYPE), bc2_sqrt, C_DTYPE) + eps  # (v.sqrt() / sqrt(bc2)).add_(eps)
    u = ieee_div(ieee_div(m, bc1, C_DTYPE), denom, C_DTYPE)  # (exp_avg / bc1).div_(denom)
    u = tl.fma(weight_decay, p, u)  # update.add_(param, alpha=weight_decay)
    return m, v, u


@triton.jit
def _trust_ratio(numerator, denominator, C_DTYPE: tl.constexpr):
    """numerator / denominator where both are positive, else 1."""
    return tl.where((numerator > 0) & (denominator > 0), ieee_div(numerator, denominator, C_DTYPE), 1.0)


@triton.jit
def lamb_reduce(p, g, s, fresh, lr, h, k, O0, O1, O2, C_DTYPE: tl.constexpr):
    u = _lamb_update(p, g, s, h, k, C_DTYPE)[2]
    return p * p, u * u


@triton.jit
def lamb_math(p, g, s, fresh, lr, h, k, O0, O1, O2, C_DTYPE: tl.constexpr):
    m, v, u = _lamb_update(p, g, s, h, k, C_DTYPE)
    ratio = _trust_ratio(ieee_sqrt(k[2], C_DTYPE), ieee_sqrt(k[3], C_DTYPE), C_DTYPE)  # ||p|| / ||u||
    p = tl.fma(-(lr * ratio), u, p)  # param.add_(update, alpha=-lr * trust_ratio)
    return p, (m, v)


@triton.jit
def lamb_scalars(step, aux, lr, h, O0, O1, O2):
    beta1 = 1.0 - h[0]
    return 1.0 - pow64(beta1, step), tl.sqrt(1.0 - pow64(h[1], step))


@triton.jit
def lars_reduce(p, g, s, fresh, lr, h, k, O0, O1, O2, C_DTYPE: tl.constexpr):
    return p * p, g * g


@triton.jit
def lars_math(p, g, s, fresh, lr, h, k, O0, O1, O2, C_DTYPE: tl.constexpr):
    (buf,) = s
    momentum, weight_decay, trust, eps = h
    p_norm = ieee_sqrt(k[0], C_DTYPE)
    g_norm = ieee_sqrt(k[1], C_DTYPE)
    ratio = _trust_ratio(trust * p_norm, g_norm + weight_decay * p_norm + eps, C_DTYPE)
    ratio = tl.where(g_norm > 0, ratio, 1.0)  # 1 where ||p|| or ||g|| is 0
    buf = tl.fma(momentum, buf, ratio * tl.fma(weight_decay, p, g))  # momentum * buf + r * (g + wd * p)
    p = tl.fma(-lr, buf, p)
    return p, (buf,)


LAMB = Algorithm(
    lamb_math, ("exp_avg", "exp_avg_sq"), n_hyper=5, n_step=2, device_scalars=lamb_scalars, reduce=lamb_reduce, n_sums=2
)
LARS = Algorithm(lars_math, ("momentum_buffer",), n_hyper=4, reduce=lars_reduce, n_sums=2)
