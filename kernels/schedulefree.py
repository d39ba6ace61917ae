"""Schedule-Free AdamW (``schedulefree.AdamWScheduleFree``): the math of one step, and of the
switch between the two sequences a param holds (``train()``: y, ``eval()``: x).

The param holds y in train mode; ``z`` is the base sequence, ``exp_avg_sq`` Adam's second moment.
Per element, with every per-group scalar computed on the host in float64 as the reference does:

    v = beta2 * v + (1 - beta2) * g^2;  d = sqrt(v / bc2) + eps;  u = g / d (+ weight_decay * y)
    y = lerp(y, z, ckp1) + u * lr * (beta1 * (1 - ckp1) - 1);  z = z - lr * u

h = (beta2, 1 - beta2, eps, weight_decay); k = (bc2, ckp1, lr * (beta1 * (1 - ckp1) - 1), -lr),
lr the warmed-up lr; O0 = weight_decay != 0. The skeleton's own weight decay (on the grad, before
the math) stays off: here decay is added to the normalized grad, at y.

``SCHEDULEFREE_SWITCH``: ``p.lerp_(z, w)`` with ``w = 1 - beta1`` (x to y, ``train()``) or
``1 - 1 / beta1`` (y to x, ``eval()``), k = (w,); ``z`` is only read. Its launches point the grad
column at the param itself (there is no grad): the math never reads it.
"""

# No `from __future__ import annotations`: see _jit.
import triton
import triton.language as tl

from ._jit import decay_addcmul, ieee_div, ieee_sqrt, torch_lerp
from ._update import Algorithm


@triton.jit
def schedulefree_adamw_math(p, g, s, fresh, lr, h, k, DECAY: tl.constexpr, O1, O2, C_DTYPE: tl.constexpr):
    z, exp_avg_sq = s
    beta2, sq_w, eps, weight_decay = h
    bc2, ckp1, y_coef, neg_lr = k
    # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    exp_avg_sq = decay_addcmul(exp_avg_sq, g, beta2, sq_w)
    denom = ieee_sqrt(ieee_div(exp_avg_sq, bc2, C_DTYPE), C_DTYPE) + eps  # exp_avg_sq.div(bc2).sqrt_().add_(eps)
    u = ieee_div(g, denom, C_DTYPE)  # grad.div_(denom)
    if DECAY:
        u = tl.fma(weight_decay, p, u)  # grad_normalized.add_(y, alpha=decay): at y, before y moves
    p = torch_lerp(p, z, ckp1)  # y.lerp_(end=z, weight=ckp1)
    p = tl.fma(y_coef, u, p)  # y.add_(grad_normalized, alpha=lr * (beta1 * (1 - ckp1) - 1))
    z = tl.fma(neg_lr, u, z)  # z.sub_(grad_normalized, alpha=lr)
    return p, (z, exp_avg_sq)


@triton.jit
def schedulefree_switch_math(p, g, s, fresh, lr, h, k, O0, O1, O2, C_DTYPE: tl.constexpr):
    (z,) = s
    (weight,) = k
    return torch_lerp(p, z, weight), (z,)  # p.lerp_(end=z, weight=weight)


SCHEDULEFREE_ADAMW = Algorithm(schedulefree_adamw_math, ("z", "exp_avg_sq"), n_hyper=4, n_step=4)
SCHEDULEFREE_SWITCH = Algorithm(schedulefree_switch_math, ("z",), n_hyper=0, n_step=1, read_only=("z",))
