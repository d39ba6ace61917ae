"""Adagrad: the math of one block, and its step scalar on the device.

h = (eps, lr_decay); k = (-lr / (1 + (step - 1) * lr_decay),). L2 weight decay and maximize are
applied by the skeleton.
"""

# No `from __future__ import annotations`: see _jit.
import triton
import triton.language as tl

from ._jit import ieee_div, ieee_sqrt
from ._update import Algorithm


@triton.jit
def adagrad_math(p, g, s, fresh, lr, h, k, O0, O1, O2, C_DTYPE: tl.constexpr):
    (state_sum,) = s
    eps, _ = h
    (neg_clr,) = k
    state_sum = tl.fma(g, g, state_sum)  # state_sum.addcmul_(grad, grad, value=1)
    std = ieee_sqrt(state_sum, C_DTYPE) + eps  # state_sum.sqrt().add_(eps)
    p = p + ieee_div(neg_clr * g, std, C_DTYPE)  # param.addcdiv_(grad, std, value=-clr)
    return p, (state_sum,)


@triton.jit
def adagrad_scalars(step, aux, lr, h, O0, O1, O2):
    return (-(lr / (1.0 + (step - 1.0) * h[1])),)  # -clr


ADAGRAD = Algorithm(adagrad_math, ("sum",), n_hyper=2, n_step=1, device_scalars=adagrad_scalars)
