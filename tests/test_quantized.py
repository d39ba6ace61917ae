"""8-bit states (``state_dtype=torch.int8`` / ``torch.float8_e4m3fn``): the codes, the fused update
against eager references of the same quantization, checkpoints, stochastic rounding, memory, and
the refusals.

The references here are written from the scheme as README and ``kernels/_quant.py`` document it,
with their own arithmetic (``frexp`` for the fp8 grid), in float32 and float64."""

import copy
import io
import math

import pytest
import torch

import fused_optim
from fused_optim.kernels._quant import CODES, QB, SQRT

DTYPES = [torch.int8, torch.float8_e4m3fn]
QUANTIZED_SHAPES = [(16, 2 * QB), (12, 3 * QB)]  # rows of whole blocks, 4,096+ elements
SMALL_SHAPES = [(7, 13), (100,)]  # keep fp32 states
SHAPES = QUANTIZED_SHAPES + SMALL_SHAPES

# Every algorithm with moment states, with the options that make it keep all of them.
CLASSES = {
    "SGD": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    "Adagrad": {"lr": 0.05, "initial_accumulator_value": 0.1, "lr_decay": 0.01},
    "Adadelta": {"lr": 0.5, "rho": 0.8},
    "RMSprop": {"lr": 0.01, "momentum": 0.5, "centered": True},
    "Adam": {"lr": 0.01, "amsgrad": True, "weight_decay": 0.01},
    "AdamW": {"lr": 0.01, "betas": (0.8, 0.99), "maximize": True},
    "Adamax": {"lr": 0.01},
    "NAdam": {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.01},
    "RAdam": {"lr": 0.01},
    "Lion": {"lr": 1e-3, "weight_decay": 0.1},
    "LAMB": {"lr": 0.01, "weight_decay": 0.01},
    "LARS": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
    "AdEMAMix": {"lr": 0.01, "t_alpha_beta3": 4},
    "StableAdamW": {"lr": 0.01, "weight_decay": 0.01},
    "ScheduleFreeAdamW": {"lr": 0.01, "warmup_steps": 2},
    "Muon": {"lr": 0.02, "momentum": 0.9, "nesterov": True},
}
TORCH_CLASSES = ["SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW", "Adamax", "NAdam", "RAdam"]


def _shapes(name: str):
    return [s for s in SHAPES if len(s) == 2] if name == "Muon" else SHAPES  # Muon: matrices only


def _tensors(shapes, seed: int, dtype=torch.float32, spread: bool = True):
    """Random tensors whose magnitudes vary over five orders within each row (and so within a block)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        if spread and len(shape) == 2:
            x = x * torch.logspace(-4, 1, shape[-1], dtype=torch.float64)
        out.append(x.to(dtype))
    return out


# --- the reference quantization ---------------------------------------------------------------
def dynamic_map(signed: bool, dtype=torch.float64) -> torch.Tensor:
    """The dynamic map as documented: 0 and 1, then per decade e = 0..6, 2 ** (bits - 1 - e) values
    at the centres of equal steps over (0.1, 1] * 10 ** -e (bits: 7 after a sign bit, or 8), with
    both signs for the signed map; sorted."""
    bits = 7 if signed else 8
    values = [0.0, 1.0]
    for e in range(7):
        n = 2 ** (bits - 1 - e)
        magnitudes = [(0.1 + 0.9 * (k + 0.5) / n) * 10.0**-e for k in range(n)]
        values += magnitudes + ([-m for m in magnitudes] if signed else [])
    return torch.tensor(sorted(values), dtype=torch.float64).to(dtype)


def neighbours(y: torch.Tensor, code: str, dtype: torch.dtype):
    """The code values (in code units) just below and just above ``y``: float8_e4m3fn's grid (3
    mantissa bits, subnormal below 2^-6; y >= 0), or the dynamic map's values around y."""
    if dtype == torch.float8_e4m3fn:
        _, e = torch.frexp(y)  # y = m * 2^e, m in [0.5, 1)
        spacing = torch.exp2((e - 1).clamp(min=-6).to(y.dtype) - 3)
        lo = torch.floor(y / spacing) * spacing
        return lo, lo + spacing
    table = dynamic_map(code != SQRT, y.dtype)
    below = (table[None, :] <= y.reshape(-1, 1)).sum(1).reshape(y.shape)  # map values <= y
    index = (below - 1).clamp(0, 254)
    return table[index], table[index + 1]


