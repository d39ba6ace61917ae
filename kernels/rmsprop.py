"""RMSprop, with momentum and the centered variant: the math of one block.

h = (alpha, 1 - alpha, eps, momentum); O0 = MOMENTUM (momentum > 0), O1 = CENTERED. L2 weight decay
and maximize are applied by the skeleton.
"""

# No `from __future__ import annotations`: see _jit.
import triton
import triton.language as tl

from ._jit import decay_addcmul, ieee_div, ieee_sqrt, torch_lerp
from ._update import Algorithm


@triton.jit
def rmsprop_math(p, g, s, fresh, lr, h, k, MOMENTUM: tl.constexpr, CENTERED: tl.constexpr, O2, C_DTYPE: tl.constexpr):
    square_avg, buf, grad_avg = s
    alpha, alpha_w, eps, momentum = h
    # square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
    square_avg = decay_addcmul(square_avg, g, alpha, alpha_w)
    if CENTERED:
        grad_avg = torch_lerp(grad_avg, g, alpha_w)  # grad_avg.lerp_(grad, 1 - alpha)
        # square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
        avg = ieee_sqrt(tl.fma(-grad_avg, grad_avg, square_avg), C_DTYPE)
    else:
        avg = ieee_sqrt(square_avg, C_DTYPE)  # square_avg.sqrt()
    avg = avg + eps
    if MOMENTUM:
        buf = buf * momentum + ieee_div(g, avg, C_DTYPE)  # buf.mul_(momentum).addcdiv_(grad, avg)
        p = tl.fma(-lr, buf, p)  # param.add_(buf, alpha=-lr)
    else:
        p = p + ieee_div(-lr * g, avg, C_DTYPE)  # param.addcdiv_(grad, avg, value=-lr)
    return p, (square_avg, buf, grad_avg)


RMSPROP = Algorithm(rmsprop_math, ("square_avg", "momentum_buffer", "grad_avg"), n_hyper=4)
