"""The one update kernel: everything an optimizer step does that is not the algorithm.

``_update_kernel`` locates its block (tensor, elements), skips the step when AMP found an inf,
reads the hyperparameters and step scalars, unscales and clips the grad, loads the param (or
its fp32 master copy) and the present states, applies maximize and weight decay, calls the
algorithm's math, and stores the param (rounded, or stochastically rounded) and the states. Full
blocks of 16-byte-aligned tensors take an unmasked path with 128-bit accesses; a tensor's last
block, or any block of a misaligned tensor, takes the masked path.

An algorithm is an ``Algorithm``: a ``@triton.jit`` math function passed to the kernel as a
``tl.constexpr``, the names of its per-element states, and, where it has step-dependent scalars,
a ``@triton.jit`` function that computes them on the device:

* ``math(p, g, s, fresh, lr, h, k, O0, O1, O2, C_DTYPE) -> (p, s)`` updates one block: ``p``
  and ``g`` (after maximize and weight decay), ``s`` the tuple of states in ``state_keys``
  order (a state absent from this launch holds a placeholder that is neither loaded nor stored),
  ``h`` the hyperparameters, ``k`` the step scalars, ``lr``, all in C_DTYPE; ``fresh`` is true on
  a tensor's first step (``uses_fresh``); ``O0..O2`` its constexpr options. States named in
  ``read_only`` are loaded but never stored (Muon's update, written by another launch).
* ``device_scalars(step, aux, lr, h, O0, O1, O2) -> k`` the step scalars from float64 inputs (the
  step already advanced; ``aux`` the tuple of per-parameter scalars kept beside it, as they were
  before this step), as the host computes them from host step counts;
  ``advance_aux(aux, step, lr, h) -> aux`` advances those scalars (NAdam's mu_product, ASGD's eta
  and mu), in their own dtype.

Step scalars come from the launch arguments when every tensor of the launch is at the same host
step, else from a per-tensor float64 table ``[n, N_K + 3]`` whose columns are the ``N_K`` step
scalars, lr, the decay factor and the step count. With step counts on the device (capturable,
AMP) that table is written once per step by ``_advance_kernel``, so the update kernel itself never
runs float64 transcendentals and never reads a device lr.

Hyperparameters and step scalars sit in fixed, individually annotated ``tl.int64`` slots, never
in tuples: Triton specializes tuple elements on their values whatever ``do_not_specialize``
says, and an LR scheduler must never cause a recompilation.
"""

# No `from __future__ import annotations`: see _jit.
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from ._features import Features, feature_args, grad_multiplier, load_grad, load_param, store_param
from ._jit import as_ptr, compute_dtype, float_bits, hp, region, to_storage, triton_dtype
from ._quant import CODES, QB, SQRT, dequantize, maps, quantize
from ._tables import ROW, Tables, is_fresh, jit_kernel, launch, locate, to_device

MAX_H = 6  # hyperparameter slots
MAX_K = 4  # step-scalar slots
MAX_O = 3  # algorithm option slots
MASKED_PARTS = 4  # a masked block runs as this many parts (registers: see _update_kernel)
READ_ONLY = 16  # LIVE bit READ_ONLY + i: state i is loaded but not stored
EXTRA_COLS = 3  # per-tensor table columns after the step scalars: lr, decay, step
_H = [f"h{i}" for i in range(MAX_H)]
_K = [f"k{i}" for i in range(MAX_K)]


@dataclass(frozen=True)
class Algorithm:
    """What the kernels need to know of one algorithm (see the module docstring)."""

    math: object  # @triton.jit
    state_keys: tuple[str, ...]  # every per-element state it may keep, in the order ``math`` sees them
    n_hyper: int  # hyperparameters (``h``)
    n_step: int = 0  # step scalars (``k``)
    device_scalars: object = None  # @triton.jit, computing ``k`` on the device
    advance_aux: object = None  # @triton.jit, advancing the per-parameter scalars besides ``step``
    n_aux: int = 0  # per-parameter scalars besides ``step`` that the device advances
    uses_fresh: bool = False  # state created from the first grad (FLAG_FRESH)
    read_only: tuple[str, ...] = ()  # states it only reads: loaded, never stored
    reduce: object = None  # @triton.jit, per-element terms of the per-tensor sums the update needs
    n_sums: int = 0  # how many (each step then takes two launches: the sums, then the update)


