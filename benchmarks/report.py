"""Parity-and-speed report: fused_optim against torch.optim for Adam and AdamW.

Parity: both optimizers take the same random grads for a few steps; the report prints the largest
relative difference of the params and of every state key against ``torch.optim.X(foreach=False)``.

Speed (CUDA): median step time over many steps (``triton.testing.do_bench``), the bytes one step
must move (fp32: read p, g, exp_avg, exp_avg_sq = 16 B, write p, exp_avg, exp_avg_sq = 12 B: 28 B
per param), the resulting GB/s, and a device-to-device copy of the same number of bytes measured in
the same run as the ceiling. Without CUDA the same report runs tiny through Triton's interpreter;
its timings say nothing about performance.
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

ADAM_BYTES_PER_PARAM = 28  # fp32: 4 reads + 3 writes of 4 bytes

CASES = [
    ("Adam", {"lr": 1e-3, "weight_decay": 0.01}),
    ("Adam", {"lr": 1e-3, "amsgrad": True}),
    ("AdamW", {"lr": 1e-3, "weight_decay": 0.01}),
]


def _params(sizes, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).to(device).requires_grad_() for n in sizes]


def parity(name: str, kwargs: dict, sizes, device, steps: int) -> dict[str, float]:
    """Largest relative difference to torch.optim.<name>(foreach=False), per param / state key."""
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
        rel = ((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-12)).max().item() if b.numel() else 0.0
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


def speed(name: str, sizes, device) -> list[tuple[str, float]]:
    """(provider, ms per step) for fused_optim and the torch.optim implementations."""
    n = sum(sizes)
    providers = [("fused_optim", lambda ps: getattr(fused_optim, name)(ps, lr=1e-3))]
    providers.append(("torch for-loop", lambda ps: getattr(torch.optim, name)(ps, lr=1e-3, foreach=False)))
    if device.type == "cuda":
        providers.append(("torch foreach", lambda ps: getattr(torch.optim, name)(ps, lr=1e-3, foreach=True)))
        providers.append(("torch fused", lambda ps: getattr(torch.optim, name)(ps, lr=1e-3, fused=True)))
    rows = []
    for label, make in providers:
        params = _params(sizes, device)
        for p in params:
            p.grad = torch.randn_like(p)
        opt = make(params)
        rows.append((label, _bench(opt.step, device)))
        del opt, params
    src = torch.empty(n * ADAM_BYTES_PER_PARAM // 8, dtype=torch.float32, device=device)
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
    print("largest relative difference to torch.optim.X(foreach=False)")
    keys = ["param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    print(f"  {'optimizer':<34}" + "".join(f"{k:>16}" for k in keys))
    for name, kwargs in CASES:
        worst = parity(name, kwargs, sizes, device, args.steps)
        label = name + " " + ", ".join(f"{k}={v}" for k, v in kwargs.items())
        print(f"  {label:<34}" + "".join(f"{worst[k]:>16.2e}" if k in worst else f"{'-':>16}" for k in keys))

    gbytes = total * ADAM_BYTES_PER_PARAM / 1e9
    print(f"\nSpeed, one step, fp32, {args.tensors} tensors, {total:,} params, {ADAM_BYTES_PER_PARAM} B/param moved")
    for name in ("Adam", "AdamW"):
        rows = speed(name, sizes, device)
        fused_ms = rows[0][1]
        print(f"  {name}")
        print(f"    {'provider':<20}{'ms/step':>12}{'GB/s':>12}{'fused speedup':>16}")
        for label, ms in rows:
            print(f"    {label:<20}{ms:>12.4f}{gbytes / (ms / 1e3):>12.1f}{ms / fused_ms:>15.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
