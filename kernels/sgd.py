"""SGD with momentum, dampening and Nesterov: the math of one block.

h = (momentum, 1 - dampening); O0 = MOMENTUM (momentum != 0), O1 = NESTEROV. L2 weight decay and
maximize are applied by the skeleton. The buffer starts as the first grad (``fresh``).
"""

# No `from __future__ import annotations`: see _jit.
import triton
import triton.language as tl

from ._update import Algorithm


@triton.jit
def sgd_math(p, g, s, fresh, lr, h, k, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, O2, C_DTYPE: tl.constexpr):
    (buf,) = s
    momentum, damp_w = h
    if MOMENTUM:
        if fresh:
            buf = g  # buf = grad.detach().clone()
        else:
            buf = tl.fma(damp_w, g, buf * momentum)  # buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        if NESTEROV:
            g = tl.fma(momentum, buf, g)  # grad = grad.add(buf, alpha=momentum)
        else:
            g = buf
    p = tl.fma(-lr, g, p)  # param.add_(grad, alpha=-lr)
    return p, (buf,)


SGD = Algorithm(sgd_math, ("momentum_buffer",), n_hyper=2, uses_fresh=True)
