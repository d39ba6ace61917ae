"""Parity section of the benchmarks: fused_optim against torch.optim.X(foreach=False), and the
optimizers beyond torch.optim against their reference's for-loop (``benchmarks/baselines.py``:
lion_pytorch, pytorch_optimizer, optimi, schedulefree; LAMB and LARS, which no installed package
has, against the benchmarks' eager implementation of their formulas run in float64).

Both optimizers take the same random grads for a few steps; the table shows, for the params and
every state key, the largest difference relative to the tensor's magnitude
(``max|a - b| / max|b|``, so an element near zero is not divided by itself).

Muon's Newton-Schulz runs in bf16 in both, and batched matmuls may round otherwise than torch's
per-matrix ones (on CPU they agree bit for bit), so its params are not expected to match torch's to
fp32 precision on a GPU. As in tests/test_muon.py, a third copy runs torch's algorithm with a
float64 Newton-Schulz: ``param err`` is each side's distance to it (relative to its magnitude), and
fused_optim's should be no larger than torch's. Its momentum buffers do not depend on
Newton-Schulz: they match torch's to fp32 ulps.
"""

from __future__ import annotations

import torch

import fused_optim

from . import baselines
from .workloads import matrices, split

# (algorithm, arguments, the shapes: "vectors" or "matrices" of the same sizes)
CASES = [
    ("Adam", {"lr": 1e-3, "weight_decay": 0.01}, "vectors"),
    ("Adam", {"lr": 1e-3, "amsgrad": True}, "vectors"),
    ("AdamW", {"lr": 1e-3, "weight_decay": 0.01}, "vectors"),
    ("SGD", {"lr": 1e-2, "momentum": 0.9, "nesterov": True}, "vectors"),
    ("Adagrad", {"lr": 1e-2, "lr_decay": 1e-3}, "vectors"),
    ("Adadelta", {"weight_decay": 0.01}, "vectors"),
    ("RMSprop", {"momentum": 0.9, "centered": True}, "vectors"),
    ("NAdam", {"decoupled_weight_decay": True, "weight_decay": 0.01}, "vectors"),
    ("RAdam", {"weight_decay": 0.01}, "vectors"),
    ("Adamax", {"weight_decay": 0.01}, "vectors"),
    ("Rprop", {"etas": (0.4, 1.3)}, "vectors"),
    ("ASGD", {"t0": 10, "weight_decay": 0.01}, "vectors"),
    ("Adafactor", {"weight_decay": 0.01}, "matrices"),  # factored: row_var, col_var
    ("Adafactor", {"beta2_decay": -0.5}, "vectors"),  # variance
    ("Muon", {"lr": 0.02, "adjust_lr_fn": "match_rms_adamw"}, "matrices"),  # torch >= 2.9
    # beyond torch.optim: against the reference's for-loop (LAMB, LARS: their formulas in float64)
    ("LAMB", {"lr": 1e-2, "weight_decay": 0.1}, "vectors"),
    ("LARS", {"lr": 0.1, "weight_decay": 0.01}, "vectors"),
    ("Lion", {"lr": 1e-3, "weight_decay": 0.1}, "vectors"),
    ("AdEMAMix", {"weight_decay": 0.01, "weight_decouple": True, "t_alpha_beta3": 5}, "vectors"),
    ("StableAdamW", {"lr": 1e-2}, "vectors"),
    ("ScheduleFreeAdamW", {"lr": 1e-2, "warmup_steps": 2, "weight_decay": 0.01}, "vectors"),
]
FLOAT64 = {"LAMB", "LARS"}  # no package: the yardstick is their formulas (baselines.EagerLAMB/EagerLARS) in float64


def _params(shapes, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]