def ref_quantize(x: torch.Tensor, code: str, dtype: torch.dtype):
    """(code values in code units, with sign; scales) of ``x`` (contiguous, numel a multiple of QB),
    nearest code, ties away from zero, in x's own precision."""
    x = x.reshape(-1, QB)
    u = x.abs()
    if code == SQRT:
        u = u.double().sqrt().to(x.dtype)  # correctly rounded (torch's fp32 sqrt on CPU may be 1 ulp off)
    scale = u.amax(1) / (448.0 if dtype == torch.float8_e4m3fn else 1.0)
    y = torch.where(scale[:, None] > 0, u / scale[:, None], torch.zeros_like(u))
    if dtype == torch.int8:
        y = torch.where(x < 0, -y, y)  # the signed map holds the sign
    lo, hi = neighbours(y, code, dtype)
    value = torch.where((y - lo) >= (hi - y), hi, lo)
    if dtype == torch.float8_e4m3fn:
        value = torch.where(x < 0, -value, value).clamp(-448.0, 448.0)
    return value, scale


def ref_dequantize(value: torch.Tensor, scale: torch.Tensor, code: str, shape) -> torch.Tensor:
    x = value * scale[:, None]
    return (x * x if code == SQRT else x).reshape(shape)


def stored(codes: torch.Tensor, code: str) -> torch.Tensor:
    """The code values (in code units, fp32) our codes stand for: int8 code c is map[c + 128]."""
    if codes.dtype == torch.float8_e4m3fn:
        return codes.float().reshape(-1, QB)
    return dynamic_map(code != SQRT, torch.float32)[codes.long().reshape(-1, QB) + 128]


def _is_quantized(shape) -> bool:
    return shape in QUANTIZED_SHAPES


# --- the codes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("code", ["signed", SQRT])
def test_quantize_round_trip_error_is_half_a_code(dtype, code):
    """Host quantization (used on load, for initial values, for export) equals the fp32 reference
    bit for bit, and against float64 every element is within half a code step of its value (in
    code units of its block, of the companded magnitude the code holds): what nearest rounding allows.
    A block of zeros stays zero; a NaN makes its whole block non-finite."""
    from fused_optim._quant import dequantize, quantize_into

    x64 = _tensors([(16, 2 * QB)], 0)[0]
    x64 = x64.abs() if code == SQRT else x64
    x64[3] = 0.0
    x = x64.float()
    codes, scales = torch.empty(x.shape, dtype=dtype), torch.empty(16, 2)
    quantize_into(codes, scales, x, code)
    value, scale = ref_quantize(x, code, dtype)
    assert torch.equal(stored(codes, code), value) and torch.equal(scales.reshape(-1), scale)
    back = dequantize(codes, scales, code)
    assert torch.equal(back, ref_dequantize(value, scale, code, x.shape))
    assert torch.equal(back[3], torch.zeros_like(back[3]))
    power = 0.5 if code == SQRT else 1.0  # what the code rounds: the value, or its square root
    signed = x64.sign() if dtype == torch.int8 else torch.ones_like(x64)  # the int8 map holds the sign
    units = scale.double()[:, None].clamp(min=1e-300)
    y64 = (signed * x64.abs() ** power).reshape(-1, QB) / units
    y_back = (signed * back.double().abs() ** power).reshape(-1, QB) / units
    lo, hi = neighbours(y64, code, dtype)
    below = (lo - y64).clamp(min=0)  # a negative absmax, below the signed map's smallest value
    assert ((y_back - y64).abs() <= (hi - lo) / 2 * (1 + 1e-5) + below + 1e-6).all()
    x[5, 7] = math.nan
    quantize_into(codes, scales, x, code)
    back = dequantize(codes, scales, code)
    assert not back[5, :QB].isfinite().any() and back[5, QB:].isfinite().all() and back[4].isfinite().all()


