"""Adam / AdamW / AMSGrad: the math of one block, and its step scalars on the device.

h = (1 - beta1, beta2, 1 - beta2, eps, beta1); k = (-lr / (1 - beta1**step), sqrt(1 - beta2**step));
O0 = AMSGRAD. Weight decay (L2 or decoupled) and maximize are applied by the skeleton.
"""

# No `from __future__ import annotations`: see _jit.
import triton
import triton.language as tl

from ._jit import decay_addcmul, ieee_div, ieee_sqrt, pow64, torch_lerp
from ._update import Algorithm


@triton.jit
def adam_math(p, g, s, fresh, lr, h, k, AMSGRAD: tl.constexpr, O1, O2, C_DTYPE: tl.constexpr):
    m, v, vmax = s
    lerp_w, beta2, sq_w, eps, _ = h
    neg_step, bc2_sqrt = k
    # exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    m = torch_lerp(m, g, lerp_w)
    v = decay_addcmul(v, g, beta2, sq_w)
    if AMSGRAD:
        # torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq); the denominator from it
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        denom = ieee_div(ieee_sqrt(vmax, C_DTYPE), bc2_sqrt, C_DTYPE) + eps
    else:
        denom = ieee_div(ieee_sqrt(v, C_DTYPE), bc2_sqrt, C_DTYPE) + eps  # (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    p = p + ieee_div(neg_step * m, denom, C_DTYPE)  # param.addcdiv_(exp_avg, denom, value=-step_size)
    return p, (m, v, vmax)


@triton.jit
def adam_scalars(step, aux, lr, h, O0, O1, O2):
    neg_step = -(lr / (1.0 - pow64(h[4], step)))  # -lr / bias_correction1
    bc2_sqrt = tl.sqrt(1.0 - pow64(h[1], step))  # bias_correction2 ** 0.5
    return neg_step, bc2_sqrt


ADAM = Algorithm(
    adam_math, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), n_hyper=5, n_step=2, device_scalars=adam_scalars
)