@triton.jit
def _block(
    p_addr, g_addr, states, scales, qmap, master, s_off, first, numel, fresh, g_mult, seed, lr, decay, h, k, sums,
    N: tl.constexpr,  # elements from ``first``
    MATH: tl.constexpr, REDUCE: tl.constexpr, N_SUMS: tl.constexpr, PHASE: tl.constexpr,
    LIVE: tl.constexpr, O0: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr,
    P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, C_DTYPE: tl.constexpr,
    QUANT: tl.constexpr, Q_SQRT: tl.constexpr, Q_FP8: tl.constexpr, Q_STOCHASTIC: tl.constexpr, QB_: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
    SCALE_GRAD: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
    FULL: tl.constexpr,  # an unmasked block of 16-byte-aligned tensors: 128-bit accesses
):  # fmt: skip
    p_ptr = as_ptr(p_addr, P_DTYPE, FULL)
    g_ptr = as_ptr(g_addr, P_DTYPE, FULL)
    w_ptr = region(master, s_off, FULL)
    offs = first + tl.arange(0, N)
    mask = None if FULL else offs < numel
    p = load_param(p_ptr, w_ptr, offs, mask, C_DTYPE, MASTER)
    g = load_grad(g_ptr, offs, mask, g_mult, C_DTYPE, SCALE_GRAD)
    ptrs = ()
    s = ()
    if QUANT:  # 8-bit states (_quant): the scales of the blocks from ``first``
        q_first = (s_off + first) // QB_
        q_mask = None if FULL else first + tl.arange(0, N // QB_) * QB_ < numel
    for i in tl.static_range(len(states)):
        ptrs = ptrs + (region(states[i], s_off, FULL),)
        if (LIVE >> i) & 1:
            if (QUANT >> i) & 1:
                x = dequantize(ptrs[i], scales[i], qmap, offs, mask, q_first, q_mask, N, QB_, (Q_SQRT >> i) & 1, Q_FP8)
                s = s + (x.to(C_DTYPE),)
            else:
                s = s + (tl.load(ptrs[i] + offs, mask=mask).to(C_DTYPE),)
        else:
            s = s + (p,)  # placeholder: never loaded, never stored
    # The grad every algorithm starts from, in torch's order: negated if MAXIMIZE, then L2 decay
    # (grad.add(param, alpha=weight_decay)) or, DECOUPLED, the param decayed by 1 - lr * weight_decay.
    if MAXIMIZE:
        g = -g
    if WEIGHT_DECAY:
        if DECOUPLED:
            p = p * decay
        else:
            g = tl.fma(decay, p, g)
    if PHASE == 1:  # the reduction pass: this block's share of the tensor's sums; nothing stored
        parts = REDUCE(p, g, s, fresh, lr, h, k, O0, O1, O2, C_DTYPE)
        for i in tl.static_range(N_SUMS):
            x = parts[i]
            if not FULL:
                x = tl.where(mask, x, 0.0)
            tl.atomic_add(sums + i, tl.sum(x, axis=0))
    else:
        p, s = MATH(p, g, s, fresh, lr, h, k, O0, O1, O2, C_DTYPE)
        store_param(p_ptr, w_ptr, p, offs, mask, seed, s_off + first, N, P_DTYPE, MASTER, STOCHASTIC)
        for i in tl.static_range(len(states)):
            if ((LIVE & ~(LIVE >> 16)) >> i) & 1:  # present and not read-only (LIVE bit READ_ONLY + i)
                if (QUANT >> i) & 1:
                    quantize(
                        ptrs[i], scales[i], qmap, s[i], offs, mask, q_first, q_mask, seed + ((i + 1) << 32),
                        s_off + first, N, QB_, (Q_SQRT >> i) & 1, Q_FP8, Q_STOCHASTIC,
                    )  # fmt: skip
                else:
                    tl.store(ptrs[i] + offs, to_storage(s[i], S_DTYPE), mask=mask)


@jit_kernel(unspecialized=[*_H, *_K, "lr", "decay", "seed"])
def _update_kernel(
    tensor_table,  # *i64 [n, ROW]: param/grad addresses, state offset, numel, vector end, flags, member
    block_table,  # *i64 [n_blocks]: tensor index << 32 | chunk index in the tensor (BLOCKS blocks)
    states,  # tuple of flat state buffers, in the algorithm's key order (absent ones: any tensor)
    scales,  # tuple of flat fp32 scale buffers of the quantized states (QUANT), else any tensor each
    qmap,  # *f32 [512]: the int8 codes' dynamic maps, signed then unsigned (_quant.maps), else any tensor
    step_table,  # *f64 [n, N_K + 3]: per-tensor step scalars, lr, decay, step (PER_TENSOR_STEP), else any
    grad_scale,  # AMP: grads are divided by it (HAS_GRAD_SCALE)
    found_inf,  # AMP: nonzero skips the whole update (HAS_FOUND_INF)
    clip_coef,  # global-norm clipping: grads are multiplied by it (HAS_CLIP)
    master,  # flat fp32 master copy of the params (MASTER)
    sum_table,  # [n, N_SUMS] in the math type: per-tensor sums, added by PHASE 1, read by PHASE 2
    h0: tl.int64,  # hyperparameters, as float_bits (unused slots: 0)
    h1: tl.int64,
    h2: tl.int64,
    h3: tl.int64,
    h4: tl.int64,
    h5: tl.int64,
    k0: tl.int64,  # step scalars, as float_bits (one value for the whole launch)
    k1: tl.int64,
    k2: tl.int64,
    k3: tl.int64,
    lr: tl.int64,  # lr, as float_bits
    decay: tl.int64,  # 1 - lr * weight_decay (DECOUPLED) or weight_decay
    seed: tl.int64,  # stochastic rounding seed
    MATH: tl.constexpr,  # the algorithm's @triton.jit math
    REDUCE: tl.constexpr,  # the algorithm's @triton.jit reduction (N_SUMS > 0)
    N_SUMS: tl.constexpr,  # per-tensor sums the update needs (LAMB's norms): two launches
    PHASE: tl.constexpr,  # 0: the update; with N_SUMS: 1 the reduction pass, 2 the update reading its sums
    LIVE: tl.constexpr,  # bit i set: state i is present (loaded and stored; not stored if bit READ_ONLY + i)
    N_H: tl.constexpr,  # hyperparameters used
    N_K: tl.constexpr,  # step scalars used
    USES_FRESH: tl.constexpr,  # read the FRESH flag of the tensor
    O0: tl.constexpr,  # algorithm options
    O1: tl.constexpr,
    O2: tl.constexpr,
    P_DTYPE: tl.constexpr,  # param and grad element type
    S_DTYPE: tl.constexpr,  # state element type (of the states that are not quantized)
    QUANT: tl.constexpr,  # bit i set: state i is stored as 8-bit codes with block scales (_quant)
    Q_SQRT: tl.constexpr,  # bit i set: state i has sqrt codes (else signed)
    Q_FP8: tl.constexpr,  # the codes are float8_e4m3fn (else int8)
    Q_STOCHASTIC: tl.constexpr,  # quantize with stochastic rounding
    QB_: tl.constexpr,  # elements per scale
    PARTS: tl.constexpr,  # a masked block runs as this many parts
    C_DTYPE: tl.constexpr,  # math type: fp32, or fp64 for fp64 params
    WEIGHT_DECAY: tl.constexpr,  # weight_decay != 0
    DECOUPLED: tl.constexpr,  # decay the param (AdamW-style)
    MAXIMIZE: tl.constexpr,
    PER_TENSOR_STEP: tl.constexpr,  # step scalars from step_table (tensors at different steps, device steps)
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    MASTER: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    BLOCK: tl.constexpr,  # elements per block (one 16-byte vector per thread and array)
    BLOCKS: tl.constexpr,  # blocks per program (each block-table entry covers BLOCKS * BLOCK elements)
):
    t, start, p_addr, g_addr, s_off, numel, vec_end = locate(tensor_table, block_table, BLOCK * BLOCKS)
    if HAS_FOUND_INF:
        go = tl.load(found_inf) == 0
    else:
        go = True
    if go:  # AMP: a step with inf/nan grads changes nothing
        hb = (h0, h1, h2, h3, h4, h5)
        h = ()
        for i in tl.static_range(N_H):
            h = h + (hp(hb[i], C_DTYPE),)
        k = ()
        if PER_TENSOR_STEP:
            row = step_table + t * (N_K + 3)  # EXTRA_COLS
            for j in tl.static_range(N_K):
                k = k + (tl.load(row + j).to(C_DTYPE),)
            lr_c = tl.load(row + N_K).to(C_DTYPE)
            decay_c = tl.load(row + N_K + 1).to(C_DTYPE)
            rseed = seed + tl.load(row + N_K + 2).to(tl.int64)  # new random bits at every (replayed) step
        else:
            kb = (k0, k1, k2, k3)
            for j in tl.static_range(N_K):
                k = k + (hp(kb[j], C_DTYPE),)
            lr_c = hp(lr, C_DTYPE)
            decay_c = hp(decay, C_DTYPE)
            rseed = seed
        sums = sum_table + t * N_SUMS
        if PHASE == 2:  # the tensor's sums from the reduction pass follow the step scalars
            for j in tl.static_range(N_SUMS):
                k = k + (tl.load(sums + j).to(C_DTYPE),)
        if USES_FRESH:
            fresh = is_fresh(tensor_table, t)
        else:
            fresh = False
        g_mult = grad_multiplier(grad_scale, clip_coef, HAS_GRAD_SCALE, HAS_CLIP)
        scale_grad = HAS_GRAD_SCALE or HAS_CLIP
        for r in tl.static_range(BLOCKS):
            first = start + r * BLOCK
            if first + BLOCK <= vec_end:
                _block(
                    p_addr, g_addr, states, scales, qmap, master, s_off, first, numel, fresh, g_mult, rseed, lr_c,
                    decay_c, h, k, sums, BLOCK, MATH, REDUCE, N_SUMS, PHASE, LIVE, O0, O1, O2, P_DTYPE, S_DTYPE,
                    C_DTYPE, QUANT, Q_SQRT, Q_FP8, Q_STOCHASTIC, QB_, WEIGHT_DECAY, DECOUPLED, MAXIMIZE, scale_grad,
                    MASTER, STOCHASTIC, True,
                )  # fmt: skip
            elif first < numel:
                # A tensor's last block, or a block of a tensor whose address is not 16-byte aligned:
                # masked scalar accesses, in parts so that they need no more registers than the full
                # path (as one block they take up to twice as many, which then holds for the whole
                # kernel: 130 instead of 64 for bf16 AMSGrad); parts past the tensor's end are skipped.
                # (8-bit states: 2 parts of whole blocks of QB_ elements; 4 spilled with Triton 3.9.)
                for part in tl.static_range(PARTS):
                    sub = first + part * (BLOCK // PARTS)
                    if sub < numel:
                        _block(
                            p_addr, g_addr, states, scales, qmap, master, s_off, sub, numel, fresh, g_mult, rseed, lr_c,
                            decay_c, h, k, sums, BLOCK // PARTS, MATH, REDUCE, N_SUMS, PHASE, LIVE, O0, O1, O2,
                            P_DTYPE, S_DTYPE, C_DTYPE, QUANT, Q_SQRT, Q_FP8, Q_STOCHASTIC, QB_, WEIGHT_DECAY,
                            DECOUPLED, MAXIMIZE, scale_grad, MASTER, STOCHASTIC, False,
                        )  # fmt: skip


def _padded(values, slots: int) -> tuple[int, ...]:
    assert len(values) <= slots, (values, slots)
    return (*(float_bits(x) for x in values), *(0,) * (slots - len(values)))


def _options(options) -> dict:
    assert len(options) <= MAX_O, options
    padded = (*options, *(False,) * (MAX_O - len(options)))
    return {f"O{i}": padded[i] for i in range(MAX_O)}


def update_step(
    algo: Algorithm,
    tables: Tables,
    flat: dict[str, torch.Tensor],
    *,
    param_dtype: torch.dtype,
    lr: float,
    hyper: tuple[float, ...],
    options: tuple = (),
    step_scalars: tuple[float, ...] | torch.Tensor = (),
    weight_decay: float = 0.0,
    decoupled: bool = False,
    maximize: bool = False,
    features: Features,
    num_warps: int = 8,
    combine_sums=None,
    scales: dict[str, torch.Tensor] | None = None,
    stochastic_codes: bool = False,
) -> None:
    """One step of ``algo`` over a segment. ``flat`` holds the present flat state buffers (keys of
    ``algo.state_keys``), ``hyper`` the hyperparameters ``math`` reads as ``h``, ``options`` its
    constexpr options; ``step_scalars`` is the tuple of step scalars for every tensor of the
    launch or a per-tensor table (``step_table``, ``advance``). With per-tensor sums,
    ``combine_sums(sums)`` may combine them between the two launches (across ranks). ``scales``
    holds the scale buffers of the states that are 8-bit (``flat`` then holds their codes; every
    region starts at a multiple of ``QB`` elements), ``stochastic_codes`` their rounding."""
    assert len(hyper) == algo.n_hyper, (algo, hyper)
    per_tensor = isinstance(step_scalars, torch.Tensor)
    tensors, flags = feature_args(features, tables.tensor_table)
    present = [flat.get(key) for key in algo.state_keys]
    scales = scales or {}
    quant = [key in scales for key in algo.state_keys]
    any_state = next((s for s, q in zip(present, quant) if s is not None and not q), tables.tensor_table)
    sums = tables.tensor_table  # any tensor, unless the algorithm needs per-tensor sums
    if algo.n_sums:  # this step's sums, zeroed on the device (no allocation: capturable)
        if tables.sums is None:
            shape, device = (tables.tensor_table.shape[0], algo.n_sums), tables.block_table.device
            tables.sums = torch.empty(shape, dtype=_sum_dtype(param_dtype), device=device)
        sums = tables.sums.zero_()
    args = (
        tuple(any_state if s is None else s for s in present),
        tuple(scales.get(key, tables.tensor_table) for key in algo.state_keys),
        maps(tables.block_table.device) if scales else tables.tensor_table,
        step_scalars if per_tensor else tables.tensor_table,
        *tensors,
        sums,
        *_padded(hyper, MAX_H),
        *_padded(() if per_tensor else step_scalars, MAX_K),
        float_bits(lr),
        float_bits(1.0 - lr * weight_decay if decoupled else weight_decay),
        features.seed,
    )
    live = sum(1 << i for i, s in enumerate(present) if s is not None)
    read_only = sum(1 << i for i, key in enumerate(algo.state_keys) if key in algo.read_only)
    constexprs = {
        "MATH": algo.math,
        "REDUCE": algo.reduce or _no_reduce,
        "N_SUMS": algo.n_sums,
        "LIVE": live | (live & read_only) << READ_ONLY,
        "N_H": algo.n_hyper,
        "N_K": algo.n_step,
        "USES_FRESH": algo.uses_fresh,
        **_options(options),
        "P_DTYPE": triton_dtype(param_dtype),
        "S_DTYPE": triton_dtype(any_state.dtype if any_state is not tables.tensor_table else param_dtype),
        **_quant_constexprs(algo, flat, scales, stochastic_codes, tables.block),
        "C_DTYPE": compute_dtype(param_dtype),
        "WEIGHT_DECAY": weight_decay != 0,
        "DECOUPLED": decoupled,
        "MAXIMIZE": maximize,
        "PER_TENSOR_STEP": per_tensor,
        **flags,
    }
    for phase in (1, 2) if algo.n_sums else (0,):
        launch(_update_kernel, tables, args, {**constexprs, "PHASE": phase}, num_warps)
        if phase == 1 and combine_sums is not None:
            combine_sums(sums)


def _quant_constexprs(algo: Algorithm, flat: dict, scales: dict, stochastic: bool, block: int) -> dict:
    bits = [1 << i for i, key in enumerate(algo.state_keys) if key in scales]
    sqrt = [1 << i for i, key in enumerate(algo.state_keys) if key in scales and CODES[key] == SQRT]
    return {
        "QUANT": sum(bits),
        "Q_SQRT": sum(sqrt),
        "Q_FP8": any(flat[key].dtype == torch.float8_e4m3fn for key in scales),
        "Q_STOCHASTIC": stochastic and bool(scales),
        "QB_": QB,
        "PARTS": min(2, block // QB) if scales else MASKED_PARTS,
    }


def _sum_dtype(param_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if param_dtype == torch.float64 else torch.float32


@triton.jit
def _no_reduce(p, g, s, fresh, lr, h, k, O0, O1, O2, C_DTYPE):
    return ()


def step_table(per_row: np.ndarray, lr: float, weight_decay: float, decoupled: bool, steps, device) -> torch.Tensor:
    """The per-tensor table of host step scalars (rows ``[k..., lr, decay, step]``), for a launch
    whose tensors are at different host steps."""
    decay = 1.0 - lr * weight_decay if decoupled else weight_decay
    n = len(per_row)
    table = np.column_stack([per_row.reshape(n, -1), np.full(n, lr), np.full(n, decay), np.asarray(steps)])
    return to_device(np.ascontiguousarray(table, dtype=np.float64), device)


# --- step counts on the device ---------------------------------------------------------------------
@triton.jit
def _no_scalars(step, aux, lr, h, O0, O1, O2):
    return ()


@triton.jit
def _same_aux(aux, step, lr, h):
    return aux


@jit_kernel(unspecialized=["n", *_H, "lr", "weight_decay"])
def _advance_kernel(
    tensor_table,  # *i64 [n, ROW]: the launch's tensor table (member column)
    steps,  # device step counts of the segment (per member)
    aux,  # tuple of the N_AUX per-parameter device scalars besides step (else a 1-tuple of any tensor)
    step_table,  # *f64 [n, N_K + 3]: written here, read by the update kernel
    found_inf,  # AMP: nonzero means this step is skipped (HAS_FOUND_INF)
    lr_ptr,  # lr on the device (LR_ON_DEVICE)
    n,  # tensors in the launch
    h0: tl.int64,  # hyperparameters, as float_bits
    h1: tl.int64,
    h2: tl.int64,
    h3: tl.int64,
    h4: tl.int64,
    h5: tl.int64,
    lr: tl.int64,  # lr, as float_bits (not LR_ON_DEVICE)
    weight_decay: tl.int64,  # weight_decay, as float_bits
    SCALARS: tl.constexpr,  # the algorithm's device_scalars
    ADVANCE_AUX: tl.constexpr,  # the algorithm's advance_aux
    N_H: tl.constexpr,
    N_K: tl.constexpr,
    N_AUX: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    DECOUPLED: tl.constexpr,
    O0: tl.constexpr,
    O1: tl.constexpr,
    O2: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """step += 1 (torch: ``step_t += 1``) for every tensor of the launch unless found_inf is set,
    then the step scalars, lr, decay and step of each tensor into ``step_table``, in float64."""
    i = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = i < n
    member = tl.load(tensor_table + i * 8 + 6, mask=ok, other=0)  # ROW, COL_MEMBER
    step = tl.load(steps + member, mask=ok, other=0)
    if HAS_FOUND_INF:
        advance = tl.load(found_inf) == 0
    else:
        advance = True
    step = tl.where(advance, step + 1, step)
    tl.store(steps + member, step, mask=ok)
    step64 = step.to(tl.float64)
    hb = (h0, h1, h2, h3, h4, h5)
    h = ()
    for j in tl.static_range(N_H):
        h = h + (hp(hb[j], tl.float64),)
    if LR_ON_DEVICE:
        lr64 = tl.load(lr_ptr).to(tl.float64)
    else:
        lr64 = hp(lr, tl.float64)
    old = ()
    for j in tl.static_range(N_AUX):
        old = old + (tl.load(aux[j] + member, mask=ok, other=1),)
    if N_AUX > 0:
        new = ADVANCE_AUX(old, step64, lr64, h)
        for j in tl.static_range(N_AUX):
            tl.store(aux[j] + member, tl.where(advance, new[j], old[j]), mask=ok)
    k = SCALARS(step64, old, lr64, h, O0, O1, O2)
    row = step_table + i * (N_K + 3)  # EXTRA_COLS
    for j in tl.static_range(N_K):
        tl.store(row + j, k[j], mask=ok)
    if DECOUPLED:
        decay = 1.0 - lr64 * hp(weight_decay, tl.float64)
    else:
        decay = hp(weight_decay, tl.float64)
    tl.store(row + N_K, lr64, mask=ok)
    tl.store(row + N_K + 1, decay, mask=ok)
    tl.store(row + N_K + 2, step64, mask=ok)


def advance(
    algo: Algorithm,
    tables: Tables,
    features: Features,
    *,
    lr: float,
    hyper: tuple[float, ...],
    options: tuple = (),
    weight_decay: float = 0.0,
    decoupled: bool = False,
    aux: tuple[torch.Tensor, ...] = (),
) -> torch.Tensor:
    """Advance the device step counts of the tensors in ``tables`` (and ``aux``) and compute their
    step scalars into the launch's per-tensor table, which it returns (one small launch)."""
    n = tables.tensor_table.shape[0]
    if tables.step_table is None:
        tables.step_table = torch.empty(
            (n, algo.n_step + EXTRA_COLS), dtype=torch.float64, device=tables.block_table.device
        )
    block_t = 256
    args = (
        tables.tensor_table,
        features.steps,
        aux or (features.steps,),
        tables.step_table,
        features.steps if features.found_inf is None else features.found_inf,
        features.steps if features.lr_tensor is None else features.lr_tensor,
        n,
        *_padded(hyper, MAX_H),
        float_bits(lr),
        float_bits(weight_decay),
    )
    constexprs = {
        "SCALARS": algo.device_scalars or _no_scalars,
        "ADVANCE_AUX": algo.advance_aux or _same_aux,
        "N_H": algo.n_hyper,
        "N_K": algo.n_step,
        "N_AUX": len(aux),
        "HAS_FOUND_INF": features.found_inf is not None,
        "LR_ON_DEVICE": features.lr_tensor is not None,
        "DECOUPLED": decoupled,
        **_options(options),
        "BLOCK_T": block_t,
    }
    launch(_advance_kernel, tables, args, constexprs, num_warps=4, grid=(triton.cdiv(n, block_t),))
    return tables.step_table


assert ROW == 8 and EXTRA_COLS == 3 and READ_ONLY == 16  # the kernels above spell these out
