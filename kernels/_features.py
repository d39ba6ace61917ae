"""Switches every update kernel shares: AMP (grad scale, inf skip), global-norm clipping, fp32
master weights, bf16 stochastic rounding, and device-side step counts (capturable steps).

Each kernel takes the same trailing arguments, built by ``feature_args``:
tensors ``steps, lr_ptr, grad_scale, found_inf, clip_coef, master``, scalars ``lr, seed``, and
constexprs DEVICE_STEP, LR_ON_DEVICE, HAS_GRAD_SCALE, HAS_FOUND_INF, HAS_CLIP, MASTER, STOCHASTIC.
A switch that is off costs nothing: its code is not generated.
"""

# No `from __future__ import annotations`: see _tables.
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._tables import Tables, float_bits, hp, jit_kernel, to_storage


@dataclass
class Features:
    """What one launch uses beyond the algorithm itself (None / False: off)."""

    steps: torch.Tensor | None = None  # device step counts of the segment's params (DEVICE_STEP)
    lr_tensor: torch.Tensor | None = None  # lr read on the device (capturable with a device tensor lr)
    grad_scale: torch.Tensor | None = None  # AMP: grads are divided by it
    found_inf: torch.Tensor | None = None  # AMP: nonzero skips the whole update
    clip_coef: torch.Tensor | None = None  # global-norm clipping: grads are multiplied by it
    master: torch.Tensor | None = None  # flat fp32 master copy of bf16/fp16 params
    stochastic: bool = False  # bf16 params stored with stochastic rounding
    seed: int = 0  # stochastic rounding: a new value every step (host steps), a base (device steps)


UNSPECIALIZED = ["lr", "seed"]  # the trailing scalar arguments, never specialized


def feature_args(f: Features, lr: float, any_tensor: torch.Tensor):
    """(tensor arguments, scalar arguments, constexprs) of ``f`` for a kernel launch."""
    tensors = tuple(
        any_tensor if t is None else t for t in (f.steps, f.lr_tensor, f.grad_scale, f.found_inf, f.clip_coef, f.master)
    )
    scalars = (float_bits(lr), f.seed)
    constexprs = {
        "DEVICE_STEP": f.steps is not None,
        "LR_ON_DEVICE": f.lr_tensor is not None,
        "HAS_GRAD_SCALE": f.grad_scale is not None,
        "HAS_FOUND_INF": f.found_inf is not None,
        "HAS_CLIP": f.clip_coef is not None,
        "MASTER": f.master is not None,
        "STOCHASTIC": f.stochastic,
    }
    return tensors, scalars, constexprs


# --- jit helpers ---------------------------------------------------------------------------------
@triton.jit
def grad_multiplier(grad_scale, clip_coef, HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr):
    """What grads are multiplied by: 1 / grad_scale (in float64, then rounded, as torch's
    ``GradScaler.unscale_`` computes its inverse scale) times the clip coefficient."""
    m = 1.0
    if HAS_GRAD_SCALE:
        m = (1.0 / tl.load(grad_scale).to(tl.float64)).to(tl.float32)
    if HAS_CLIP:
        m = m * tl.load(clip_coef).to(tl.float32)
    return m


@triton.jit
def load_grad(g_ptr, offs, mask, multiplier, C_DTYPE: tl.constexpr, SCALE: tl.constexpr):
    g = tl.load(g_ptr + offs, mask=mask).to(C_DTYPE)
    if SCALE:
        g = g * multiplier
    return g


@triton.jit
def load_param(p_ptr, m_ptr, offs, mask, C_DTYPE: tl.constexpr, MASTER: tl.constexpr):
    """The param in math precision: the fp32 master copy when there is one."""
    if MASTER:
        p = tl.load(m_ptr + offs, mask=mask).to(C_DTYPE)
    else:
        p = tl.load(p_ptr + offs, mask=mask).to(C_DTYPE)
    return p