def _step_both(ours8, ours32, params8, params32, grads) -> None:
    for p, q, g in zip(params8, params32, grads):
        p.grad, q.grad = g.clone(), g.clone()
    for opt in (ours8, ours32):
        if hasattr(opt, "train"):  # Schedule-Free steps in train mode
            opt.train()
        opt.step()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CLASSES)
def test_fused_8bit_update_is_the_fp32_update_quantized(name, dtype):
    """Over several steps, each started (teacher-forced) from our dequantized 8-bit states: the
    8-bit kernel's params are bit-equal to those of the fp32-state kernel run on the same values
    (loaded through ``dequantized_state_dict``), and its codes and scales are bit-equal to the
    reference quantization of that kernel's new fp32 states. Small params keep fp32 states, equal
    to the fp32 run's."""
    cls, kwargs, shapes = getattr(fused_optim, name), CLASSES[name], _shapes(name)
    init = _tensors(shapes, 1)
    params8 = [torch.nn.Parameter(t.clone()) for t in init]
    params32 = [torch.nn.Parameter(t.clone()) for t in init]
    ours8 = cls(params8, state_dtype=dtype, **kwargs)
    ours32 = cls(params32, **kwargs)
    for step in range(4):
        if step:
            ours32.load_state_dict(ours8.dequantized_state_dict())
        _step_both(ours8, ours32, params8, params32, _tensors(shapes, 10 + step))
        for i, (p, q) in enumerate(zip(params8, params32)):
            assert torch.equal(p, q), f"param {i} after step {step + 1}"
            mine, fp32 = ours8.state[p], ours32.state[q]
            for key, value in fp32.items():
                if not (_is_quantized(p.shape) and key in CODES):
                    same = mine[key] is None if value is None else torch.equal(mine[key], value)
                    assert same, f"{key} of param {i} after step {step + 1}"
                    continue
                expected, scale = ref_quantize(value, CODES[key], dtype)
                where = f"{key} of param {i} after step {step + 1}"
                assert mine[f"{key}_codes"].dtype == dtype and key not in mine, where
                assert torch.equal(stored(mine[f"{key}_codes"], CODES[key]), expected), where
                assert torch.equal(mine[f"{key}_scales"].reshape(-1), scale), where


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", TORCH_CLASSES)
def test_against_torch_and_float64_quantization(name, dtype):
    """The 8-bit update against torch.optim in float64 quantizing its states with the same scheme
    in float64, each step started from our dequantized states: params agree to fp32 accuracy, and
    our codes stand for the float64 reference's code values (to the fp32 rounding of the map),
    except where the float64 value lies within 1e-4 of the midpoint between two codes (fp32
    rounding may then pick the other neighbour), there one code away."""
    shapes = SHAPES
    init = _tensors(shapes, 2)
    params = [torch.nn.Parameter(t.clone()) for t in init]
    ref_params = [torch.nn.Parameter(t.double()) for t in init]
    ours = getattr(fused_optim, name)(params, state_dtype=dtype, **CLASSES[name])
    ref = getattr(torch.optim, name)(ref_params, foreach=False, **CLASSES[name])
    for step in range(3):
        if step:  # the reference starts from our dequantized states, in float64
            state = ours.dequantized_state_dict()
            state["state"] = {k: {n: v.double() for n, v in s.items()} for k, s in state["state"].items()}
            ref.load_state_dict(state)
            for p, q in zip(params, ref_params):
                q.data.copy_(p.double())
        grads = _tensors(shapes, 20 + step)
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g.clone(), g.double()
        ours.step()
        ref.step()
        for i, (p, q) in enumerate(zip(params, ref_params)):
            torch.testing.assert_close(p.double(), q.detach(), rtol=1e-5, atol=1e-6 * q.abs().max().item())
            if not _is_quantized(p.shape):
                continue
            for key, value in ref.state[q].items():
                if key not in CODES:
                    continue
                code, where = CODES[key], f"{key} of param {i} after step {step + 1}"
                expected, scale64 = ref_quantize(value, code, dtype)
                mine = stored(ours.state[p][f"{key}_codes"], code).double()
                torch.testing.assert_close(
                    ours.state[p][f"{key}_scales"].reshape(-1).double(), scale64, rtol=1e-5, atol=0
                )
                u = value.abs().sqrt() if code == SQRT else value.abs()
                y = (torch.where(value < 0, -u, u) if dtype == torch.int8 else u).reshape(-1, QB)
                lo, hi = neighbours(y / scale64[:, None].clamp(min=1e-300), code, dtype)
                middle = ((y / scale64[:, None].clamp(min=1e-300) - lo) / (hi - lo) - 0.5).abs() < 1e-4
                off = (mine - expected).abs()
                assert (off[~middle] <= 1e-6 * expected.abs()[~middle]).all(), where
                assert (off[middle] <= (hi - lo)[middle] * 1.001).all(), where


