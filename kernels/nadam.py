"""NAdam (Nesterov-accelerated Adam with momentum decay): the math of one block, and its step
scalars and mu_product on the device.

h = (1 - beta1, beta2, 1 - beta2, eps, beta1, momentum_decay);
k = (1 - beta2**step, -lr * (1 - mu) / (1 - mu_product), -lr * mu_next / (1 - mu_product * mu_next))
with mu = beta1 * (1 - 0.5 * 0.96 ** (step * momentum_decay)) and mu_next the same at step + 1.
Weight decay (L2 or decoupled) and maximize are applied by the skeleton.
"""

# No `from __future__ import annotations`: see _jit.
import triton
import triton.language as tl

from ._jit import decay_addcmul, ieee_div, ieee_sqrt, pow64, torch_lerp
from ._update import Algorithm


@triton.jit
def nadam_math(p, g, s, fresh, lr, h, k, O0, O1, O2, C_DTYPE: tl.constexpr):
    exp_avg, exp_avg_sq = s
    lerp_w, beta2, sq_w, eps, _, _ = h
    bc2, grad_coef, avg_coef = k
    # exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    exp_avg = torch_lerp(exp_avg, g, lerp_w)
    exp_avg_sq = decay_addcmul(exp_avg_sq, g, beta2, sq_w)
    denom = ieee_sqrt(ieee_div(exp_avg_sq, bc2, C_DTYPE), C_DTYPE) + eps  # exp_avg_sq.div(bc2).sqrt().add_(eps)
    # param.addcdiv_(grad, denom, value=grad_coef).addcdiv_(exp_avg, denom, value=avg_coef); both
    # quotients first (in the other order ptxas 12.8, Triton 3.3's, spills a register)
    from_grad = ieee_div(grad_coef * g, denom, C_DTYPE)
    from_avg = ieee_div(avg_coef * exp_avg, denom, C_DTYPE)
    p = p + from_grad
    p = p + from_avg
    return p, (exp_avg, exp_avg_sq)


@triton.jit
def _mu(step, h):
    return h[4] * (1.0 - 0.5 * pow64(0.96, step * h[5]))  # beta1 * (1 - 0.5 * 0.96 ** (step * momentum_decay))


@triton.jit
def nadam_advance(aux, step, lr, h):
    (mu_product,) = aux
    return (mu_product * _mu(step, h).to(mu_product.dtype),)  # mu_product *= mu, in its dtype


@triton.jit
def nadam_scalars(step, aux, lr, h, O0, O1, O2):
    mu_product = nadam_advance(aux, step, lr, h)[0].to(tl.float64)  # this step's, as torch reads it
    mu = _mu(step, h)
    mu_next = _mu(step + 1.0, h)
    bc2 = 1.0 - pow64(h[1], step)
    grad_coef = -lr * (1.0 - mu) / (1.0 - mu_product)
    avg_coef = (-lr * mu_next) / (1.0 - mu_product * mu_next)
    return bc2, grad_coef, avg_coef


NADAM = Algorithm(
    nadam_math,
    ("exp_avg", "exp_avg_sq"),
    n_hyper=6,
    n_step=3,
    device_scalars=nadam_scalars,
    advance_aux=nadam_advance,
    n_aux=1,
)
