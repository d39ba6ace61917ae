"""Training features of the update kernel: AMP (grad scale, inf skip), global-norm clipping, fp32
master weights, bf16 stochastic rounding, and device-side step counts (capturable steps).

The update kernel takes the tensors ``grad_scale, found_inf, clip_coef, master`` and the scalar
``seed`` built by ``feature_args``, with constexprs HAS_GRAD_SCALE, HAS_FOUND_INF, HAS_CLIP, MASTER,
STOCHASTIC. A switch that is off costs nothing: its code is not generated. Device step counts and
a device lr are read by the step-scalar kernel (``_update.advance``), never by the update kernel.
"""

# No `from __future__ import annotations`: see _jit.
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._jit import to_storage


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


def feature_args(f: Features, any_tensor: torch.Tensor):
    """(tensor arguments, constexprs) of ``f`` for an update launch."""
    tensors = tuple(any_tensor if t is None else t for t in (f.grad_scale, f.found_inf, f.clip_coef, f.master))
    constexprs = {
        "HAS_GRAD_SCALE": f.grad_scale is not None,
        "HAS_FOUND_INF": f.found_inf is not None,
        "HAS_CLIP": f.clip_coef is not None,
        "MASTER": f.master is not None,
        "STOCHASTIC": f.stochastic,
    }
    return tensors, constexprs


# --- jit helpers ---------------------------------------------------------------------------------
@triton.jit
def grad_multiplier(grad_scale, clip_coef, HAS_GRAD_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr):
    """What grads are multiplied by: 1 / grad_scale times the clip coefficient. torch's
    ``GradScaler.unscale_`` takes the inverse of its fp32 scale in float64, then rounds it to fp32;
    a correctly rounded fp32 division gives the same value (double rounding is innocuous when the
    wide format has more than twice the bits, 53 >= 2 * 24 + 2), with no float64 arithmetic."""
    m = 1.0
    if HAS_GRAD_SCALE:
        m = tl.div_rn(1.0, tl.load(grad_scale).to(tl.float32))
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
def random16(seed, first, N: tl.constexpr):
    """N independent random 16-bit values (held in uint32) for the elements ``first .. first + N - 1``
    of a counter space (``first`` a multiple of 8): one Philox draw of four 32-bit words per 8
    elements, each word split into its two halves, where one draw per element would cost 8x."""
    counters = (first // 8 + tl.arange(0, N // 8)).to(tl.uint32)
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    words = tl.join(tl.join(r0, r1), tl.join(r2, r3)).to(tl.uint32, bitcast=True)  # [N // 8, 2, 2]
    return tl.reshape(tl.join(words & 0xFFFF, words >> 16), (N,))  # element 8c + j: half j of draw c


@triton.jit
def stochastic_bf16(x, seed, first, N: tl.constexpr):
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction (unbiased): add
    16 random bits below the kept ones and truncate. NaN stays NaN; inf stays inf. ``first``: the
    counter of the block's first element (its place in the flat state), so the bits depend on the
    seed, the step and the element, never on the program that runs it."""
    bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
    rounded = (bits + random16(seed, first, N)) >> 16
    quiet_nan = ((bits >> 16) & 0x8000) | 0x7FC0
    # select in 32 bits, then narrow: Triton 3.0 widens uint16 | constant to int32
    return tl.where(x != x, quiet_nan, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store_param(
    p_ptr, m_ptr, p, offs, mask, seed, rand_first, N: tl.constexpr,
    P_DTYPE: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
):  # fmt: skip
    """Store the updated param: into the fp32 master copy and, rounded, the param itself."""
    if MASTER:
        tl.store(m_ptr + offs, p.to(tl.float32), mask=mask)
    if STOCHASTIC:
        tl.store(p_ptr + offs, stochastic_bf16(p, seed, rand_first, N), mask=mask)
    else:
        tl.store(p_ptr + offs, to_storage(p, P_DTYPE), mask=mask)
