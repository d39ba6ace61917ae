"""Adamax (Adam with the infinity norm): the math of one block, and its step scalar on the device.

h = (1 - beta1, beta2, eps, beta1); k = (-lr / (1 - beta1**step),). L2 weight decay and maximize are
applied by the skeleton.
"""

# No `from __future__ import annotations`: see _jit.
import triton
import triton.language as tl

from ._jit import ieee_div, pow64, torch_lerp
from ._update import Algorithm


@triton.jit
def adamax_math(p, g, s, fresh, lr, h, k, O0, O1, O2, C_DTYPE: tl.constexpr):
    exp_avg, exp_inf = s
    lerp_w, beta2, eps, _ = h
    (neg_clr,) = k
    exp_avg = torch_lerp(exp_avg, g, lerp_w)  # exp_avg.lerp_(grad, 1 - beta1)
    # torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
    exp_inf = tl.maximum(exp_inf * beta2, tl.abs(g) + eps, propagate_nan=tl.PropagateNan.ALL)
    p = p + ieee_div(neg_clr * exp_avg, exp_inf, C_DTYPE)  # param.addcdiv_(exp_avg, exp_inf, value=-clr)
    return p, (exp_avg, exp_inf)


@triton.jit
def adamax_scalars(step, aux, lr, h, O0, O1, O2):
    return (-(lr / (1.0 - pow64(h[3], step))),)  # -lr / bias_correction


ADAMAX = Algorithm(adamax_math, ("exp_avg", "exp_inf"), n_hyper=4, n_step=1, device_scalars=adamax_scalars)
