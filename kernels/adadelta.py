"""Adadelta: the math of one block.

h = (rho, 1 - rho, eps). L2 weight decay and maximize are applied by the skeleton.
"""

# No `from __future__ import annotations`: see _jit.
import triton
import triton.language as tl

from ._jit import decay_addcmul, ieee_div, ieee_sqrt
from ._update import Algorithm


@triton.jit
def adadelta_math(p, g, s, fresh, lr, h, k, O0, O1, O2, C_DTYPE: tl.constexpr):
    square_avg, acc_delta = s
    rho, rho_w, eps = h
    square_avg = decay_addcmul(square_avg, g, rho, rho_w)  # square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
    std = ieee_sqrt(square_avg + eps, C_DTYPE)  # square_avg.add(eps).sqrt_()
    # acc_delta.add(eps).sqrt_().div_(std).mul_(grad)
    delta = ieee_div(ieee_sqrt(acc_delta + eps, C_DTYPE), std, C_DTYPE) * g
    acc_delta = decay_addcmul(acc_delta, delta, rho, rho_w)  # acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
    p = tl.fma(-lr, delta, p)  # param.add_(delta, alpha=-lr)
    return p, (square_avg, acc_delta)


ADADELTA = Algorithm(adadelta_math, ("square_avg", "acc_delta"), n_hyper=3)
