"""Which 8-bit code to store Adam's states in, chosen by measurement.

``python -m benchmarks.quantization [--steps N] [--seeds K] [--out FILE.json]``

Every 8-bit state here is blockwise: one fp32 scale per block of ``QB`` consecutive elements (memory
order), so two states cost ``2 + 2 * 4 / QB`` bytes per param. Each scheme below is a pure-torch,
float32, eager reference of quantize / dequantize; ``torch.optim.AdamW`` trains a small MLP whose
first-layer gradients span five decades inside one weight row, and after every ``step()`` its
``exp_avg`` / ``exp_avg_sq`` (tensors of >= 4096 elements) are replaced by ``dequant(quant(x))``:
fake quantization, the states between steps being exactly what an 8-bit optimizer would hold.
The final held-out loss is compared with the fp32-state run of the same seed and data.

Schemes (``m``: exp_avg, signed; ``v``: exp_avg_sq, >= 0):

- ``linear``: m and v linear absmax, 127 levels each side (int8).
- ``sqrt``: m linear (-127..127); v stored as sqrt(v), 256 levels 0..255 (uint8).
- ``sqrt-both``: as ``sqrt``, m companded too: sign(m) sqrt|m| in -127..127.
- ``dynamic``: the dynamic (tree) map of Dettmers (arXiv 1511.04561, 2110.02861): sign bit, a run of
  zero bits giving the decade, an indicator bit, then linear fraction bits; signed map for m, unsigned
  for v, normalized by the block absmax, nearest entry of the sorted map.
- ``dynamic-sqrt`` (not in the first list of candidates): m as ``dynamic``; v stored as sqrt(v) in the
  unsigned dynamic map, so v's zero threshold (in |grad| terms) falls below m's.
- ``roots`` (added after the first run): m as sign(m) sqrt|m|, v as v ** (1/4), linear codes (127 and
  255 levels): companding for range without a map (loss -1.1 to -1.9% at QB 128 and 256, but drift
  6-9, as ``dynamic``, and a few elements with v back 0 and m not).
- ``e4m3``: m and v as float8_e4m3fn of x / (absmax / 448), torchao's fp8 state scheme.
- ``e4m3-sqrt``: m as ``e4m3``; v as e4m3 of sqrt(v) / (absmax(sqrt v) / 448).

Rounding is ``floor(y + 0.5)``, or ``floor(y + U[0, 1))`` with stochastic rounding (SR), applied to the
code domain (for the companded codes: unbiased in sqrt(v), not in v). Controls: ``fp32`` (no
quantization) and ``bf16`` (states rounded to bf16 each step: the size of a harmless perturbation).
torchao's ``AdamW8bit`` / ``AdamWFp8`` run on the same task when torchao is installed.

Table columns: final loss (mean over seeds), % vs fp32 (paired by seed: mean and worst), ``drift``
(distance of the final params from the fp32 run's, relative to the fp32 run's own travel), then one
round trip of the fp32 run's states at ``--snapshot-step``: fraction of nonzero v that comes back 0,
median / max relative error of v, fraction of elements with m back nonzero and v back 0 (their
update becomes m_hat / eps), median relative error of the update, and state bytes per param. The
best int8 and fp8 schemes at QB 256 (lowest worst-seed %, among schemes with no such element on
the snapshot) then run at QB 64 / 128 and with SR. The task is step-limited (its loss keeps falling
well past the default 600 steps), so a code that shrinks v a little can end slightly *below* fp32:
read small negative % as "no harm", and drift / the snapshot columns for fidelity.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from fused_optim.kernels._quant import dynamic_map as _dynamic_map

QMAX_E4M3 = 448.0
MIN_QUANT_NUMEL = 4096  # smaller tensors (biases) keep fp32 states, as bitsandbytes and torchao do
LR, WEIGHT_DECAY = 1e-3, 0.01
INT8_SCHEMES = ("linear", "sqrt", "sqrt-both", "dynamic", "dynamic-sqrt")
FP8_SCHEMES = ("e4m3", "e4m3-sqrt")


# --------------------------------------------------------------------------- task


class Task:
    """Regression onto a fixed random teacher (256 -> 256 -> 64, GELU), inputs scaled per feature.

    Inputs are ``z = x * s``, ``x ~ N(0, 1)``, ``s`` log-uniform over 1e-3 .. 1e2 (in random order):
    the gradient of a first-layer weight is proportional to its feature's scale, so it spans five
    decades within every block of consecutive elements of a row. The teacher sees the same ``z``, so
    the task is realizable. Student: 256 -> 512 -> 512 -> 64 with GELU (row lengths 256 and 512).
    Everything (scales, teacher, student init, batches, held-out set) follows from ``seed``.
    """

    def __init__(self, seed: int, batch: int = 128, eval_size: int = 1024, d_in: int = 256, d_out: int = 64):
        self.seed, self.batch_size, self.d_in = seed, batch, d_in
        g = torch.Generator().manual_seed(seed)
        self.scales = 10.0 ** torch.empty(d_in).uniform_(-3.0, 2.0, generator=g)
        self.t1 = torch.randn(256, d_in, generator=g) / math.sqrt(d_in)
        self.t2 = torch.randn(d_out, 256, generator=g) / math.sqrt(256)
        self.y_std = 1.0
        self.y_std = self._target(torch.randn(4096, d_in, generator=g) * self.scales).std().item()
        self.eval_x, self.eval_y = self._sample(eval_size, g)
        self.init_seed = seed * 7919 + 1

    def _target(self, z: Tensor) -> Tensor:
        """The teacher's output, normalized to unit std."""
        return (F.gelu(z @ self.t1.T) @ self.t2.T) / self.y_std

    def _sample(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` (input, target) pairs."""
        z = torch.randn(n, self.d_in, generator=g) * self.scales
        return z, self._target(z)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The training batch of ``step``: the same for every optimizer run of this seed."""
        return self._sample(self.batch_size, torch.Generator().manual_seed(self.seed * 1_000_003 + step))

    def model(self) -> torch.nn.Module:
        """A fresh student, identically initialized on every call (uniform +-1/sqrt(fan_in), zero bias)."""
        g = torch.Generator().manual_seed(self.init_seed)
        dims = [self.d_in, 512, 512, self.eval_y.shape[1]]
        layers: list[torch.nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            lin = torch.nn.Linear(a, b)
            with torch.no_grad():
                lin.weight.uniform_(-1.0, 1.0, generator=g).mul_(1.0 / math.sqrt(a))
                lin.bias.zero_()
            layers += [lin] if i == len(dims) - 2 else [lin, torch.nn.GELU()]
        return torch.nn.Sequential(*layers)

    def loss(self, model: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Mean squared error."""
        return F.mse_loss(model(x), y)


def task(seed: int) -> Task:
    """The benchmark's task for ``seed``."""
    return Task(seed)


# --------------------------------------------------------------------------- rounding


def round_code(y: Tensor, gen: torch.Generator | None) -> Tensor:
    """``floor(y + 0.5)``, or stochastic ``floor(y + U[0, 1))`` when ``gen`` is given."""
    if gen is None:
        return torch.floor(y + 0.5)
    return torch.floor(y + torch.rand(y.shape, generator=gen))


def e4m3_round(y: Tensor, gen: torch.Generator | None = None) -> Tensor:
    """``y`` (|y| <= 448) rounded onto the float8_e4m3fn grid, arithmetically (exact in e4m3fn).

    Spacing is ``2^(max(floor(log2|y|), -6) - 3)`` (3 mantissa bits; subnormals below 2^-6); ties go
    away from zero, where torch's cast goes to even.
    """
    a = y.abs()
    _, exp = torch.frexp(a)  # a = mant * 2^exp, mant in [0.5, 1): floor(log2 a) = exp - 1 exactly
    spacing = torch.ldexp(torch.ones_like(a), (exp - 1).clamp(min=-6) - 3)
    q = (round_code(a / spacing, gen) * spacing).clamp(max=QMAX_E4M3)
    return torch.copysign(q, y)


# --------------------------------------------------------------------------- codecs


def _compand(x: Tensor, sqrt: bool) -> Tensor:
    """sign(x) * sqrt(|x|) when ``sqrt``, else ``x``."""
    return torch.copysign(x.abs().sqrt(), x) if sqrt else x


def _expand(u: Tensor, sqrt: bool) -> Tensor:
    """Inverse of ``_compand``: sign(u) * u^2 when ``sqrt``."""
    return u * u.abs() if sqrt else u


def _block_scale(ub: Tensor, qmax: float) -> Tensor:
    """Per-block scale ``absmax / qmax`` of a (blocks, QB) view, as a column."""
    return ub.abs().amax(dim=1, keepdim=True) / qmax


def _divide(ub: Tensor, scale: Tensor) -> Tensor:
    """``ub / scale``, with 0 where the block's scale is 0."""
    return torch.where(scale > 0, ub / torch.where(scale > 0, scale, 1.0), 0.0)


@dataclass
class Quantized:
    """An 8-bit state: codes of the flat tensor's dtype-sized storage, and one fp32 scale per block."""

    codes: Tensor
    scale: Tensor


@dataclass
class LinearCodec:
    """Absmax linear code over ``-qmax .. qmax`` (or ``0 .. qmax``), optionally of sqrt-companded values."""

    qmax: int
    sqrt: bool = False

    def quant(self, x: Tensor, qb: int, gen: torch.Generator | None = None) -> Quantized:
        """Codes ``round(u / scale)``, ``u`` = (companded) ``x`` blocks, stored as int8 or uint8."""
        ub = _compand(x.reshape(-1, qb), self.sqrt)
        scale = _block_scale(ub, self.qmax)
        c = round_code(_divide(ub, scale), gen).clamp(-self.qmax, self.qmax)
        return Quantized(c.to(torch.uint8 if self.qmax > 127 else torch.int8), scale.squeeze(1))

    def dequant(self, q: Quantized) -> Tensor:
        """``expand(code * scale)``, flat."""
        return _expand(q.codes.float() * q.scale[:, None], self.sqrt).reshape(-1)


@dataclass
class RootCodec:
    """Absmax linear code of ``|x| ** (1 / 2**roots)`` (``roots`` square roots), sign kept."""

    qmax: int
    roots: int

    def quant(self, x: Tensor, qb: int, gen: torch.Generator | None = None) -> Quantized:
        ub = x.reshape(-1, qb)
        u = ub.abs()
        for _ in range(self.roots):
            u = u.sqrt()
        scale = _block_scale(u, self.qmax)
        c = round_code(_divide(u, scale), gen).clamp(0, self.qmax)
        return Quantized(torch.copysign(c, ub), scale.squeeze(1))

    def dequant(self, q: Quantized) -> Tensor:
        m = q.codes.abs() * q.scale[:, None]
        for _ in range(self.roots):
            m = m * m
        return torch.copysign(m, q.codes).reshape(-1)


def dynamic_map(signed: bool) -> Tensor:
    """The 256-entry dynamic (tree) map, sorted: the one the int8 kernels use (``kernels/_quant.py``)."""
    return _dynamic_map(signed).float()


@dataclass
class DynamicCodec:
    """Dynamic map code of ``u / absmax(u)``, ``u`` = x or sqrt-companded x: the nearest entry's index.

    With SR, one of the two entries bracketing it, with probabilities making the mean exact.
    """

    signed: bool
    sqrt: bool = False
    table: Tensor = field(init=False)

    def __post_init__(self):
        self.table = dynamic_map(self.signed)
        self.mids = (self.table[1:] + self.table[:-1]) / 2  # nearest entry = number of midpoints <= y

    def quant(self, x: Tensor, qb: int, gen: torch.Generator | None = None) -> Quantized:
        """uint8 index into the sorted map, chosen between the two entries bracketing ``x / absmax``."""
        ub = _compand(x.reshape(-1, qb), self.sqrt)
        scale = _block_scale(ub, 1.0)
        y = _divide(ub, scale).clamp(self.table[0], self.table[-1])
        if gen is None:  # ties go up, as floor(t + 0.5) does
            return Quantized(torch.searchsorted(self.mids, y, right=True).to(torch.uint8), scale.squeeze(1))
        hi = torch.searchsorted(self.table, y).clamp(1, 255)
        lo_v, hi_v = self.table[hi - 1], self.table[hi]
        step = round_code((y - lo_v) / (hi_v - lo_v), gen).clamp(0, 1)
        return Quantized((hi - 1 + step.long()).to(torch.uint8), scale.squeeze(1))

    def dequant(self, q: Quantized) -> Tensor:
        """``expand(map[code] * absmax)``, flat."""
        return _expand(self.table[q.codes.long()] * q.scale[:, None], self.sqrt).reshape(-1)


@dataclass
class E4M3Codec:
    """float8_e4m3fn of ``u / (absmax(u) / 448)``, ``u`` = x, or sqrt(|x|) with x's sign when ``sqrt``."""

    sqrt: bool = False

    def quant(self, x: Tensor, qb: int, gen: torch.Generator | None = None) -> Quantized:
        """Codes rounded arithmetically onto the e4m3 grid, then stored (exactly) as float8_e4m3fn."""
        ub = _compand(x.reshape(-1, qb), self.sqrt)
        scale = _block_scale(ub, QMAX_E4M3)
        return Quantized(e4m3_round(_divide(ub, scale), gen).to(torch.float8_e4m3fn), scale.squeeze(1))

    def dequant(self, q: Quantized) -> Tensor:
        """``expand(code * scale)``, flat."""
        return _expand(q.codes.float() * q.scale[:, None], self.sqrt).reshape(-1)


@dataclass
class Scheme:
    """A pair of codecs: one for exp_avg (m), one for exp_avg_sq (v)."""

    name: str
    m: object
    v: object

    def roundtrip(self, which: str, x: Tensor, qb: int, gen: torch.Generator | None = None) -> Tensor:
        """``dequant(quant(x))`` of state ``which`` ("m" or "v"), in x's shape."""
        codec = self.m if which == "m" else self.v
        return codec.dequant(codec.quant(x.reshape(-1), qb, gen)).view_as(x)


SCHEMES = {
    "linear": Scheme("linear", LinearCodec(127), LinearCodec(127)),
    "sqrt": Scheme("sqrt", LinearCodec(127), LinearCodec(255, sqrt=True)),
    "sqrt-both": Scheme("sqrt-both", LinearCodec(127, sqrt=True), LinearCodec(255, sqrt=True)),
    "dynamic": Scheme("dynamic", DynamicCodec(signed=True), DynamicCodec(signed=False)),
    "dynamic-sqrt": Scheme("dynamic-sqrt", DynamicCodec(signed=True), DynamicCodec(signed=False, sqrt=True)),
    "roots": Scheme("roots", RootCodec(127, 1), RootCodec(255, 2)),
    "e4m3": Scheme("e4m3", E4M3Codec(), E4M3Codec()),
    "e4m3-sqrt": Scheme("e4m3-sqrt", E4M3Codec(), E4M3Codec(sqrt=True)),
}


def bytes_per_param(scheme: str, qb: int) -> float:
    """Bytes of the two states per param (the small fp32 tensors left aside)."""
    if scheme == "fp32":
        return 8.0
    if scheme == "bf16":
        return 4.0
    return 2.0 + 2.0 * 4.0 / qb


# --------------------------------------------------------------------------- training


@dataclass
class Run:
    """One training run's configuration (``scheme`` "fp32", "bf16", a key of SCHEMES, or "torchao ...")."""

    scheme: str
    qb: int = 256
    sr: bool = False
    seed: int = 0


def fake_quantize(opt: torch.optim.Optimizer, run: Run, gen: torch.Generator | None) -> None:
    """Replace every large param's exp_avg / exp_avg_sq in place by its round trip through ``run``'s code."""
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if p.numel() < MIN_QUANT_NUMEL or p.numel() % run.qb or "exp_avg" not in state:
                continue
            for key, which in (("exp_avg", "m"), ("exp_avg_sq", "v")):
                x = state[key]
                if run.scheme == "bf16":
                    x.copy_(x.to(torch.bfloat16))
                else:
                    x.copy_(SCHEMES[run.scheme].roundtrip(which, x, run.qb, gen))


def make_optimizer(run: Run, params) -> torch.optim.Optimizer:
    """torch.optim.AdamW, or torchao's AdamW8bit / AdamWFp8 for "torchao 8bit" / "torchao fp8"."""
    if run.scheme.startswith("torchao"):
        from torchao.optim import AdamW8bit, AdamWFp8

        cls = AdamW8bit if run.scheme == "torchao 8bit" else AdamWFp8
        return cls(params, lr=LR, weight_decay=WEIGHT_DECAY, block_size=run.qb)
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)


@torch.no_grad()
def eval_loss(t: Task, model: torch.nn.Module) -> float:
    """Loss on the seed's fixed held-out batch."""
    return t.loss(model, t.eval_x, t.eval_y).item()


def train(run: Run, steps: int, snapshot_at: int | None = None) -> dict:
    """Train ``run`` for ``steps``; final loss = mean held-out loss over the last 5% of steps.

    With ``snapshot_at``, also returns clones of the large params' (m, v) after that step.
    """
    t = task(run.seed)
    model = t.model()
    opt = make_optimizer(run, model.parameters())
    quantized = run.scheme in SCHEMES or run.scheme == "bf16"
    gen = torch.Generator().manual_seed(run.seed + 4242) if run.sr else None
    tail_from = steps - max(1, steps // 20)
    curve, tail, snapshot, start = [], [], None, time.perf_counter()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        t.loss(model, *t.batch(step)).backward()
        opt.step()
        if quantized:
            fake_quantize(opt, run, gen)
        if step + 1 == snapshot_at:
            snapshot = [(s["exp_avg"].clone(), s["exp_avg_sq"].clone(), step + 1) for s in _large_states(opt)]
        if step >= tail_from or step % max(1, steps // 20) == 0:
            loss = eval_loss(t, model)
            curve.append((step, loss))
            tail += [loss] if step >= tail_from else []
            if not math.isfinite(loss):
                tail = [math.inf]
                break
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    seconds = time.perf_counter() - start
    return {"final": statistics.fmean(tail), "curve": curve, "seconds": seconds, "snapshot": snapshot, "params": params}


def _large_states(opt: torch.optim.Optimizer) -> list[dict]:
    """The state dicts of params with at least MIN_QUANT_NUMEL elements."""
    return [opt.state[p] for g in opt.param_groups for p in g["params"] if p.numel() >= MIN_QUANT_NUMEL]


# --------------------------------------------------------------------------- checks on snapshots and codes


def snapshot_errors(snapshot: list[tuple[Tensor, Tensor, int]], roundtrip_v, roundtrip_m) -> dict:
    """Single round-trip errors of real Adam states ``(m, v, step)``.

    v: max / median relative error over nonzero elements, fraction of nonzero v that comes back 0;
    ``m_nz_v0_frac``: fraction of all elements whose m comes back nonzero while their v comes back 0
    (their update is then m_hat / eps); ``upd_relerr_median``: median relative error of the update
    m_hat / (sqrt(v_hat) + eps), as torch's AdamW forms it at that step.
    """
    rel, upd, zero, live_n, blow = [], [], 0, 0, 0
    for m, v, step in snapshot:
        vq, mq = roundtrip_v(v), roundtrip_m(m)
        live = v > 0
        rel.append(((vq - v).abs() / v)[live])
        zero += int((live & (vq == 0)).sum())
        live_n += int(live.sum())
        blow += int(((mq != 0) & (vq == 0)).sum())
        bc1, bc2 = 1 - 0.9**step, math.sqrt(1 - 0.999**step)
        u, uq = (m / bc1) / (v.sqrt() / bc2 + 1e-8), (mq / bc1) / (vq.sqrt() / bc2 + 1e-8)
        upd.append(((uq - u).abs() / u.abs())[m != 0])
    rel_all, upd_all = torch.cat(rel), torch.cat(upd)
    return {
        "v_relerr_max": rel_all.max().item(),
        "v_relerr_median": rel_all.median().item(),
        "v_zero_frac": zero / max(live_n, 1),
        "m_nz_v0_frac": blow / sum(v.numel() for _, v, _ in snapshot),
        "upd_relerr_median": upd_all.median().item(),
    }


def scheme_snapshot_errors(snapshot, scheme: str, qb: int) -> dict:
    """``snapshot_errors`` of one of SCHEMES (or "bf16") at block size ``qb``."""
    if scheme == "bf16":
        rt = lambda x: x.to(torch.bfloat16).float()  # noqa: E731
        return snapshot_errors(snapshot, rt, rt)
    s = SCHEMES[scheme]
    return snapshot_errors(snapshot, lambda x: s.roundtrip("v", x, qb), lambda x: s.roundtrip("m", x, qb))


def torchao_snapshot_errors(snapshot, kind: str, qb: int) -> dict | None:
    """``snapshot_errors`` through torchao's own state subclasses (their copy_ quantizes), if importable."""
    try:
        if kind == "8bit":
            from torchao.optim.subclass_8bit import OptimState8bit as State

            make = lambda x, signed: State.zeros(x.shape, signed, qb)  # noqa: E731
        else:
            from torchao.optim.subclass_fp8 import OptimStateFp8 as State

            make = lambda x, signed: State.zeros(x.shape, qb)  # noqa: E731
    except Exception:
        return None

    def rt(signed):
        def go(x):
            s = make(x, signed)
            s.copy_(x)
            return s.dequantize()

        return go

    return snapshot_errors(snapshot, rt(False), rt(True))


def check_e4m3_rounding(n: int = 200_000) -> dict:
    """Compare ``e4m3_round`` with torch's cast over magnitudes 2^-12 .. 448: mismatches off exact ties."""
    g = torch.Generator().manual_seed(0)
    mag = torch.exp2(torch.empty(n).uniform_(-12.0, math.log2(QMAX_E4M3), generator=g))
    x = torch.where(torch.rand(n, generator=g) < 0.5, -mag, mag)
    grid = torch.exp2(torch.arange(-9.0, 9.0))  # every e4m3 spacing; ties are odd multiples of half of one
    ties = x.abs() / grid[:, None]
    ties = ((ties - ties.floor()) == 0.5).any(0)
    ours, torchs = e4m3_round(x), x.to(torch.float8_e4m3fn).float()
    exact = torch.equal(ours.to(torch.float8_e4m3fn).float(), ours)
    halves = torch.arange(1, 8.0) * 2.0**-10 * 2 + 2.0**-10  # exact ties in the subnormal range
    tie_diffs = int((e4m3_round(halves) != halves.to(torch.float8_e4m3fn).float()).sum())
    return {
        "values": n,
        "mismatches_off_ties": int(((ours != torchs) & ~ties).sum()),
        "ties_in_sample": int(ties.sum()),
        "exact_in_e4m3fn": exact,
        "constructed_ties_differing": f"{tie_diffs}/{halves.numel()}",
    }


def check_sr_unbiased(scheme: str, qb: int = 256, draws: int = 2000, n: int = 2048, min_count: int = 50) -> dict:
    """SR round trips of the stored quantity, ``draws`` times: is their mean the value?

    Stored quantity: m, and v or sqrt(v) (the one the code is linear / floating in). Per element,
    ``z`` = (mean - value) / standard error, over elements whose two outcomes (lower and upper code)
    each occur >= ``min_count`` times (the normal approximation holds): ``max_abs_z`` should stay below
    ~5 and ``mean_z`` within ~3 / sqrt(elements) of 0. ``median_rel_bias``: of the value itself, which
    sqrt codes bias (E[(u + e)^2] = u^2 + Var e: upward, most for values below one code step).
    """
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, generator=g) * 10.0 ** torch.empty(n).uniform_(-3.0, 2.0, generator=g)
    s, out = SCHEMES[scheme], {}
    for which, ref in (("m", x), ("v", x * x)):
        rt = s.roundtrip(which, ref.repeat(draws), qb, torch.Generator().manual_seed(2)).view(draws, n)
        sqrt_code = getattr(s.m if which == "m" else s.v, "sqrt", False)
        stored, truth = _compand(rt, sqrt_code), _compand(ref, sqrt_code)
        low = (stored == stored.min(0).values).sum(0)
        normal = (low >= min_count) & (draws - low >= min_count)
        z = ((stored.mean(0) - truth) / (stored.std(0) / math.sqrt(draws)))[normal]
        out[which] = {
            "elements": int(normal.sum()),
            "max_abs_z": z.abs().max().item(),
            "mean_z": z.mean().item(),
            "median_rel_bias": ((rt.mean(0) - ref) / ref.abs()).median().item(),
        }
    return out


# --------------------------------------------------------------------------- driver


def _pct(final: float, ref: float) -> float:
    """``final / ref - 1`` in percent (inf when the run diverged)."""
    return 100.0 * (final / ref - 1.0) if math.isfinite(final) else math.inf


def _drift(params: Tensor, ref: dict) -> float:
    """Distance of the final params to the fp32 run's, relative to how far the fp32 run moved."""
    d = ((params - ref["params"]).norm() / (ref["params"] - ref["init"]).norm()).item()
    return d if math.isfinite(d) else math.inf


def reference_runs(seeds: list[int], steps: int, snapshot_at: int, log) -> tuple[dict, list[dict], list]:
    """The fp32-state runs: per seed final loss, initial and final params; seed 0's state snapshot."""
    fp32, recs, snapshot = {}, [], None
    for seed in seeds:
        res = train(Run("fp32", seed=seed), steps, snapshot_at=snapshot_at if seed == 0 else None)
        init = torch.cat([p.detach().flatten() for p in task(seed).model().parameters()])
        fp32[seed] = {"final": res["final"], "params": res["params"], "init": init}
        snapshot = snapshot or res["snapshot"]
        log(
            f"  seed={seed}: held-out loss {res['curve'][0][1]:.4f} after step 1 -> {res['final']:.4f}"
            f" ({res['seconds']:.1f}s)"
        )
        recs.append(
            {
                **Run("fp32", seed=seed).__dict__,
                "final": res["final"],
                "pct": 0.0,
                "drift": 0.0,
                "seconds": res["seconds"],
                "curve": res["curve"],
            }
        )
    return fp32, recs, snapshot


def run_one(r: Run, steps: int, fp32: dict, log) -> list[dict]:
    """Train ``r``; its record with % vs the fp32 run of the same seed and drift from it ([] if it fails)."""
    try:
        res = train(r, steps)
    except Exception as exc:  # torchao missing, or torch.compile unusable here
        log(f"  {r.scheme}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
        return []
    ref = fp32[r.seed]
    rec = {
        **r.__dict__,
        "final": res["final"],
        "pct": _pct(res["final"], ref["final"]),
        "drift": _drift(res["params"], ref),
        "seconds": res["seconds"],
        "curve": res["curve"],
    }
    log(
        f"  {r.scheme:>12} QB={r.qb:<3} SR={int(r.sr)} seed={r.seed}: {res['final']:.4f} ({rec['pct']:+.2f}%,"
        f" drift {rec['drift']:.3f}) {res['seconds']:.1f}s"
    )
    return [rec]


def summarize(recs: list[dict]) -> dict:
    """Group runs by (scheme, QB, SR): mean loss, mean and worst % vs fp32, mean drift."""
    groups: dict[tuple, list[dict]] = {}
    for r in recs:
        groups.setdefault((r["scheme"], r["qb"], r["sr"]), []).append(r)
    return {
        k: {
            "seeds": len(v),
            "final": statistics.fmean(r["final"] for r in v),
            "pct_mean": statistics.fmean(r["pct"] for r in v),
            "pct_worst": max(r["pct"] for r in v),
            "drift": statistics.fmean(r["drift"] for r in v),
        }
        for k, v in groups.items()
    }


def best_of(summary: dict, errors: dict, names: tuple[str, ...], qb: int) -> str:
    """The scheme among ``names`` with the lowest worst-seed % vs fp32 at block size ``qb`` (no SR).

    Only schemes under which no element of the snapshot has m back nonzero and v back 0 (an update
    of m_hat / eps) compete, unless there are none.
    """
    safe = [n for n in names if errors[(n, qb)]["m_nz_v0_frac"] == 0] or list(names)
    return min(safe, key=lambda n: summary[(n, qb, False)]["pct_worst"])


def _fmt(x, spec: str = ".2f") -> str:
    """A number for the table; '-' when missing, 'diverged' when infinite."""
    if x is None:
        return "-"
    return "diverged" if isinstance(x, float) and math.isinf(x) else format(x, spec)


def table(summary: dict, errors: dict) -> str:
    """The markdown table: training outcome, then single round-trip errors on the step-N snapshot."""
    head = (
        "| scheme | QB | SR | seeds | final loss | % vs fp32 mean | % worst | drift | v->0 frac | v relerr med |"
        " v relerr max | m!=0 & v->0 | update relerr med | bytes/param |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (scheme, qb, sr), s in summary.items():
        e = errors.get((scheme, qb)) or {}
        cells = [scheme, "-" if scheme in ("fp32", "bf16") else str(qb), "on" if sr else "off", str(s["seeds"])]
        cells += [_fmt(s["final"], ".4f"), _fmt(s["pct_mean"], "+.2f"), _fmt(s["pct_worst"], "+.2f")]
        cells += [_fmt(s["drift"], ".3f")]
        keys = ("v_zero_frac", "v_relerr_median", "v_relerr_max", "m_nz_v0_frac", "upd_relerr_median")
        cells += [_fmt(e.get(k), ".1e") for k in keys]
        cells += [f"{bytes_per_param(scheme.split()[0], qb):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the main schemes and of the SR runs")
    p.add_argument("--sweep-seeds", type=int, default=1, help="seeds of the QB 64 / 128 runs")
    p.add_argument("--snapshot-step", type=int, default=200, help="step of the fp32 run whose states are probed")
    p.add_argument("--no-torchao", action="store_true", help="skip torchao's AdamW8bit / AdamWFp8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write everything as JSON here")
    return p.parse_args(argv)


def _finite(obj):
    """``obj`` with non-finite floats as None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def snapshot_table(snapshot: list, summary: dict, errors: dict) -> dict:
    """Round-trip errors on the snapshot for every (scheme, QB) trained (torchao's through its own code)."""
    for s, qb, _ in summary:
        if (s, qb) not in errors and (s in SCHEMES or s == "bf16"):
            errors[(s, qb)] = scheme_snapshot_errors(snapshot, s, qb)
        elif (s, qb) not in errors and s.startswith("torchao"):
            errors[(s, qb)] = torchao_snapshot_errors(snapshot, s.split()[1], qb)
    return errors


def main(argv=None) -> int:
    """Run every measurement, print the table, optionally write JSON."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start, log = time.perf_counter(), lambda s: print(s, flush=True)
    seeds = list(range(args.seeds))
    checks = {"e4m3_rounding": check_e4m3_rounding()}
    log(f"e4m3 rounding vs torch cast: {checks['e4m3_rounding']}")

    log("fp32 reference runs")
    fp32, recs, snapshot = reference_runs(seeds, args.steps, min(args.snapshot_step, args.steps), log)
    log("main schemes, QB=256")
    for r in [Run(s, 256, False, seed) for seed in seeds for s in ("bf16", *INT8_SCHEMES, *FP8_SCHEMES)]:
        recs += run_one(r, args.steps, fp32, log)
    summary = summarize(recs)
    errors = snapshot_table(snapshot, summary, {})
    best = {"int8": best_of(summary, errors, INT8_SCHEMES, 256), "fp8": best_of(summary, errors, FP8_SCHEMES, 256)}
    log(f"best at QB=256: {best}; block sizes, stochastic rounding, torchao")
    extra = [Run(b, qb, False, seed) for b in best.values() for qb in (64, 128) for seed in seeds[: args.sweep_seeds]]
    extra += [Run(b, 256, True, seed) for b in best.values() for seed in seeds]
    extra += [] if args.no_torchao else [Run(f"torchao {k}", 256, False, 0) for k in ("8bit", "fp8")]
    for r in extra:
        recs += run_one(r, args.steps, fp32, log)
    summary = summarize(recs)
    errors = snapshot_table(snapshot, summary, errors)
    checks["sr_unbiased"] = {b: check_sr_unbiased(b) for b in best.values()}
    log(f"SR unbiasedness: {checks['sr_unbiased']}")

    elapsed = time.perf_counter() - start
    print(f"\n{table(summary, errors)}\n")
    print(
        f"steps={args.steps} seeds={args.seeds} threads={args.threads} snapshot at step {args.snapshot_step};"
        f" total {elapsed:.0f}s"
    )
    if args.out:
        write_json(args, elapsed, best, checks, summary, errors, recs)
    return 0


def write_json(args, elapsed, best, checks, summary, errors, recs) -> None:
    """Everything measured, as strict JSON (non-finite numbers as null)."""
    doc = {
        "args": vars(args),
        "torch": torch.__version__,
        "seconds": elapsed,
        "best": best,
        "checks": checks,
        "summary": [{"scheme": k[0], "qb": k[1], "sr": k[2], **v} for k, v in summary.items()],
        "snapshot_errors": [{"scheme": k[0], "qb": k[1], **(v or {})} for k, v in errors.items()],
        "runs": recs,
    }
    with open(args.out, "w") as f:
        json.dump(_finite(doc), f, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
