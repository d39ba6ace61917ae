"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"): the math of one block,
with ``lion_pytorch.Lion``'s arithmetic.

h = (beta1, 1 - beta1, beta2, 1 - beta2); no step scalars. The decay (always the param scaled by
a factor, ``p.data.mul_(1 - lr * wd)``) is applied by the skeleton.
"""

# No `from __future__ import annotations`: see _jit.
import triton
import triton.language as tl

from ._update import Algorithm


@triton.jit
def lion_math(p, g, s, fresh, lr, h, k, O0, O1, O2, C_DTYPE: tl.constexpr):
    (exp_avg,) = s
    beta1, w1, beta2, w2 = h
    # update = exp_avg.clone().mul_(beta1).add(grad, alpha=1 - beta1).sign_(): torch's CPU add with
    # alpha is one fused multiply-add; sign of NaN is 0, as torch's
    c = tl.fma(g, w1, exp_avg * beta1)
    zero = tl.zeros_like(c)
    sign = tl.where(c > 0, zero + 1.0, tl.where(c < 0, zero - 1.0, zero))
    p = tl.fma(sign, -lr, p)  # p.add_(update, alpha=-lr): exact product, one rounding
    exp_avg = tl.fma(g, w2, exp_avg * beta2)  # exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)
    return p, (exp_avg,)


LION = Algorithm(lion_math, ("exp_avg",), n_hyper=4)