@triton.jit
def stochastic_bf16(x, seed, offsets):
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction (unbiased): add
    16 random bits below the kept ones and truncate. NaN stays NaN; inf stays inf."""
    bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
    noise = tl.randint(seed, offsets.to(tl.uint32)).to(tl.uint32, bitcast=True) & 0xFFFF
    rounded = (bits + noise) >> 16
    quiet_nan = ((bits >> 16) & 0x8000) | 0x7FC0
    # select in 32 bits, then narrow: Triton 3.0 widens uint16 | constant to int32
    return tl.where(x != x, quiet_nan, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store_param(
    p_ptr, m_ptr, p, offs, mask, seed, rand_offs,
    P_DTYPE: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
):  # fmt: skip
    """Store the updated param: into the fp32 master copy and, rounded, the param itself."""
    if MASTER:
        tl.store(m_ptr + offs, p.to(tl.float32), mask=mask)
    if STOCHASTIC:
        tl.store(p_ptr + offs, stochastic_bf16(p, seed, rand_offs), mask=mask)
    else:
        tl.store(p_ptr + offs, to_storage(p, P_DTYPE), mask=mask)


@triton.jit
def device_step(steps, tensor_table, t):
    """The step count of tensor ``t`` (already advanced for this step), in float64."""
    return tl.load(steps + tl.load(tensor_table + t * 8 + 6)).to(tl.float64)  # ROW, COL_MEMBER


@triton.jit
def lr_value(lr_bits, lr_ptr, LR_ON_DEVICE: tl.constexpr):
    """lr in float64: from the device tensor (capturable) or the launch argument."""
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = hp(lr_bits, tl.float64)
    return lr


@triton.jit
def pow64(base, exponent):
    """base ** exponent in float64 for base > 0 (0 for base 0), as exp(exponent * log(base))."""
    return tl.exp(exponent * tl.log(base))


@triton.jit
def random_seed(seed, step, DEVICE_STEP: tl.constexpr):
    """Stochastic rounding seed: the step count makes it new at every (graph-replayed) step."""
    if DEVICE_STEP:
        s = seed + step.to(tl.int64)
    else:
        s = seed
    return s


# --- advancing device step counts -------------------------------------------------------------
@jit_kernel(unspecialized=["n", "beta1", "momentum_decay"])
def _advance_kernel(
    tensor_table,  # *i64 [n, ROW]: the launch's tensor table (member column)
    steps,  # device step counts of the segment
    mu_product,  # NAdam's device mu_product of the segment (NADAM), else any tensor
    found_inf,  # AMP: nonzero means this step is skipped (HAS_FOUND_INF)
    n,  # tensors in the launch
    beta1: tl.int64,  # NAdam's beta1, as float_bits
    momentum_decay: tl.int64,  # NAdam's momentum_decay
    HAS_FOUND_INF: tl.constexpr,
    NADAM: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """step += 1 (torch: ``step_t += 1``) for every tensor of the launch, unless found_inf is set;
    NAdam also ``mu_product *= beta1 * (1 - 0.5 * 0.96 ** (step * momentum_decay))``."""
    i = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = i < n
    member = tl.load(tensor_table + i * 8 + 6, mask=ok, other=0)  # ROW, COL_MEMBER
    step = tl.load(steps + member, mask=ok, other=0)
    if HAS_FOUND_INF:
        advance = tl.load(found_inf) == 0
    else:
        advance = True
    new_step = step + 1
    tl.store(steps + member, tl.where(advance, new_step, step), mask=ok)
    if NADAM:
        b1 = hp(beta1, tl.float64)
        mu = b1 * (1.0 - 0.5 * pow64(0.96, new_step.to(tl.float64) * hp(momentum_decay, tl.float64)))
        mp = tl.load(mu_product + member, mask=ok, other=1)
        tl.store(mu_product + member, tl.where(advance, mp * mu.to(mp.dtype), mp), mask=ok)


def advance_steps(
    tables: Tables,
    steps: torch.Tensor,
    found_inf: torch.Tensor | None,
    mu_product: torch.Tensor | None = None,
    beta1: float = 0.0,
    momentum_decay: float = 0.0,
) -> None:
    """Advance the device step counts of the tensors in ``tables`` (one small launch)."""
    n = tables.tensor_table.shape[0]
    block_t = 256
    _advance_kernel[(triton.cdiv(n, block_t),)](
        tables.tensor_table,
        steps,
        steps if mu_product is None else mu_product,
        steps if found_inf is None else found_inf,
        n,
        float_bits(beta1),
        float_bits(momentum_decay),
        HAS_FOUND_INF=found_inf is not None,
        NADAM=mu_product is not None,
        BLOCK_T=block_t,
        num_warps=4,
    )
