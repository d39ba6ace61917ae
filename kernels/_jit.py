"""Device helpers every kernel shares: scalars passed as bits, correctly rounded math, torch's
arithmetic for lerp and addcmul, typed pointers from table addresses, storage rounding.

Hyperparameters travel as the int64 bit pattern of their float64 value (``float_bits`` on the
host, ``hp`` here), because Triton passes Python floats as fp32 and fp64 params need fp64
scalars; kernels declare those arguments ``tl.int64`` and never specialize on them, so no value
of lr, betas or eps can cause a new compilation.
"""

# No `from __future__ import annotations` in kernel modules: Triton's interpreter recognizes
# `tl.constexpr` parameters from evaluated annotations.
import struct

import torch
import triton
import triton.language as tl

_TRITON_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


def triton_dtype(dtype: torch.dtype):
    """The Triton element type of a real floating torch dtype."""
    try:
        return _TRITON_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"fused_optim kernels do not handle {dtype}") from None


def compute_dtype(dtype: torch.dtype):
    """Math runs in fp32, or fp64 for fp64 tensors."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def float_bits(x: float) -> int:
    """The int64 bit pattern of ``float(x)`` as float64; ``hp`` undoes it inside a kernel."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under TRITON_INTERPRET=1 (it then runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


@triton.jit
def _probe():
    pass


# True when TRITON_INTERPRET=1 was set before import: kernels then run on CPU tensors.
INTERPRETED = is_interpreted(_probe)

if INTERPRETED:

    @triton.jit
    def to_storage(x, DTYPE: tl.constexpr):
        """Round to the storage dtype, to nearest even as the GPU's cvt.rn does. The interpreter
        truncates fp32 -> bf16 (and its RTNE mode rounds ties up), so bf16 is rounded here."""
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
            quiet_nan = ((bits >> 16) & 0x8000).to(tl.uint16) | 0x7FC0
            r = tl.where(x != x, quiet_nan, rounded)
        else:
            r = x.to(DTYPE)
        return r

else:

    @triton.jit
    def to_storage(x, DTYPE: tl.constexpr):
        """Round to the storage dtype (to nearest even)."""
        return x.to(DTYPE)


@triton.jit
def hp(bits, DTYPE: tl.constexpr):
    """A hyperparameter passed by ``float_bits``, as a scalar of DTYPE."""
    # The interpreter types small ints (the bits of 0.0) as int32: widen before the bitcast.
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(DTYPE)


@triton.jit
def ieee_sqrt(x, C_DTYPE: tl.constexpr):
    """Correctly rounded square root (tl.sqrt may be approximate in fp32; fp64 sqrt is exact)."""
    if C_DTYPE == tl.float64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def ieee_div(x, y, C_DTYPE: tl.constexpr):
    """Correctly rounded division (fp32 ``/`` may be approximate; fp64 division is exact)."""
    if C_DTYPE == tl.float64:
        r = x / y
    else:
        r = tl.div_rn(x, y)
    return r


@triton.jit
def pow64(base, exponent):
    """base ** exponent in float64 for base > 0 (0 for base 0), as exp(exponent * log(base))."""
    return tl.exp(exponent * tl.log(base))


@triton.jit
def torch_lerp(start, end, weight):
    """``start.lerp_(end, weight)`` as torch computes it: two-sided, exact at weight 0 and 1."""
    small = weight < 0.5
    return tl.fma(tl.where(small, weight, weight - 1.0), end - start, tl.where(small, start, end))


@triton.jit
def decay_addcmul(avg, x, beta, weight):
    """``avg.mul_(beta).addcmul_(x, x, value=weight)``: one rounding for the product, one fused
    multiply-add, as torch's CPU kernels do."""
    return tl.fma(weight * x, x, avg * beta)


@triton.jit
def as_ptr(addr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """A typed pointer from a table address; ALIGNED adds the 16-byte hint that lets the
    compiler emit 128-bit accesses (only valid on the full-block path)."""
    ptr = addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def region(base, s_off, ALIGNED: tl.constexpr):
    """Pointer to a tensor's region of a flat state buffer. Regions start at multiples of ALIGN
    elements; ALIGNED adds the 16-byte hint for the full-block path. (Hints attach to the op that
    makes a value, so they are applied here, on a pointer this helper creates, and in ``as_ptr``:
    a hint on a value passed into a helper would be lost.)"""
    ptr = base + s_off
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr
