"""bf16 / fp16 params: math in fp32, one rounding to the param dtype per stored value.

The reference is torch.optim in fp32 whose params and states are rounded to the low-precision
dtype after every step: fp32 math with low-precision storage, which is what the kernel does. On
CPU the match is exact; the tolerance (2 ulps of the dtype) leaves room for the GPU's IEEE sqrt
and fused multiply-adds flipping a rounding. A second test checks against plain fp32 that the
fused update is no less accurate than torch.optim's own low-precision arithmetic.
"""

import pytest
import torch

import fused_optim
from algorithms import ALGORITHMS, everything
from parity import SHAPES, Config, leaves, random_tensors

LOW_TOL = {
    torch.bfloat16: {"rtol": 2 * 2**-7, "atol": 1e-12},
    torch.float16: {"rtol": 2 * 2**-10, "atol": 2 * 2**-24},  # 2**-24: fp16's subnormal spacing
}

ADAM = [
    Config("defaults"),
    Config("L2 + amsgrad", {"lr": 0.05, "weight_decay": 0.1, "amsgrad": True}),
    Config("decoupled + maximize", {"lr": 0.05, "weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True}),
]
CASES = [pytest.param("Adam", c.kwargs, id=f"Adam-{c.desc}") for c in ADAM] + [
    pytest.param(name, everything(name), id=f"{name}-everything") for name in ALGORITHMS
]


def _round_to(dtype, opt, params, host_keys):
    """Round params and per-element state to ``dtype``; host scalars (step, mu_product) stay."""
    with torch.no_grad():
        for p in params:
            p.copy_(p.to(dtype).float())
            for key, value in opt.state[p].items():
                if key not in host_keys:
                    value.copy_(value.to(dtype).float())


def _grads(dtype, step, device):
    return random_tensors(SHAPES, dtype, 100 + step, device)


@pytest.mark.parametrize(("name", "kwargs"), CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_math_low_precision_storage(dtype, name, kwargs, device):
    fused_cls = getattr(fused_optim, name)
    init = random_tensors(SHAPES, dtype, 0, device)
    params, ref_params = leaves(init), leaves([t.float() for t in init])
    opt = fused_cls(params, **kwargs)
    ref = getattr(torch.optim, name)(ref_params, foreach=False, **kwargs)
    _round_to(dtype, ref, ref_params, fused_cls._scalar_state)  # state made at construction (Adagrad)
    for step in range(10):
        for p, q, g in zip(params, ref_params, _grads(dtype, step, device)):
            p.grad, q.grad = g.clone(), g.float()
        opt.step()
        ref.step()
        _round_to(dtype, ref, ref_params, fused_cls._scalar_state)
        for i, (p, q) in enumerate(zip(params, ref_params)):
            assert p.dtype == dtype
            torch.testing.assert_close(
                p.float(), q, **LOW_TOL[dtype], msg=lambda m, i=i, s=step: f"param {i} step {s + 1}: {m}"
            )
            for key, theirs in ref.state[q].items():
                mine = opt.state[p][key]
                if key in fused_cls._scalar_state:
                    torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
                    continue
                assert mine.dtype == dtype
                torch.testing.assert_close(
                    mine.float(),
                    theirs,
                    **LOW_TOL[dtype],
                    msg=lambda m, k=key, i=i, s=step: f"{k} of param {i} step {s + 1}: {m}",
                )


@pytest.mark.parametrize(("name", "kwargs"), CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_no_less_accurate_than_torch_low_precision(dtype, name, kwargs, device):
    init = random_tensors(SHAPES, dtype, 1, device)
    params, native, exact = leaves(init), leaves(init), leaves([t.float() for t in init])
    opts = [
        getattr(fused_optim, name)(params, **kwargs),
        getattr(torch.optim, name)(native, foreach=False, **kwargs),
        getattr(torch.optim, name)(exact, foreach=False, **kwargs),
    ]
    for step in range(10):
        for p, q, r, g in zip(params, native, exact, _grads(dtype, step, device)):
            p.grad, q.grad, r.grad = g.clone(), g.clone(), g.float()
        for opt in opts:
            opt.step()

    def error(ps):  # mean absolute error against fp32 over every element; NaN or inf count as infinite
        err = torch.cat([(p.float() - r).abs().flatten() for p, r in zip(ps, exact)])
        return err.nan_to_num(nan=float("inf")).mean().item()

    ours, theirs = error(params), error(native)
    assert ours <= theirs * 1.01, f"fused mean error {ours:.3e} vs torch's {dtype} path {theirs:.3e}"


# --- stochastic rounding is reproducible across processes and ranks -----------------------------
SR_RUN = """
import hashlib, os, sys
import torch
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
import fused_optim

device = "cuda" if torch.cuda.is_available() else "cpu"
gen = torch.Generator().manual_seed(0)
params = [torch.randn(s, generator=gen).to(device, torch.bfloat16).requires_grad_() for s in [(300,), (17, 9)]]
opt = fused_optim.AdamW(
    params, lr=1e-2, stochastic_rounding=True, rounding_seed=int(sys.argv[1]), capturable=sys.argv[2] == "1"
)
for step in range(3):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device, torch.bfloat16)
    opt.step()
print(hashlib.sha256(b"".join(p.detach().cpu().view(torch.int16).numpy().tobytes() for p in params)).hexdigest())
"""


def _bits_in_a_fresh_process(seed: int, capturable: bool, hash_seed: str) -> str:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONHASHSEED"] = hash_seed
    out = subprocess.run(
        [sys.executable, "-c", SR_RUN, str(seed), str(int(capturable))],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()[-1]


@pytest.mark.parametrize("capturable", [False, True], ids=["host steps", "device steps"])
def test_stochastic_rounding_gives_the_same_bits_in_every_process(capturable):
    """Two processes (two ranks holding replicated params, or a rerun) with the same inputs round
    alike, bit for bit: the seed comes from the rounding_seed, group index, dtype and step, never
    from the process (a dtype's hash() is its address) or the device. Another rounding_seed draws
    other bits."""
    first = _bits_in_a_fresh_process(0, capturable, "1")
    assert _bits_in_a_fresh_process(0, capturable, "2") == first
    assert _bits_in_a_fresh_process(7, capturable, "3") != first


def test_rounding_seeds_come_from_stable_values():
    """Each segment's seed is made of the rounding_seed, the group's index, the segment's place in
    the group and the dtype (``rounding_seed``), never of the process or the device index."""
    from fused_optim._features import rounding_seed

    groups = [[torch.nn.Parameter(torch.randn(4).bfloat16())] for _ in range(2)]
    opt = fused_optim.SGD([{"params": g} for g in groups], lr=0.1, stochastic_rounding=True, rounding_seed=7)
    for g in groups:
        g[0].grad = torch.ones_like(g[0])
    opt.step()
    seeds = [seg.seed for i in (0, 1) for seg in opt._caches[i].segments.values()]
    assert seeds == [rounding_seed(7, i, 0, torch.bfloat16) for i in (0, 1)]
    assert len({rounding_seed(7, 0, s, torch.bfloat16) for s in range(4)}) == 4  # segments of one group differ


def test_rounding_seed_is_checked():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="rounding_seed must be an int"):
        fused_optim.SGD([p], lr=0.1, stochastic_rounding=True, rounding_seed=0.5)
