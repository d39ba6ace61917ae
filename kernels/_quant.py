"""8-bit states in the update kernel: block-scaled int8 or float8_e4m3fn codes.

A quantized state stores one byte per element (its *codes*) and one fp32 *scale* per block of
``QB`` consecutive elements of a tensor's region (in the param's memory order). The update kernel
dequantizes a block's codes when it loads the state, runs the algorithm in fp32 and quantizes the
new values when it stores them, in the same launch. What a code holds, ``u``:

* a *signed* state (moments that take both signs: ``exp_avg``, momentum buffers): ``u = x``;
* a *sqrt* state (non-negative second moments: ``exp_avg_sq``, Adagrad's ``sum``): ``u = sqrt(x)``,
  which halves the dynamic range a block must hold. Without it, a block's small second moments
  round to zero while their first moments do not, and the update divides by ``eps`` there
  (benchmarks/quantization.py measures this: such elements must not exist).

and how (``scale`` per block):

* int8: the *dynamic map* (Dettmers et al., arXiv 1511.04561 and 2110.02861, as bitsandbytes
  stores 8-bit states): 256 values in [-1, 1] (signed states) or [0, 1] (sqrt states), spread over
  seven decades, after a sign bit (signed map) a run of zero bits gives the decade, a one bit ends
  it and the remaining bits split the decade linearly; ``scale = absmax(u)``, and the code is the
  index of the nearest map value to ``u / scale``, stored as ``index - 128``;
* float8_e4m3fn: ``u / scale`` with ``scale = absmax(u) / 448``, on e4m3's grid (3 mantissa bits).

The value of code c is ``map[c + 128] * scale`` or ``c * scale``, squared for a sqrt state.
Rounding is to the nearest code (ties away from zero), in arithmetic exact and identical in the
interpreter and on the GPU; stochastic rounding (``STOCHASTIC``) picks the upper neighbour with the
probability that makes the stored value unbiased (the state's value, not its square root, for sqrt
states). A block whose values are all zero has scale 0; a NaN or inf makes its whole block
non-finite.
"""

# No `from __future__ import annotations`: see _jit.
import torch
import triton
import triton.language as tl

from ._features import random16

QB = 256  # elements per scale
QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn)
SIGNED, SQRT = "signed", "sqrt"
# The code of each torch state key that holds a moment or a buffer; keys not listed (a param-like
# average such as ASGD's ``ax`` or Schedule-Free's ``z``, Rprop's step sizes and previous grad)
# are never quantized.
CODES = {
    "exp_avg": SIGNED,
    "exp_avg_slow": SIGNED,
    "momentum_buffer": SIGNED,
    "grad_avg": SIGNED,
    "exp_avg_sq": SQRT,
    "max_exp_avg_sq": SQRT,
    "square_avg": SQRT,
    "acc_delta": SQRT,
    "sum": SQRT,
    "exp_inf": SQRT,
}


