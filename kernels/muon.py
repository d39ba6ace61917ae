"""Muon: the two element-wise launches around Newton-Schulz (which runs as batched torch matmuls).

``MUON_MOMENTUM`` (before Newton-Schulz): ``buf.lerp_(grad, 1 - momentum)`` and the update to
orthogonalize, ``grad.lerp(buf, momentum)`` (nesterov) or ``buf``, written into the optimizer's
scratch buffer; the skeleton applies torch's decoupled decay ``param.mul_(1 - lr * weight_decay)``
in the same launch. h = (1 - momentum, momentum); O0 = NESTEROV, O1 = the buffer's storage dtype
(torch's nesterov lerp reads the buffer as stored).

``MUON_APPLY`` (after it): ``param.add_(update, alpha=-adjusted_lr)``, the scratch only read;
k = (-adjusted_lr,), one value for the launch or one per tensor (``step_table``).
"""

# No `from __future__ import annotations`: see _jit.
import triton
import triton.language as tl

from ._jit import to_storage, torch_lerp
from ._update import Algorithm


@triton.jit
def _as_stored(x, DTYPE: tl.constexpr):
    """``x`` as it reads back after a store in DTYPE (torch's in-place ``lerp_`` rounds the buffer)."""
    r = to_storage(x, DTYPE)
    if r.dtype == tl.uint16:  # the interpreter's bf16 rounding returns the bits
        r = r.to(tl.bfloat16, bitcast=True)
    return r.to(x.dtype)


@triton.jit
def muon_momentum_math(p, g, s, fresh, lr, h, k, NESTEROV: tl.constexpr, BUF_DTYPE: tl.constexpr, O2, C_DTYPE):
    buf, _ = s
    lerp_w, momentum = h
    buf = _as_stored(torch_lerp(buf, g, lerp_w), BUF_DTYPE)  # buf.lerp_(grad, 1 - momentum)
    if NESTEROV:
        update = torch_lerp(g, buf, momentum)  # grad.lerp(buf, momentum)
    else:
        update = buf
    return p, (buf, update)


@triton.jit
def muon_apply_math(p, g, s, fresh, lr, h, k, O0, O1, O2, C_DTYPE: tl.constexpr):
    (update,) = s
    (neg_lr,) = k
    p = tl.fma(neg_lr, update, p)  # param.add_(update, alpha=-adjusted_lr)
    return p, (update,)


MUON_MOMENTUM = Algorithm(muon_momentum_math, ("momentum_buffer", "update"), n_hyper=2)
MUON_APPLY = Algorithm(muon_apply_math, ("update",), n_hyper=0, n_step=1, read_only=("update",))