def _ns64(update, coefficients, ns_steps, eps):
    """torch's Newton-Schulz (``_zeropower_via_newtonschulz``) in float64."""
    a, b, c = coefficients
    tall = update.size(0) > update.size(1)
    x = update.double().T if tall else update.double()
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class _ExactMuon:
    """torch's Muon with Newton-Schulz in float64 (and float64 params): the yardstick both
    implementations' bf16 Newton-Schulz is measured against."""

    def __init__(self, params, ref):
        from torch.optim._muon import _adjust_lr

        self.adjust, self.group = _adjust_lr, ref.param_groups[0]
        self.params = [p.detach().double() for p in params]
        self.bufs = [torch.zeros_like(p) for p in self.params]

    def step(self, grads):
        group = self.group
        lr, m = float(group["lr"]), group["momentum"]
        for p, buf, grad in zip(self.params, self.bufs, grads):
            g = grad.double()
            buf.lerp_(g, 1 - m)
            update = g.lerp(buf, m) if group["nesterov"] else buf
            ortho = _ns64(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
            p.mul_(1 - lr * group["weight_decay"]).add_(ortho, alpha=-self.adjust(lr, group["adjust_lr_fn"], p.shape))


def parity(name: str, kwargs: dict, shapes, device, steps: int) -> dict[str, float]:
    """Largest difference to torch.optim.<name>(foreach=False), or to the for-loop of the reference
    of an optimizer beyond torch.optim, relative to the tensor's magnitude (Muon: also each side's
    distance to a float64 Newton-Schulz, ``param err``). Raises ``NotImplementedError`` where the
    reference package is not installed."""
    ours, theirs = _params(shapes, device), _params(shapes, device)
    opt = baselines.ready(name, getattr(fused_optim, name)(ours, **kwargs))
    if name in baselines.REFERENCES:
        if name in FLOAT64:
            theirs = [q.detach().double().requires_grad_() for q in theirs]
        ref = baselines.build(name, theirs, kwargs, baselines.for_loop(name))
    else:
        torch_cls = getattr(torch.optim, name)
        ref = torch_cls(theirs, foreach=False, **kwargs) if name != "Muon" else torch_cls(theirs, **kwargs)
    exact = _ExactMuon(theirs, ref) if name == "Muon" else None
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen).to(device)
            p.grad, q.grad = g.clone(), g.to(q.dtype)
        opt.step()
        ref.step()
        if exact is not None:
            exact.step([q.grad for q in theirs])
    worst: dict[str, float] = {}

    def record(key, a, b):
        if b.numel():
            a, b = a.double(), b.double()
            rel = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            worst[key] = max(worst.get(key, 0.0), rel)

    for p, q in zip(ours, theirs):
        record("param", p, q)
        for key, value in ref.state[q].items():
            if isinstance(value, torch.Tensor):  # not optimi's kahan_comp (None)
                record(key, opt.state[p][key], value)
    if exact is not None:
        for p, q, e in zip(ours, theirs, exact.params):
            record("param err fused", p, e)
            record("param err torch", q, e)
    return worst


def _label(name: str, kwargs: dict, kind: str) -> str:
    label = name + " " + ", ".join(f"{k}={v}" for k, v in kwargs.items())
    return label + " (matrices)" if kind == "matrices" else label


def parity_table(device, total: int, tensors: int = 64, steps: int = 10) -> None:
    print(f"Parity after {steps} steps, fp32, {tensors} tensors, {total:,} params")
    print("largest difference to torch.optim.X(foreach=False), relative to each tensor's magnitude; beyond")
    print("torch.optim, to the reference's for-loop (LAMB, LARS: to their formulas in float64)")
    vectors = split(total, tensors)
    labels = [_label(name, kwargs, kind) for name, kwargs, kind in CASES]
    width = max(58, *(len(label) + 2 for label in labels))
    for (name, kwargs, kind), label in zip(CASES, labels):
        if name not in baselines.REFERENCES and (not hasattr(torch.optim, name) or not hasattr(fused_optim, name)):
            print(f"  {label:<{width}}skipped: torch {torch.__version__} has no torch.optim.{name}")
            continue
        try:
            worst = parity(name, kwargs, matrices(vectors) if kind == "matrices" else vectors, device, steps)
        except NotImplementedError as err:  # a reference package not installed
            print(f"  {label:<{width}}skipped: {err}")
            continue
        print(f"  {label:<{width}}" + "  ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    if any(name == "Muon" for name, _, _ in CASES) and hasattr(torch.optim, "Muon"):
        print("  (Muon: torch.optim.Muon, which has no foreach option; bf16 Newton-Schulz, batched in fused_optim,")
        print("  per matrix in torch: on a GPU the params may differ by bf16 rounding; param err: each side's")
        print("  distance to torch's algorithm with a float64 Newton-Schulz, fused_optim's no larger than torch's)")
