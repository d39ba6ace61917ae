"""``python -m benchmarks.quantized_training``: training with 8-bit states against fp32 states.

The task (``Task``): a fixed random teacher (``D_IN -> 256 -> D_OUT``, GELU) on inputs ``x * s``
with ``s`` log-uniform over ``decades`` in random order, so that each first-layer weight's
gradient is proportional to its feature's scale and spans those decades inside every block of
256 elements; a student ``D_IN -> 32 -> 32 -> D_OUT`` whose first weight (32 x 256) is the only
param large enough for 8-bit states, and the one whose gradients vary most. The loss compared is
the held-out loss averaged over the last five steps, as a percentage of torch.optim.AdamW's with
fp32 states on the same seed. ``tests/test_quantized_training.py`` runs seed 0 of each task.

Runs: fused_optim.AdamW with int8 and float8_e4m3fn states (nearest and stochastic rounding) and
with bf16 states, and torchao's AdamW8bit / AdamWFp8 side by side where torchao imports. Without
CUDA the fused runs go through Triton's interpreter (about 20 s each).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # Triton's interpreter, switched on before fused_optim is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fused_optim

D_IN, D_OUT, HIDDEN, STEPS, LR, TAIL = 256, 8, 32, 100, 3e-3, 5
TASKS = {"3 decades": (-2.0, 1.0), "5 decades": (-3.0, 2.0)}


class Task:
    """The regression task of ``seed`` with input scales over ``decades`` (log10 bounds)."""

    def __init__(self, seed: int, decades: tuple[float, float]):
        g = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.scales = 10.0 ** torch.empty(D_IN).uniform_(*decades, generator=g)
        self.t1 = torch.randn(256, D_IN, generator=g) / D_IN**0.5
        self.t2 = torch.randn(D_OUT, 256, generator=g) / 16.0
        self.y_std = 1.0
        self.y_std = self.target(torch.randn(4096, D_IN, generator=g) * self.scales).std().item()
        self.eval_x, self.eval_y = self.sample(1024, g)

    def target(self, z):
        return F.gelu(z @ self.t1.T) @ self.t2.T / self.y_std

    def sample(self, n: int, g: torch.Generator):
        z = torch.randn(n, D_IN, generator=g) * self.scales
        return z, self.target(z)

    def model(self) -> torch.nn.Module:
        torch.manual_seed(self.seed)
        return torch.nn.Sequential(
            torch.nn.Linear(D_IN, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.GELU(),
            torch.nn.Linear(HIDDEN, D_OUT),
        )  # fmt: skip

    def train(self, make_optimizer, steps: int = STEPS) -> tuple[float, torch.nn.Module, torch.optim.Optimizer]:
        """(final loss, model, optimizer) after ``steps`` steps of ``make_optimizer(params)``."""
        model = self.model()
        opt = make_optimizer(model.parameters())
        tail = []
        for step in range(steps):
            x, y = self.sample(128, torch.Generator().manual_seed(self.seed * 1_000_003 + step))
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
            if step >= steps - TAIL:
                with torch.no_grad():
                    tail.append(F.mse_loss(model(self.eval_x), self.eval_y).item())
        return sum(tail) / len(tail), model, opt


def fused(state_dtype, stochastic: bool = False):
    return lambda ps: fused_optim.AdamW(
        ps, lr=LR, weight_decay=0.01, state_dtype=state_dtype, stochastic_state_rounding=stochastic
    )


def optimizers() -> dict:
    runs = {
        "int8": fused(torch.int8),
        "fp8": fused(torch.float8_e4m3fn),
        "int8 + SR": fused(torch.int8, True),
        "fp8 + SR": fused(torch.float8_e4m3fn, True),
        "bf16 states": fused(torch.bfloat16),
    }
    try:
        from torchao.optim import AdamW8bit, AdamWFp8
    except ImportError:
        return runs
    runs["torchao AdamW8bit"] = lambda ps: AdamW8bit(ps, lr=LR, weight_decay=0.01)
    runs["torchao AdamWFp8"] = lambda ps: AdamWFp8(ps, lr=LR, weight_decay=0.01)
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", help="results JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for task_name, decades in TASKS.items():
        for seed in range(args.seeds):
            task = Task(seed, decades)
            ref = task.train(lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.01))[0]
            start = time.perf_counter()
            for name, make in optimizers().items():
                loss = task.train(make)[0]
                results.setdefault(task_name, {}).setdefault(name, []).append(100 * (loss / ref - 1))
            print(f"{task_name}, seed {seed}: fp32 loss {ref:.5f} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"\nfinal loss vs fp32 states (%), {args.seeds} seeds: mean, and the largest |difference|")
    names = list(next(iter(results.values())))
    print(f"| run | {' | '.join(results)} |\n|---|{'---|' * len(results)}")
    for name in names:
        cells = [f"{statistics.fmean(v[name]):+.2f} (worst {max(v[name], key=abs):+.2f})" for v in results.values()]
        print(f"| {name} | {' | '.join(cells)} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"steps": STEPS, "lr": LR, "tasks": TASKS, "percent_vs_fp32": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