# --- stochastic rounding ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stochastic_rounding_is_unbiased(dtype):
    """With ``stochastic_state_rounding``, 512 rows holding the same values (so the same block
    scales) are 512 independent roundings between an element's two neighbouring values, ``gap``
    apart: their mean is the exact value within 5 * gap / (2 sqrt(512)) (Hoeffding: a miss has
    probability below 1e-5 per element) plus the 16-bit resolution of the random threshold, for a
    signed state (the momentum) and for a sqrt state (unbiased in the state itself, not its root).
    (A block's absmax, when negative, is beyond the signed int8 map, whose smallest value is
    -0.9930: it is stored as that, as bitsandbytes' map does.)"""
    rows = 512
    row = _tensors([(1, QB)], 3)[0]
    grad = row.expand(rows, QB).clone()
    for name, kwargs, key in (("SGD", {"lr": 0.1, "momentum": 0.9}, "momentum_buffer"), ("Adagrad", {}, "sum")):
        p = torch.nn.Parameter(torch.zeros(rows, QB))
        opt = getattr(fused_optim, name)([p], state_dtype=dtype, stochastic_state_rounding=True, **kwargs)
        p.grad = grad.clone()
        opt.step()
        exact = row[0] if key == "momentum_buffer" else row[0] ** 2  # first step: buf = grad; sum = grad^2
        values = opt.dequantized_state_dict()["state"][0][key]
        assert len({tuple(values[i].tolist()) for i in range(8)}) > 1, "the rows should be different draws"
        scale = opt.state[p][f"{key}_scales"][0, 0].double()
        power = 2 if CODES[key] == SQRT else 1
        u = exact.double().abs() ** (1 / power)
        y = torch.where(exact < 0, -u, u) if dtype == torch.int8 else u
        lo, hi = neighbours(y / scale, CODES[key], dtype)
        gap = ((hi * scale).abs() ** power - (lo * scale).abs() ** power).abs()
        bound = 5 * gap / (2 * math.sqrt(rows)) + gap / 65536
        inside = y / scale >= lo  # not a negative absmax, which the signed map holds as its smallest value
        assert inside.sum() >= QB - 1
        assert ((values.double().mean(0) - exact.double()).abs() <= bound)[inside].all(), key


