"""Adafactor: a factored second moment and an RMS-clipped update need two reductions before the
update, so a step is three passes over tiles, the fewest that give torch's update.

Each tensor is seen as ``B`` row-major matrices of ``R x C`` (a param with more than one dim: its
last two dims; a vector: rows of ``TC`` elements) and cut into tiles of ``TR x TC`` elements; one
program per tile. The passes (``PHASE``), all on the same tile table:

0. sums: the squared param norm per tensor (alpha) and, for matrices, the row and column sums of
   g^2, and per matrix the sums of g^2 and of the old row_var (atomics into scratch);
1. norm: the new factors ``row_var``, ``col_var`` (lerped towards the row/column means of g^2)
   and the squared norm of the update ``u = g / sqrt(max(v, eps1^2))`` per tensor, with
   ``v = row_var col_var / max(mean(row_var), eps1)`` (matrices; the mean of the lerped rows is
   the lerp of the means) or the lerped variance (vectors); the first tile of each row (column)
   writes the new factors to scratch;
2. update: ``p <- p (1 - lr wd) - alpha / max(1, RMS(u) / d) * u``, storing the new factors
   (from scratch, by the same tiles) and the vectors' variance.

(Two passes cannot give torch's update: its RMS clip needs the norm of the whole update, which
needs the factors, which need the whole grad's row and column sums.) The arithmetic follows
torch's ``_single_tensor_adafactor`` (torch.optim.Adafactor) in fp32, with the per-tensor
coefficients in float64 as torch computes them on the host. Per-tensor scalars (``step_table``
rows): ``one_minus_beta2_t, rho_t, lr, 1 - lr * weight_decay, step``.
"""

# No `from __future__ import annotations`: see _jit.
import numpy as np
import torch
import triton
import triton.language as tl

from ._features import Features, grad_multiplier, load_grad, load_param, store_param
from ._jit import as_ptr, compute_dtype, float_bits, hp, ieee_div, ieee_sqrt, torch_lerp, triton_dtype
from ._tables import ROW, Tables, jit_kernel, launch, to_device

TR, TC = 16, 128  # tile rows and columns (2,048 elements: 8 per thread with 8 warps)
INFO = 8  # columns of the per-tensor info table
# info columns: rows R, columns C, row_var offset (-1: a vector), col_var offset, variance offset,
# tile rows, tile columns, 0
_SCALARS = 5  # step_table columns: one_minus_beta2_t, rho_t, lr, decay, step


@triton.jit
def _tile(tensor_table, info, tiles):
    """This program's tile: tensor index, tile index, numel, info row, R, C, matrix index, row and
    column indices, the element offsets and mask of the tile ([TR, TC]), and whether it is the
    first tile of its rows (columns)."""
    entry = tl.load(tiles + tl.program_id(0))
    t = entry >> 32
    tile = entry & 0xFFFFFFFF
    row = tensor_table + t * 8  # ROW
    numel = tl.load(row + 3)
    inf = info + t * 8  # INFO
    R = tl.load(inf + 0)
    C = tl.load(inf + 1)
    tiles_r = tl.load(inf + 5)
    tiles_c = tl.load(inf + 6)
    b = tile // (tiles_r * tiles_c)
    rem = tile % (tiles_r * tiles_c)
    r = (rem // tiles_c) * 16 + tl.arange(0, 16)  # TR
    c = (rem % tiles_c) * 128 + tl.arange(0, 128)  # TC
    offs = b * R * C + r[:, None] * C + c[None, :]
    mask = (r[:, None] < R) & (c[None, :] < C) & (offs < numel)
    return t, tile, numel, inf, R, C, b, r, c, offs, mask, rem % tiles_c == 0, rem // tiles_c == 0


@triton.jit
def _lerped(var, sums, at, mask, n, beta, S_DTYPE: tl.constexpr, C_DTYPE: tl.constexpr):
    """``var.lerp_(sums / n, beta)`` at ``at``, as it will be stored (torch:
    ``row_var.lerp_(norm(grad, dim=-1).square_().div_(C), one_minus_beta2_t)``, and columns alike)."""
    mean = ieee_div(tl.load(sums + at, mask=mask, other=0.0), n.to(C_DTYPE), C_DTYPE)
    new = torch_lerp(tl.load(var + at, mask=mask, other=1.0).to(C_DTYPE), mean, beta)
    return tl.where(mask, new.to(S_DTYPE).to(C_DTYPE), 1.0)


@triton.jit
def _update(
    g, inf, R, C, b, r, c, offs, mask, row_var, col_var, variance, row_sum, col_sum, rv_sum, g2_sum, row_new,
    col_new, beta, eps1, FACTORS_DONE: tl.constexpr, S_DTYPE: tl.constexpr, C_DTYPE: tl.constexpr,
):  # fmt: skip
    """u = g / sqrt(max(v, eps1^2)), and the new state it used: the row and column factors
    (matrices; from scratch once FACTORS_DONE) or the lerped variance (vectors)."""
    row_off = tl.load(inf + 2)
    rv = tl.zeros((16,), C_DTYPE)  # TR
    cv = tl.zeros((128,), C_DTYPE)  # TC
    if row_off >= 0:  # var_estimate = row_var @ col_var / row_var.mean(dim=-2).clamp(min=eps1)
        rows = row_off + b * R
        cols = tl.load(inf + 3) + b * C
        if FACTORS_DONE:
            rv = tl.load(row_new + rows + r, mask=r < R, other=1.0)
            cv = tl.load(col_new + cols + c, mask=c < C, other=1.0)
        else:
            rv = _lerped(row_var, row_sum, rows + r, r < R, C, beta, S_DTYPE, C_DTYPE)
            cv = _lerped(col_var, col_sum, cols + c, c < C, R, beta, S_DTYPE, C_DTYPE)
        old_mean = ieee_div(tl.load(rv_sum + rows), R.to(C_DTYPE), C_DTYPE)
        g2_mean = ieee_div(ieee_div(tl.load(g2_sum + rows), C.to(C_DTYPE), C_DTYPE), R.to(C_DTYPE), C_DTYPE)
        mean = tl.maximum(torch_lerp(old_mean, g2_mean, beta), eps1)
        v = ieee_div(rv[:, None] * cv[None, :], mean, C_DTYPE)
    else:  # variance.lerp_(grad * grad, one_minus_beta2_t)
        v = tl.load(variance + tl.load(inf + 4) + offs, mask=mask, other=1.0).to(C_DTYPE)
        v = torch_lerp(v, g * g, beta)
    var = v
    v = tl.maximum(v, eps1 * eps1)  # clamp_(min=eps1 * eps1).rsqrt_().mul_(grad)
    u = ieee_div(1.0, ieee_sqrt(v, C_DTYPE), C_DTYPE) * g
    return tl.where(mask, u, 0.0), var, rv, cv


@jit_kernel(unspecialized=["eps1", "eps2", "d", "seed"])
def _adafactor_kernel(
    tensor_table,  # *i64 [n, ROW]: param/grad addresses, state (master) offset, numel, ...
    info,  # *i64 [n, INFO]
    tiles,  # *i64 [n_tiles]: tensor index << 32 | tile index in the tensor
    scalars,  # *f64 [n, 5]: one_minus_beta2_t, rho_t, lr, decay, step
    row_var,  # flat states (absent ones: any tensor)
    col_var,
    variance,
    sums,  # [n, 2] in the math type: squared norms of the param and of the update
    row_sum,  # shaped like row_var: row sums of g^2
    col_sum,  # shaped like col_var: column sums of g^2
    rv_sum,  # shaped like row_var: per matrix (at its first row), the sum of the old row_var
    g2_sum,  # shaped like row_var: per matrix, the sum of g^2
    row_new,  # shaped like row_var: the new row_var (written by the norm pass)
    col_new,  # shaped like col_var
    clip_coef,
    master,
    eps1: tl.int64,  # float_bits
    eps2: tl.int64,
    d: tl.int64,
    seed: tl.int64,
    PHASE: tl.constexpr,  # 0: sums, 1: norm, 2: update
    P_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    C_DTYPE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    MASTER: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    t, tile, numel, inf, R, C, b, r, c, offs, mask, first_col, first_row = _tile(tensor_table, info, tiles)
    row = tensor_table + t * 8  # ROW
    p_ptr = as_ptr(tl.load(row + 0), P_DTYPE, False)
    g_ptr = as_ptr(tl.load(row + 1), P_DTYPE, False)
    s_off = tl.load(row + 2)
    m_ptr = master + s_off
    g = load_grad(g_ptr, offs, mask, grad_multiplier(clip_coef, clip_coef, False, HAS_CLIP), C_DTYPE, HAS_CLIP)
    g = tl.where(mask, g, 0.0)
    row_off = tl.load(inf + 2)
    rows = row_off + b * R
    cols = tl.load(inf + 3) + b * C
    if PHASE == 0:
        p = tl.where(mask, load_param(p_ptr, m_ptr, offs, mask, C_DTYPE, MASTER), 0.0)
        tl.atomic_add(sums + t * 2, tl.sum(tl.sum(p * p, axis=1), axis=0))
        if row_off >= 0:  # torch.norm(grad, dim=-1).square_() and dim=-2
            g2 = g * g
            row_g2 = tl.sum(g2, axis=1)
            tl.atomic_add(row_sum + rows + r, row_g2, mask=r < R)
            tl.atomic_add(col_sum + cols + c, tl.sum(g2, axis=0), mask=c < C)
            tl.atomic_add(g2_sum + rows, tl.sum(row_g2, axis=0))
            if first_col:
                old = tl.load(row_var + rows + r, mask=r < R, other=0.0).to(C_DTYPE)
                tl.atomic_add(rv_sum + rows, tl.sum(old, axis=0))
    else:
        if MAXIMIZE:
            g = -g
        srow = scalars + t * 5  # _SCALARS
        beta = tl.load(srow + 0).to(C_DTYPE)
        e1 = hp(eps1, C_DTYPE)
        u, var, rv, cv = _update(
            g, inf, R, C, b, r, c, offs, mask, row_var, col_var, variance, row_sum, col_sum, rv_sum, g2_sum,
            row_new, col_new, beta, e1, PHASE == 2, S_DTYPE, C_DTYPE,
        )  # fmt: skip
        # the first tile of each row writes its new row_var, the first of each column col_var:
        # to scratch in the norm pass (every tile still reads the old factors), to the state in the last
        factored = row_off >= 0
        out_rows = row_new if PHASE == 1 else row_var
        out_cols = col_new if PHASE == 1 else col_var
        if factored:
            if first_col:
                tl.store(out_rows + rows + r, rv.to(out_rows.dtype.element_ty), mask=r < R)
            if first_row:
                tl.store(out_cols + cols + c, cv.to(out_cols.dtype.element_ty), mask=c < C)
        if PHASE == 1:
            tl.atomic_add(sums + t * 2 + 1, tl.sum(tl.sum(u * u, axis=1), axis=0))
        else:
            if not factored:
                tl.store(variance + tl.load(inf + 4) + offs, var.to(S_DTYPE), mask=mask)
            # alpha = max(eps2, RMS(param)) * rho_t; denom = max(1, RMS(update) / d), in float64
            root_n = tl.sqrt(numel.to(tl.float64))
            p_norm = ieee_sqrt(tl.load(sums + t * 2), C_DTYPE).to(tl.float64)  # param.norm(2).item()
            u_norm = ieee_sqrt(tl.load(sums + t * 2 + 1), C_DTYPE).to(tl.float64)
            alpha = tl.maximum(hp(eps2, tl.float64), p_norm / root_n) * tl.load(srow + 1)
            denom = tl.maximum(1.0, u_norm / (root_n * hp(d, tl.float64)))
            coef = (-alpha / denom).to(C_DTYPE)
            p = load_param(p_ptr, m_ptr, offs, mask, C_DTYPE, MASTER)
            if WEIGHT_DECAY:
                p = p * tl.load(srow + 3).to(C_DTYPE)  # param.mul_(1 - lr * weight_decay)
            p = tl.fma(coef, u, p)  # param.add_(update, alpha=-alpha / denom)
            if STOCHASTIC:  # random bits per (tensor, tile, element in the tile)
                n_tile: tl.constexpr = 16 * 128  # TR * TC
                store_param(
                    p_ptr, m_ptr, tl.reshape(p, (n_tile,)), tl.reshape(offs, (n_tile,)), tl.reshape(mask, (n_tile,)),
                    seed + s_off + tl.load(srow + 4).to(tl.int64), tile * n_tile, n_tile, P_DTYPE, MASTER, True,
                )  # fmt: skip
            else:
                store_param(p_ptr, m_ptr, p, offs, mask, seed, 0, 8, P_DTYPE, MASTER, False)


def factor_tables(shapes: list[tuple[int, ...]], row_offsets, col_offsets, var_offsets, device: torch.device):
    """The info and tile tables of a launch: ``shapes`` of its tensors, the offsets of their
    row_var, col_var and variance regions (-1 where absent)."""
    n = len(shapes)
    info = np.zeros((n, 8), dtype=np.int64)  # INFO
    tiles = []
    for j, shape in enumerate(shapes):
        numel = int(np.prod(shape, dtype=np.int64))
        if len(shape) > 1:
            R, C = shape[-2], shape[-1]
        else:
            R, C = -(-numel // TC), TC
        matrices = (numel // (R * C) if R * C else 0) if len(shape) > 1 else int(numel > 0)
        tiles_r, tiles_c = -(-R // TR), -(-C // TC)
        info[j] = (R, C, row_offsets[j], col_offsets[j], var_offsets[j], tiles_r, tiles_c, 0)
        tiles.append((j << 32) + np.arange(matrices * tiles_r * tiles_c, dtype=np.int64))
    tiles = np.concatenate(tiles) if tiles else np.zeros(0, dtype=np.int64)
    return to_device(info, device), to_device(tiles, device)


def _scratch(tables: Tables, dtype: torch.dtype, shapes) -> list[torch.Tensor]:
    """Zeroed buffers of ``shapes``: views into one buffer kept with the launch's tables (made on
    its first step, zeroed by one launch at every step); each view starts 16-byte aligned."""
    sizes = [-(-(a * b) // 4) * 4 for a, b in shapes]
    if tables.scratch is None or tables.scratch.dtype != dtype or tables.scratch.numel() != sum(sizes):
        tables.scratch = torch.empty(sum(sizes), dtype=dtype, device=tables.block_table.device)
    flat = tables.scratch.zero_()
    starts = np.cumsum([0, *sizes[:-1]])
    return [flat[int(start) : int(start) + a * b].view(a, b) for start, (a, b) in zip(starts, shapes)]


def adafactor_step(
    tables: Tables,
    factor: tuple,
    flat: dict[str, torch.Tensor],
    scalars: torch.Tensor,
    *,
    param_dtype: torch.dtype,
    eps1: float,
    eps2: float,
    d: float,
    weight_decay: float,
    maximize: bool,
    features: Features,
    num_warps: int = 8,
) -> None:
    """One Adafactor step over a segment (three launches): ``factor`` from ``factor_tables``,
    ``flat`` the state buffers present, ``scalars`` the per-tensor ``step_table``."""
    info, tiles = factor
    if tiles.numel() == 0:
        return
    n = tables.tensor_table.shape[0]
    any_t = tables.tensor_table
    row_var, col_var, variance = (flat.get(k, any_t) for k in ("row_var", "col_var", "variance"))
    c_dtype = torch.float64 if param_dtype == torch.float64 else torch.float32
    # the reductions' scratch, in the math type, zeroed at every step: per tensor two sums; per
    # row of the factors row_sum, rv_sum, g2_sum, row_new; per column col_sum, col_new
    n_rows = row_var.numel() if "row_var" in flat else 1
    n_cols = col_var.numel() if "col_var" in flat else 1
    sums, rows, cols = _scratch(tables, c_dtype, ((n, 2), (4, n_rows), (2, n_cols)))
    s_dtype = next((flat[k].dtype for k in ("row_var", "variance") if k in flat), param_dtype)
    args = (
        tables.tensor_table, info, tiles, scalars, row_var, col_var, variance, sums, rows[0], cols[0], rows[1],
        rows[2], rows[3], cols[1],
        *(any_t if x is None else x for x in (features.clip_coef, features.master)),
        float_bits(eps1), float_bits(eps2), float_bits(d), features.seed,
    )  # fmt: skip
    constexprs = {
        "P_DTYPE": triton_dtype(param_dtype),
        "S_DTYPE": triton_dtype(s_dtype),
        "C_DTYPE": compute_dtype(param_dtype),
        "WEIGHT_DECAY": weight_decay != 0,
        "MAXIMIZE": maximize,
        "HAS_CLIP": features.clip_coef is not None,
        "MASTER": features.master is not None,
        "STOCHASTIC": features.stochastic,
    }
    grid = (tiles.numel(),)
    for phase in range(3):
        launch(_adafactor_kernel, tables, args, {**constexprs, "PHASE": phase}, num_warps, grid=grid)


assert ROW == 8 and (TR, TC) == (16, 128) and INFO == 8 and _SCALARS == 5  # spelled out in the kernels
