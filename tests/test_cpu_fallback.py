"""Without TRITON_INTERPRET, CPU params go through torch.optim's own implementation: the same
results as torch.optim bit for bit, and one warning saying so. Needs a fresh process, since the
interpreter switch is read when the kernels are decorated."""

import json
import os
import subprocess
import sys
import textwrap

from algorithms import ALGORITHMS, everything

SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    import fused_optim
    from fused_optim.kernels import INTERPRETED
    assert not INTERPRETED

    torch.manual_seed(0)
    shapes = [(7, 13), (300,), (), (0,)]
    for name, kwargs in json.loads(sys.argv[1]):
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        for dtype in (torch.float32, torch.bfloat16, torch.complex64):
            init = [torch.randn(s, dtype=dtype) for s in shapes]
            ps = [t.clone().requires_grad_() for t in init]
            qs = [t.clone().requires_grad_() for t in init]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt = getattr(fused_optim, name)(ps, **kwargs)
                ref = getattr(torch.optim, name)(qs, foreach=False, **kwargs)
                for step in range(4):
                    for i, (p, q) in enumerate(zip(ps, qs)):
                        if (i + step) % 3 == 0:
                            p.grad = q.grad = None
                        else:
                            g = torch.randn_like(p)
                            p.grad, q.grad = g.clone(), g.clone()
                    opt.step()
                    ref.step()
            for p, q in zip(ps, qs):
                assert torch.equal(p, q), (name, dtype)
                assert opt.state[p].keys() == ref.state[q].keys(), (name, dtype)
                for key in ref.state[q]:
                    assert torch.equal(opt.state[p][key], ref.state[q][key]), (name, dtype, key)
            print("WARNINGS", sum("torch.optim's own implementation" in str(w.message) for w in caught))
    """
)

CASES = [
    ("Adam", {"lr": 0.05, "weight_decay": 0.1, "amsgrad": True}),
    ("AdamW", {"lr": 0.05, "maximize": True}),
    ("Adam", {"lr": 0.05, "decoupled_weight_decay": True, "weight_decay": 0.1}),
] + [(name, everything(name)) for name in ALGORITHMS]


def _fallback_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def test_cpu_without_interpreter_matches_torch_exactly():
    env = _fallback_env()
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(CASES)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    counts = [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("WARNINGS")]
    assert counts == [1] + [0] * (3 * len(CASES) - 1), counts  # said once per process


# What only the kernels can do: low-precision states, stochastic rounding, and capturable steps
# that never read on the host (the fallback reads found_inf there; CPU has no graphs to capture).
KERNEL_ONLY = [
    "bf16_states_for",
    "master_weights_and_bf16_states",
    "stochastic_rounding_is_unbiased",
    "stochastic_rounding_stays",
    "reads_nothing_on_the_host",
]


def _pytest_through_the_fallback(*args: str) -> str:
    """stdout of pytest run on ``args`` in a process where conftest.py leaves the interpreter off
    (FUSED_OPTIM_TEST_FALLBACK=1), so CPU params take torch.optim's own implementation. The plan
    check reads in Python there (FUSED_OPTIM_NATIVE=0): the suite's other run has the native reads."""
    env = {**_fallback_env(), "FUSED_OPTIM_TEST_FALLBACK": "1", "FUSED_OPTIM_NATIVE": "0"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=root,
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " failed" not in out.stdout and " passed" in out.stdout
    return out.stdout


def test_training_features_without_interpreter_match_torch():
    """tests/test_training_features.py against torch once more, through the fallback (AMP, clipping,
    master weights applied around torch.optim's implementation)."""
    selection = " and ".join(f"not {name}" for name in KERNEL_ONLY)
    text = _pytest_through_the_fallback("tests/test_training_features.py", "-k", selection)
    assert "run through torch.optim's own implementation" in text  # the fallback really ran


def test_distributed_without_interpreter_matches_torch():
    """FSDP2 (DTensor params), its global-norm clip, DDP and DCP through the fallback: every rank
    asserts the interpreter is off (tests/ranks.py)."""
    _pytest_through_the_fallback("tests/test_distributed.py")


REFUSED = textwrap.dedent(
    """
    import torch
    import fused_optim

    for dtype, options, name in (
        (torch.float32, {"state_dtype": torch.bfloat16}, "state_dtype=torch.bfloat16"),
        (torch.bfloat16, {"stochastic_rounding": True}, "stochastic_rounding"),
    ):
        # a param the fallback could update, then one it cannot: nothing may change
        ps = [torch.randn(5, dtype=torch.float64, requires_grad=True), torch.randn(7, dtype=dtype, requires_grad=True)]
        for p in ps:
            p.grad = torch.randn_like(p)
        before = [p.detach().clone() for p in ps]
        opt = fused_optim.Adam(ps, lr=0.1, **options)
        try:
            opt.step()
        except NotImplementedError as err:
            assert name in str(err) and "TRITON_INTERPRET=1" in str(err), err
        else:
            raise AssertionError(f"{name} accepted without the kernels")
        assert all(torch.equal(p, b) for p, b in zip(ps, before)) and not opt.state, name
    print("OK")
    """
)


def test_kernel_only_options_refuse_before_changing_anything():
    out = subprocess.run(
        [sys.executable, "-c", REFUSED], check=False, env=_fallback_env(), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]


def test_adafactor_without_interpreter_matches_torch():
    """tests/test_adafactor.py through the fallback, but for what only the kernels do (their
    launches, stochastic rounding, bf16 states, an empty param, which torch's Adafactor refuses)."""
    selection = "not launches and not stochastic and not empty and not bf16_states"
    text = _pytest_through_the_fallback("tests/test_adafactor.py", "-k", selection)
    assert "run through torch.optim's own implementation" in text
