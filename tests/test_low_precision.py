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
