"""8-bit states on the host: which params get them, and their codes computed in torch.

The kernels quantize and dequantize inside the update (``kernels._quant``, which documents the
codes); the host does the same arithmetic, op for op, where a state enters or leaves the 8-bit
form outside a step: initial values, a checkpoint with fp32 states being loaded, a dequantized
export. Blocks are ``QB`` consecutive elements in the param's memory order.

Which params: those with at least ``MIN_NUMEL`` elements, two or more dims, and rows (``numel //
shape[0]``) of a whole number of blocks, decided on the param's global shape. FSDP2 shards params
by rows, so a block never straddles two ranks, every rank makes the same choice, and a
checkpoint's codes and scales reshard with the rows (its scales are ``[shape[0], row // QB]``).
Other params keep fp32 states.
"""

from __future__ import annotations

import torch

from . import _dtensor
from .kernels._quant import CODES, QB, QUANT_DTYPES, SQRT, maps, qmax

MIN_NUMEL = 4096

__all__ = ["CODES", "MIN_NUMEL", "QB", "QUANT_DTYPES", "dequantize", "quantize_into", "quantizes"]


def quantizes(p: torch.Tensor, state_dtype) -> bool:
    """Whether ``p``'s moment states are 8-bit under ``state_dtype`` (global shape only)."""
    if state_dtype not in QUANT_DTYPES or p.dim() < 2 or p.numel() < MIN_NUMEL:
        return False
    return (p.numel() // p.shape[0]) % QB == 0


def _memory_order(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The elements of ``t`` (shaped like ``like``) in ``like``'s memory order, as one dim (a view
    of ``like`` itself when ``t`` is ``like`` and dense)."""
    order = sorted(range(like.dim()), key=lambda d: -like.stride(d))
    return t.permute(order).reshape(-1)


def quantize_into(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, code: str) -> None:
    """Write the codes of ``x`` (shaped like ``codes``) into ``codes`` and their block scales into
    ``scales``, as the kernels quantize (nearest code)."""
    codes, scales = _dtensor.local(codes), _dtensor.local(scales)
    x = _memory_order(_dtensor.local(x).to(device=codes.device, dtype=torch.float32), codes).view(-1, QB)
    fp8 = codes.dtype == torch.float8_e4m3fn
    u = x.abs()
    if code == SQRT:
        u = (
            u.double().sqrt().float()
        )  # correctly rounded, as the kernels' sqrt (torch's fp32 CPU sqrt may be 1 ulp off)
    amax = torch.where(u == u, u, torch.inf).amax(1)
    scale = amax / qmax(codes.dtype)
    if not fp8:
        u = torch.where(x < 0, -u, u)  # the signed map holds the sign
    y = u / torch.where(scale > 0, scale, 1.0)[:, None]  # 0 in a zero block
    if fp8:
        e = (((y.view(torch.int32) >> 23) & 0xFF) - 127).clamp(min=-6) - 3  # spacing of the e4m3 grid
        lo = torch.floor(y * torch.exp2(-e.float())) * torch.exp2(e.float())
        hi = lo + torch.exp2(e.float())
    else:
        table = maps(codes.device)[256 if code == SQRT else 0 :][:256]
        index = (torch.searchsorted(table, y.contiguous(), right=True) - 1).clamp(0, 254)
        lo, hi = table[index], table[index + 1]
    up = (y - lo) >= (hi - y)
    if fp8:
        level = torch.where(up, hi, lo).clamp(max=448.0)
        values = torch.where(x < 0, -level, level).to(torch.float8_e4m3fn)
    else:
        values = (torch.where(up, index + 1, index) - 128).to(torch.int8)
    _memory_order(codes, codes).copy_(values.view(-1))
    scales.copy_(scale.view(scales.shape))


def dequantize(codes: torch.Tensor, scales: torch.Tensor, code: str) -> torch.Tensor:
    """The fp32 values of ``codes`` with their block ``scales`` (a tensor with the codes' shape and
    strides; DTensors for DTensor codes)."""
    local_codes = _dtensor.local(codes)
    flat = _memory_order(local_codes, local_codes)
    if local_codes.dtype == torch.float8_e4m3fn:
        u = flat.float()
    else:
        u = maps(local_codes.device)[(256 if code == SQRT else 0) + 128 + flat.long()]
    x = u.view(-1, QB) * _dtensor.local(scales).reshape(-1, 1)
    if code == SQRT:
        x = x * x
    out = torch.empty_like(local_codes, dtype=torch.float32)
    _memory_order(out, out).copy_(x.view(-1))
    return _dtensor.like_param(out, codes) if _dtensor.is_dtensor(codes) else out