def qmax(dtype: torch.dtype) -> float:
    """What a block's absmax maps to."""
    return 448.0 if dtype == torch.float8_e4m3fn else 1.0


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 values of the dynamic map, sorted (float64). After the sign bit (signed map), decade
    ``e`` (0..6) has ``2 ** (bits - 1 - e)`` values at the centres of equal steps over
    ``(0.1, 1] * 10 ** -e``; the all-zero magnitude is 0, and the one pattern left over holds 1, so
    that a block's absmax is stored exactly (a negative absmax of a signed block as the value of
    largest magnitude below it)."""
    bits = 7 if signed else 8
    values = [torch.tensor([0.0, 1.0], dtype=torch.float64)]
    for e in range(7):
        n = 2 ** (bits - 1 - e)
        magnitudes = (0.1 + 0.9 * (torch.arange(n, dtype=torch.float64) + 0.5) / n) * 10.0**-e
        values += [magnitudes, -magnitudes] if signed else [magnitudes]
    table = torch.cat(values).sort().values
    assert table.numel() == 256
    return table


_MAPS: dict = {}


def maps(device: torch.device) -> torch.Tensor:
    """The signed map then the unsigned one, as one fp32 tensor of 512 on ``device`` (cached)."""
    if device not in _MAPS:
        _MAPS[device] = torch.cat([dynamic_map(True), dynamic_map(False)]).float().to(device)
    return _MAPS[device]


@triton.jit
def _e4m3_grid(q):
    """(lower neighbour, spacing) of q >= 0 on float8_e4m3fn's grid (3 mantissa bits, normal from
    2^-6, subnormal spacing 2^-9)."""
    e = ((q.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 127
    e = tl.maximum(e, -6) - 3  # exponent of the spacing
    spacing = ((e + 127) << 23).to(tl.float32, bitcast=True)
    lo = tl.floor(q * ((127 - e) << 23).to(tl.float32, bitcast=True)) * spacing  # exact: powers of two
    return lo, spacing


@triton.jit
def _map_floor(y, table):
    """Index of the largest map value <= y, within 0..254 (so that it has an upper neighbour): a
    binary search, one gather of the (cached) map per halving."""
    count = tl.zeros(y.shape, tl.int32)  # map values <= y
    for k in tl.static_range(8):
        candidate = count + (128 >> k)
        count = tl.where(tl.load(table + candidate - 1) <= y, candidate, count)
    return tl.minimum(tl.maximum(count - 1, 0), 254)


@triton.jit
def _square(x, SQRT_CODE: tl.constexpr):
    if SQRT_CODE:
        x = x * x
    return x


@triton.jit
def dequantize(
    ptr, scales, qmap, offs, mask, q_first, q_mask, N: tl.constexpr, QB_: tl.constexpr, SQRT_CODE: tl.constexpr,
    FP8: tl.constexpr,
):  # fmt: skip
    """The fp32 values of N elements (whole blocks) from their codes at ``ptr + offs`` and the
    scales of their blocks at ``scales + q_first`` (``qmap``: ``maps()``, for int8 codes)."""
    codes = tl.load(ptr + offs, mask=mask)
    if FP8:
        u = codes.to(tl.float32)
    else:
        u = tl.load(qmap + SQRT_CODE * 256 + 128 + codes.to(tl.int32), mask=mask)
    scale = tl.load(scales + q_first + tl.arange(0, N // QB_), mask=q_mask)
    x = _square(tl.reshape(u, (N // QB_, QB_)) * scale[:, None], SQRT_CODE)
    return tl.reshape(x, (N,))


@triton.jit
def quantize(
    ptr, scales, qmap, x, offs, mask, q_first, q_mask, seed, rand_first,
    N: tl.constexpr, QB_: tl.constexpr, SQRT_CODE: tl.constexpr, FP8: tl.constexpr, STOCHASTIC: tl.constexpr,
):  # fmt: skip
    """Store N values ``x`` (whole blocks) as codes at ``ptr + offs`` and the scales of their blocks
    at ``scales + q_first``. Stochastic rounding draws from ``seed`` by element (``rand_first``:
    the counter of the first element)."""
    x = tl.reshape(x.to(tl.float32), (N // QB_, QB_))
    u = tl.abs(x)
    if SQRT_CODE:
        u = tl.sqrt_rn(u)
    amax = tl.max(tl.where(u == u, u, float("inf")), axis=1)  # a NaN makes the block's scale inf
    if FP8:
        scale = tl.div_rn(amax, 448.0)
    else:
        scale = amax
        u = tl.where(x < 0, -u, u)  # the signed map holds the sign
    y = tl.div_rn(u, tl.where(scale > 0, scale, 1.0)[:, None])  # in code units (0 in a zero block)
    if FP8:
        lo, spacing = _e4m3_grid(y)
        hi = lo + spacing
    else:
        table = qmap + SQRT_CODE * 256
        index = _map_floor(y, table)
        lo = tl.load(table + index)
        hi = tl.load(table + index + 1)
    if STOCHASTIC:  # up with probability (f(y) - f(lo)) / (f(hi) - f(lo)), f = _square: unbiased in x
        r = tl.reshape(random16(seed, rand_first, N).to(tl.float32), (N // QB_, QB_)) * (1.0 / 65536.0)
        f_lo = _square(lo, SQRT_CODE)
        up = r * (_square(hi, SQRT_CODE) - f_lo) < _square(y, SQRT_CODE) - f_lo
    else:
        up = (y - lo) >= (hi - y)
    if FP8:
        level = tl.minimum(tl.where(up, hi, lo), 448.0)
        codes = tl.where(x < 0, -level, level).to(tl.float8e4nv)  # exact: level is on the e4m3 grid
    else:
        codes = (tl.where(up, index + 1, index) - 128).to(tl.int8)
    tl.store(ptr + offs, tl.reshape(codes, (N,)), mask=mask)
    tl.store(scales + q_first + tl.arange(0, N // QB_), scale, mask=q_mask)
