"""Timing: kernel time on a cold L2, the same-bytes copy ceiling, and host time of step()."""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
import triton


def device_time_ms(fn, device: torch.device) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) milliseconds per call.

    CUDA: ``triton.testing.do_bench`` records CUDA events around each call and writes a 256 MB
    buffer before each one, so every step starts with a cold L2 (the effect rotating buffers
    larger than L2 would have). CPU: wall clock over a few calls."""
    if device.type == "cuda":
        q = triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])
        return float(q[0]), float(q[1]), float(q[2])
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[1], times[-2]


def copy_gbps(n_bytes: int, device: torch.device, cap: int = 8 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second, in GB/s) measured on
    ``n_bytes`` moved (half read, half written), capped at ``cap`` bytes for the largest points."""
    half = max(min(n_bytes, cap) // 2 // 4, 1)
    src = torch.empty(half, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms, _, _ = device_time_ms(lambda: dst.copy_(src), device)
    return 2 * half * 4 / (ms * 1e-3) / 1e9


def host_time_us(step, device: torch.device, calls: int = 50, before=None) -> float:
    """Median wall time of the ``step()`` call itself with the device idle (synchronized before
    every call, never after: launched kernels run on after the call returns). ``before`` runs
    ahead of each call, untimed (e.g. handing the params new grad tensors)."""
    step()
    times = []
    for _ in range(calls):
        if before is not None:
            before()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def grad_swapper(params):
    """A callable that hands every param a different grad tensor (same values) at each call."""
    sets = [[p.grad for p in params], [p.grad.clone() for p in params]]
    turn = [0]

    def swap():
        turn[0] ^= 1
        for p, g in zip(params, sets[turn[0]]):
            p.grad = g

    return swap


@contextlib.contextmanager
def kernels_skipped():
    """Replace every fused_optim kernel launch with a no-op: on CPU, where the interpreter runs
    kernels inside the launch, this isolates what a launch costs the host elsewhere."""
    from fused_optim.kernels import _update, clip

    saved = [(m, m.launch) for m in (_update, clip)]
    try:
        for m, _ in saved:
            m.launch = lambda *args, **kwargs: None
        yield
    finally:
        for m, original in saved:
            m.launch = original


def kernels_skipped_for(provider: str, device: torch.device):
    """``kernels_skipped()`` where ``provider`` is fused_optim (any variant) on CPU, else a context
    that does nothing."""
    on_cpu = provider.startswith("fused_optim") and device.type == "cpu"
    return kernels_skipped() if on_cpu else contextlib.nullcontext()