# --- checkpoints -------------------------------------------------------------------------------
def _trained(dtype, steps=3, cls=fused_optim.AdamW, **kwargs):
    params = [torch.nn.Parameter(t) for t in _tensors(SHAPES, 4)]
    opt = cls(params, state_dtype=dtype, lr=0.01, **kwargs)
    for step in range(steps):
        for p, g in zip(params, _tensors(SHAPES, 30 + step)):
            p.grad = g
        opt.step()
    return opt, params


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_state_dict_layout_and_exact_round_trip(dtype):
    """The documented layout (codes shaped like the param, fp32 scales ``[rows, row // QB]``, small
    params with fp32 states under torch's keys), saved and loaded into a fresh 8-bit optimizer:
    bit-equal state, and the two go on bit-equal. Deepcopy and pickle keep it."""
    opt, params = _trained(dtype)
    sd = _roundtrip(opt.state_dict())
    for i, shape in enumerate(SHAPES):
        state = sd["state"][i]
        if _is_quantized(shape):
            assert set(state) == {"step", *(f"exp_avg{s}_{p}" for s in ("", "_sq") for p in ("codes", "scales"))}
            assert state["exp_avg_codes"].dtype == dtype and state["exp_avg_codes"].shape == shape
            assert state["exp_avg_sq_scales"].dtype == torch.float32
            assert state["exp_avg_sq_scales"].shape == (shape[0], shape[1] // QB)
        else:
            assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and state["exp_avg"].dtype == torch.float32
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = fused_optim.AdamW(params2, state_dtype=dtype, lr=0.01)
    opt2.load_state_dict(sd)
    copied = copy.deepcopy(opt.state_dict())
    for step in range(2):
        for p, q, g in zip(params, params2, _tensors(SHAPES, 40 + step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
        for p, q in zip(params, params2):
            assert torch.equal(p, q)
            for key, value in opt.state[p].items():
                assert torch.equal(opt2.state[q][key], value), key
    assert not torch.equal(copied["state"][0]["exp_avg_codes"], opt.state[params[0]]["exp_avg_codes"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_codes_move_to_another_memory_order_requantized(dtype):
    """Blocks follow the param's memory order. A checkpoint of row-major params loaded into
    column-major copies gets its codes requantized (within one quantization of the saved values),
    not copied beside scales of other blocks; the original optimizer, its params turned
    column-major, requantizes its own codes at its next step alike (both go on bit-equal)."""
    opt, params = _trained(dtype, steps=2)
    saved = opt.dequantized_state_dict()["state"]
    twins = [torch.nn.Parameter(p.detach().t().contiguous().t()) for p in params]
    twin = fused_optim.AdamW(twins, state_dtype=dtype, lr=0.01)
    twin.load_state_dict(opt.state_dict())
    loaded = twin.dequantized_state_dict()["state"]
    assert twin.state[twins[0]]["exp_avg_codes"].stride() == (1, QUANTIZED_SHAPES[0][0])
    # one more rounding: at most half a step of e4m3 (2^-4 relative; squared for the square-root code)
    for i in range(len(QUANTIZED_SHAPES)):
        for key in ("exp_avg", "exp_avg_sq"):
            rel = (1 + 2**-4) ** 2 - 1 if CODES[key] == SQRT else 2**-4
            bound = rel * saved[i][key].abs() + 2**-7 * saved[i][key].abs().amax()
            assert ((loaded[i][key] - saved[i][key]).abs() <= bound).all(), (i, key)
    for p, q in zip(params, twins):
        p.data = q.detach().clone(memory_format=torch.preserve_format)
    for step in range(2):
        for p, q, g in zip(params, twins, _tensors(SHAPES, 60 + step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        twin.step()
        for i, (p, q) in enumerate(zip(params, twins)):
            assert torch.equal(p, q), (i, step)
            for key, value in opt.state[p].items():
                assert torch.equal(twin.state[q][key], value), (i, key, step)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_checkpoints_load_and_export(dtype):
    """A torch.optim.AdamW checkpoint (fp32 states) loads into the 8-bit optimizer, quantized on
    load; ``dequantized_state_dict()`` loads into torch.optim.AdamW, which then holds exactly our
    dequantized values and steps on alike (to fp32 accuracy, torch's params against ours); an 8-bit
    checkpoint loads into an fp32 fused optimizer, dequantized."""
    from fused_optim._quant import dequantize

    params = [torch.nn.Parameter(t) for t in _tensors(SHAPES, 5)]
    theirs = torch.optim.AdamW(params, lr=0.01)
    for step in range(2):
        for p, g in zip(params, _tensors(SHAPES, 50 + step)):
            p.grad = g
        theirs.step()
    ours = fused_optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.01, state_dtype=dtype)
    ours.load_state_dict(_roundtrip(theirs.state_dict()))
    for i, (p, shape) in enumerate(zip(ours.param_groups[0]["params"], SHAPES)):
        for key in ("exp_avg", "exp_avg_sq"):
            value = theirs.state[params[i]][key]
            if _is_quantized(shape):
                expected, scale = ref_quantize(value, CODES[key], dtype)
                assert torch.equal(stored(ours.state[p][f"{key}_codes"], CODES[key]), expected)
                assert torch.equal(ours.state[p][f"{key}_scales"].reshape(-1), scale)
            else:
                assert torch.equal(ours.state[p][key], value)
    exported = _roundtrip(ours.dequantized_state_dict())
    mine = list(ours.param_groups[0]["params"])
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    back = torch.optim.AdamW(torch_params, lr=0.01)
    back.load_state_dict(exported)
    fp32 = fused_optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in mine], lr=0.01)
    fp32.load_state_dict(_roundtrip(ours.state_dict()))
    for i, p in enumerate(mine):
        state = ours.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            expected = (
                dequantize(state[f"{key}_codes"], state[f"{key}_scales"], CODES[key])
                if key not in state
                else state[key]
            )
            assert torch.equal(back.state[torch_params[i]][key], expected)
            assert torch.equal(fp32.state[fp32.param_groups[0]["params"][i]][key], expected)
    for p, q, g in zip(mine, torch_params, _tensors(SHAPES, 60)):
        p.grad, q.grad = g.clone(), g.clone()
    ours.step()
    back.step()
    for p, q in zip(mine, torch_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# --- memory ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_state_memory_per_param(dtype):
    """AdamW's state for a large matrix: about 2 bytes per param (two 1-byte codes, two fp32 scales
    per 128 elements) against 8 in fp32; ``bytes_per_step`` counts what a step moves (grad 4 +
    param 8 + codes 2 x 2 + scales), about 16 B per param instead of 28."""
    p = torch.nn.Parameter(torch.randn(512, 1024))
    opt = fused_optim.AdamW([p], state_dtype=dtype)
    p.grad = torch.randn_like(p)
    opt.step()
    state = [v for v in opt.state[p].values() if v.dim()]
    per_param = sum(v.numel() * v.element_size() for v in state) / p.numel()
    assert per_param == 2 + 2 * 4 / QB and per_param <= 2.2
    flat = sum(t.numel() * t.element_size() for cache in opt._caches.values() for seg in cache.segments.values()
               for t in [*seg.flat.values(), *seg.scales.values()])  # fmt: skip
    assert flat == per_param * p.numel()  # what the optimizer holds: the state, no hidden copy
    assert opt.bytes_per_step() == p.numel() * (4 + 8 + 2 * 2 + 2 * 2 * 4 / QB)


# --- refusals ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Rprop", "ASGD", "Adafactor"])
def test_algorithms_without_moments_refuse_8bit_states(name):
    """Rprop's step sizes, ASGD's average and Adafactor's factors are not moments: refused at
    construction, naming the option."""
    p = torch.nn.Parameter(torch.randn(8, QB))
    with pytest.raises(NotImplementedError, match=r"state_dtype=torch\.int8"):
        getattr(fused_optim, name)([p], state_dtype=torch.int8)


def test_bad_state_dtype_and_rounding_raise_at_construction():
    p = torch.nn.Parameter(torch.randn(8, QB))
    with pytest.raises(ValueError, match=r"Invalid state_dtype: torch\.int16"):
        fused_optim.AdamW([p], state_dtype=torch.int16)
    with pytest.raises(ValueError, match="stochastic_state_rounding"):
        fused_optim.AdamW([p], stochastic_state_rounding=True)


def test_complex_params_refused_before_anything_changes():
    real = torch.nn.Parameter(torch.randn(8, 2 * QB))
    cplx = torch.nn.Parameter(torch.randn(8, 4 * QB, dtype=torch.complex64))  # large enough for 8-bit
    opt = fused_optim.AdamW([real, cplx], state_dtype=torch.int8)
    real.grad, cplx.grad = torch.randn_like(real), torch.randn_like(cplx)
    before = real.detach().clone()
    with pytest.raises(NotImplementedError, match="complex"):
        opt.step()
    assert torch.equal(real, before) and not opt.state
