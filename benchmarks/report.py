"""Parity-and-speed report: fused_optim against torch.optim.

Parity: both optimizers take the same random grads for a few steps; the report prints, for the
params and every state key, the largest difference to ``torch.optim.X(foreach=False)`` relative to
the magnitude of the tensor (``max|a - b| / max|b|``: an element near zero is not divided by itself).

Speed (CUDA): median step time over many steps (``triton.testing.do_bench``), the bytes one step
must move in fp32 (Adam/AdamW: read p, g, exp_avg, exp_avg_sq, write p, exp_avg, exp_avg_sq: 28 B
per param; SGD with momentum: read p, g, buf, write p, buf: 20 B), the resulting GB/s, and a
device-to-device copy of the same number of bytes measured in the same run as the ceiling.
Without CUDA the same report runs tiny through Triton's interpreter; its timings say nothing
about performance.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch
import triton

import fused_optim
from fused_optim.kernels import INTERPRETED

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
]

# (optimizer, constructor arguments, fp32 bytes moved per param and step)
SPEED = [
    ("Adam", {"lr": 1e-3}, 28),
    ("AdamW", {"lr": 1e-3}, 28),
    ("SGD", {"lr": 1e-2, "momentum": 0.9}, 20),
]


def _params(sizes, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).to(device).requires_grad_() for n in sizes]


def parity(name: str, kwargs: dict, sizes, device, steps: int) -> dict[str, float]:
    """Largest difference to torch.optim.<name>(foreach=False) relative to the tensor's magnitude."""
    ours, theirs = _params(sizes, device), _params(sizes, device)
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


def _bench(fn, device) -> float:
    """Median milliseconds per call."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def speed(name: str, kwargs: dict, bytes_per_param: int, sizes, device) -> list[tuple[str, float]]:
    """(provider, ms per step) for fused_optim and the torch.optim implementations."""
    n = sum(sizes)
    torch_cls = getattr(torch.optim, name)
    providers = [("fused_optim", lambda ps: getattr(fused_optim, name)(ps, **kwargs))]
    providers.append(("torch for-loop", lambda ps: torch_cls(ps, foreach=False, **kwargs)))
    if device.type == "cuda":
        providers.append(("torch foreach", lambda ps: torch_cls(ps, foreach=True, **kwargs)))
        providers.append(("torch fused", lambda ps: torch_cls(ps, fused=True, **kwargs)))
    rows = []
    for label, make in providers:
        params = _params(sizes, device)
        for p in params:
            p.grad = torch.randn_like(p)
        opt = make(params)
        rows.append((label, _bench(opt.step, device)))
        del opt, params
    src = torch.empty(n * bytes_per_param // 8, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)  # reads + writes the bytes of one step
    rows.append(("copy, same bytes", _bench(lambda: dst.copy_(src), device)))
    return rows


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=64, help="tensors in the param group (default 64)")
    parser.add_argument("--params", type=int, default=None, help="total params (default 2**26 on CUDA, 2**14 on CPU)")
    parser.add_argument("--steps", type=int, default=10, help="steps of the parity check (default 10)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    total = args.params or (2**26 if device.type == "cuda" else 2**14)
    sizes = [total // args.tensors + (1 if i < total % args.tensors else 0) for i in range(args.tensors)]

    print("fused_optim report: parity and speed against torch.optim")
    print(
        f"device: {_device_name(device)} | torch {torch.__version__} | triton {triton.__version__} | "
        f"fused_optim {fused_optim.__version__} | {datetime.date.today().isoformat()}"
    )
    if device.type == "cpu":
        mode = "Triton interpreter" if INTERPRETED else "torch.optim fallback"
        print(f"NOTE: no CUDA. The kernels run on CPU through the {mode}; the timings below are NOT")
        print("performance figures (the interpreter runs kernels in numpy, thousands of times slower).")

    print(f"\nParity after {args.steps} steps, fp32, {args.tensors} tensors, {total:,} params")
    print("largest difference to torch.optim.X(foreach=False), relative to each tensor's magnitude")
    for name, kwargs in CASES:
        worst = parity(name, kwargs, sizes, device, args.steps)
        label = name + " " + ", ".join(f"{k}={v}" for k, v in kwargs.items())
        print(f"  {label:<58}" + "  ".join(f"{k} {v:.1e}" for k, v in worst.items()))

    print(f"\nSpeed, one step, fp32, {args.tensors} tensors, {total:,} params")
    for name, kwargs, bytes_per_param in SPEED:
        rows = speed(name, kwargs, bytes_per_param, sizes, device)
        gbytes = total * bytes_per_param / 1e9
        fused_ms = rows[0][1]
        print(f"  {name} {kwargs}, {bytes_per_param} B/param moved")
        print(f"    {'provider':<20}{'ms/step':>12}{'GB/s':>12}{'fused speedup':>16}")
        for label, ms in rows:
            print(f"    {label:<20}{ms:>12.4f}{gbytes / (ms / 1e3):>12.1f}{ms / fused_ms:>15.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
