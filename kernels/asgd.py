"""ASGD (averaged SGD): the math of one block, its step scalars and its per-parameter scalars on the
device.

h = (lambd, alpha, t0); k = (1 - lambd * eta, -eta, mu), with eta and mu as they were before this
step (torch updates them after the param). L2 weight decay and maximize are applied by the skeleton.
"""

# No `from __future__ import annotations`: see _jit.
import triton
import triton.language as tl

from ._jit import pow64
from ._update import Algorithm


@triton.jit
def asgd_math(p, g, s, fresh, lr, h, k, O0, O1, O2, C_DTYPE: tl.constexpr):
    (ax,) = s
    decay, neg_eta, mu = k
    p = p * decay  # param.mul_(1 - lambd * eta)
    p = tl.fma(neg_eta, g, p)  # param.add_(grad, alpha=-eta)
    ax = tl.where(mu == 1.0, p, ax + (p - ax) * mu)  # mu == 1: ax.copy_(param), else ax.add_(param.sub(ax).mul_(mu))
    return p, (ax,)


@triton.jit
def asgd_advance(aux, step, lr, h):
    eta, mu = aux
    lambd, alpha, t0 = h
    new_eta = lr / pow64(1.0 + lambd * lr * step, alpha)  # lr / ((1 + lambd * lr * step) ** alpha)
    new_mu = 1.0 / tl.maximum(step - t0, 1.0)  # 1 / max(1, step - t0)
    return new_eta.to(eta.dtype), new_mu.to(mu.dtype)


@triton.jit
def asgd_scalars(step, aux, lr, h, O0, O1, O2):
    eta, mu = aux
    eta = eta.to(tl.float64)
    return 1.0 - h[0] * eta, -eta, mu.to(tl.float64)


ASGD = Algorithm(
    asgd_math, ("ax",), n_hyper=3, n_step=3, device_scalars=asgd_scalars, advance_aux=asgd_advance, n_aux=2
)
