"""Rprop (resilient backpropagation): the math of one block. It has no step-dependent scalars.

h = (etaminus, etaplus, step_size_min, step_size_max). maximize is applied by the skeleton; Rprop
has no weight decay.
"""

# No `from __future__ import annotations`: see _jit.
import triton
import triton.language as tl

from ._update import Algorithm


@triton.jit
def rprop_math(p, g, s, fresh, lr, h, k, O0, O1, O2, C_DTYPE: tl.constexpr):
    prev, step_size = s
    etaminus, etaplus, step_min, step_max = h
    agree = g * prev  # grad.mul(prev).sign(), then etaplus where > 0, etaminus where < 0, 1 elsewhere (0, NaN)
    factor = tl.where(agree > 0, etaplus, tl.where(agree < 0, etaminus, 1.0))
    step_size = step_size * factor  # step_size.mul_(sign).clamp_(step_size_min, step_size_max)
    step_size = tl.minimum(tl.maximum(step_size, step_min, propagate_nan=tl.PropagateNan.ALL), step_max,
                           propagate_nan=tl.PropagateNan.ALL)  # fmt: skip
    g = tl.where(factor == etaminus, 0.0, g)  # grad[sign.eq(etaminus)] = 0
    direction = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))  # grad.sign() (0 for NaN)
    p = p - direction * step_size  # param.addcmul_(grad.sign(), step_size, value=-1)
    return p, (g, step_size)  # prev.copy_(grad)


RPROP = Algorithm(rprop_math, ("prev", "step_size"), n_hyper=4)
