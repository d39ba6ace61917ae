"""Parity section of the benchmarks: fused_optim against torch.optim.X(foreach=False).

Both optimizers take the same random grads for a few steps; the table shows, for the params and
every state key, the largest difference relative to the tensor's magnitude
(``max|a - b| / max|b|``, so an element near zero is not divided by itself).
"""

from __future__ import annotations

import torch

import fused_optim

from .workloads import split

CASES = [
    ("Adam", {"lr": 1e-3, "weight_decay": 0.01}),
    ("Adam", {"lr": 1e-3, "amsgrad": True}),
    ("AdamW", {"lr": 1e-3, "weight_decay": 0.01}),
    ("SGD", {"lr": 1e-2, "momentum": 0.9, "nesterov": True}),
    ("Adagrad", {"lr": 1e-2, "lr_decay": 1e-3}),
    ("Adadelta", {"weight_decay": 0.01}),
    ("RMSprop", {"momentum": 0.9, "centered": True}),
    ("NAdam", {"decoupled_weight_decay": True, "weight_decay": 0.01}),
    ("RAdam", {"weight_decay": 0.01}),
    ("Adamax", {"weight_decay": 0.01}),
    ("Rprop", {"etas": (0.4, 1.3)}),
    ("ASGD", {"t0": 10, "weight_decay": 0.01}),
]


def _params(shapes, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]


def parity(name: str, kwargs: dict, shapes, device, steps: int) -> dict[str, float]:
    """Largest difference to torch.optim.<name>(foreach=False) relative to the tensor's magnitude."""
    ours, theirs = _params(shapes, device), _params(shapes, device)
    opt = getattr(fused_optim, name)(ours, **kwargs)
    ref = getattr(torch.optim, name)(theirs, foreach=False, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen).to(device)
            p.grad, q.grad = g.clone(), g
        opt.step()
        ref.step()
    worst: dict[str, float] = {}

    def record(key, a, b):
        if b.numel():
            a, b = a.double(), b.double()
            rel = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            worst[key] = max(worst.get(key, 0.0), rel)

    for p, q in zip(ours, theirs):
        record("param", p, q)
        for key, value in ref.state[q].items():
            record(key, opt.state[p][key], value)
    return worst


def parity_table(device, total: int, tensors: int = 64, steps: int = 10) -> None:
    print(f"Parity after {steps} steps, fp32, {tensors} tensors, {total:,} params")
    print("largest difference to torch.optim.X(foreach=False), relative to each tensor's magnitude")
    shapes = split(total, tensors)
    for name, kwargs in CASES:
        worst = parity(name, kwargs, shapes, device, steps)
        label = name + " " + ", ".join(f"{k}={v}" for k, v in kwargs.items())
        print(f"  {label:<58}" + "  ".join(f"{k} {v:.1e}" for k, v in worst.items()))
