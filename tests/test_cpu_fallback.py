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


def test_cpu_without_interpreter_matches_torch_exactly():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
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
