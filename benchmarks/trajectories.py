"""``python -m benchmarks.trajectories``: what each fused optimizer does, in pictures.

1. Paths on classic 2-D test surfaces, every optimizer from the same start: the Rosenbrock
   function (a narrow curved ravine with its minimum at (1, 1)) and a saddle, x^2 - y^2, started
   just off the ridge line (gradient descent lingers near the saddle point before it escapes).
2. A small MLP regression (16 points of y = sin(3x) + noise) trained three ways with each
   optimizer: batch (one step per epoch on all the data), mini-batch (batches of 4) and stochastic
   (one sample per step), with the full-data loss after every epoch.

Each optimizer is a ``fused_optim`` class: its Triton kernel runs on CUDA when present, else on CPU
through Triton's interpreter (switched on here), the optimizers shared among one process per core.
Writes ``trajectories.png`` and ``training.png`` to ``benchmarks/demo/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before fused_optim decorates its kernels

import fused_optim

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# label -> (class name, fixed arguments); learning rates are per surface / task below
OPTIMIZERS = {
    "SGD": ("SGD", {}),
    "SGD momentum": ("SGD", {"momentum": 0.9}),
    "Nesterov": ("SGD", {"momentum": 0.9, "nesterov": True}),
    "Adagrad": ("Adagrad", {}),
    "Adadelta": ("Adadelta", {}),
    "RMSprop": ("RMSprop", {}),
    "Adam": ("Adam", {}),
    "AdamW": ("AdamW", {"weight_decay": 0.01}),
    "NAdam": ("NAdam", {}),
    "RAdam": ("RAdam", {}),
    "Adamax": ("Adamax", {}),
}


def rosenbrock(xy):
    x, y = xy[0], xy[1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def saddle(xy):
    return xy[0] ** 2 - xy[1] ** 2


# name -> (function, start, minimum or None, plot window (x0, x1, y0, y1), learning rates, log-scaled contours)
SURFACES = {
    "Rosenbrock ravine": (
        rosenbrock,
        (-1.2, 1.0),
        (1.0, 1.0),
        (-2.0, 2.0, -1.0, 3.0),
        {"SGD": 1.5e-3, "SGD momentum": 1e-3, "Nesterov": 1e-3, "Adagrad": 1.0, "Adadelta": 10.0, "RMSprop": 0.02,
         "Adam": 0.1, "AdamW": 0.1, "NAdam": 0.1, "RAdam": 0.005, "Adamax": 0.5},
        True,
    ),
    "saddle x^2 - y^2": (
        saddle,
        (-1.5, 1e-3),
        None,
        (-2.0, 2.0, -2.0, 2.0),
        {"SGD": 0.05, "SGD momentum": 0.01, "Nesterov": 0.01, "Adagrad": 0.2, "Adadelta": 5.0, "RMSprop": 0.01,
         "Adam": 0.05, "AdamW": 0.05, "NAdam": 0.05, "RAdam": 0.05, "Adamax": 0.05},
        False,
    ),
}  # fmt: skip

MLP_LR = {"SGD": 0.1, "SGD momentum": 0.02, "Nesterov": 0.02, "Adagrad": 0.1, "Adadelta": 1.0, "RMSprop": 0.005,
          "Adam": 0.01, "AdamW": 0.01, "NAdam": 0.01, "RAdam": 0.01, "Adamax": 0.02}  # fmt: skip
DATA = 16  # points in the regression data set
REGIMES = {"batch": DATA, "mini-batch": 4, "stochastic": 1}  # batch sizes


def make(label: str, params, lr: float) -> fused_optim.FusedOptimizer:
    name, kwargs = OPTIMIZERS[label]
    return getattr(fused_optim, name)(params, lr=lr, **kwargs)


def path_on(surface: str, label: str, steps: int) -> torch.Tensor:
    fn, start, _, window, lrs, _ = SURFACES[surface]
    xy = torch.tensor(start, dtype=torch.float32, device=DEVICE, requires_grad=True)
    opt = make(label, [xy], lrs[label])
    points = [xy.detach().clone()]
    for _ in range(steps):
        opt.zero_grad()
        fn(xy).backward()
        opt.step()
        points.append(xy.detach().clone())
        if not torch.isfinite(xy).all() or xy.detach().abs().max() > 10 * max(map(abs, window)):
            break  # left the picture for good
    return torch.stack(points).cpu().numpy()


class FlatMLP(torch.nn.Module):
    """1 -> 16 -> 16 -> 1 tanh MLP whose weights are views into one parameter tensor, so that a
    step is one kernel program (the interpreter runs programs one by one)."""

    def __init__(self):
        super().__init__()
        layers = [torch.nn.Linear(1, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 1)]  # torch's usual init
        tensors = [t.detach() for layer in layers for t in (layer.weight, layer.bias)]
        self.shapes = [t.shape for t in tensors]
        self.flat = torch.nn.Parameter(torch.cat([t.reshape(-1) for t in tensors]))
        sizes = [t.numel() for t in tensors]
        self.bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]

    def forward(self, x):
        w = [self.flat[a:b].view(s) for a, b, s in zip(self.bounds, self.bounds[1:], self.shapes)]
        h = torch.tanh(torch.nn.functional.linear(x, w[0], w[1]))
        h = torch.tanh(torch.nn.functional.linear(h, w[2], w[3]))
        return torch.nn.functional.linear(h, w[4], w[5])


def train_mlp(label: str, batch: int, epochs: int) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    x = torch.linspace(-1, 1, DATA).unsqueeze(1)
    y = torch.sin(3 * x) + 0.1 * torch.randn(x.shape, generator=gen)
    x, y = x.to(DEVICE), y.to(DEVICE)
    torch.manual_seed(0)  # the same initial weights for every optimizer and regime
    model = FlatMLP().to(DEVICE)
    opt = make(label, model.parameters(), MLP_LR[label])
    losses = [torch.nn.functional.mse_loss(model(x), y).item()]
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen).to(DEVICE)
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
            opt.step()
        with torch.no_grad():
            losses.append(torch.nn.functional.mse_loss(model(x), y).item())
    return losses


FAMILIES = {
    "SGD family, Adagrad, Adadelta, RMSprop": ["SGD", "SGD momentum", "Nesterov", "Adagrad", "Adadelta", "RMSprop"],
    "Adam family": ["Adam", "AdamW", "NAdam", "RAdam", "Adamax"],
}
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def plot_paths(paths: dict, out: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(FAMILIES), len(SURFACES), figsize=(6.5 * len(SURFACES), 5.6 * len(FAMILIES)))
    for col, (surface, (fn, start, minimum, (x0, x1, y0, y1), lrs, log)) in enumerate(SURFACES.items()):
        gx, gy = torch.meshgrid(torch.linspace(x0, x1, 300), torch.linspace(y0, y1, 300), indexing="xy")
        z = fn(torch.stack([gx, gy]))
        for row, (family, labels) in enumerate(FAMILIES.items()):
            ax = axes[row][col]
            ax.contour(gx, gy, torch.log10(z + 1e-3) if log else z, levels=25, cmap="Greys", linewidths=0.6)
            for color, label in zip(COLORS, labels):
                path = paths[surface][label]
                ax.plot(path[:, 0], path[:, 1], "-", color=color, lw=1.6, label=f"{label} (lr {lrs[label]:g})")
                ax.plot(path[-1, 0], path[-1, 1], "o", color=color, ms=5)
            ax.plot(*start, "k*", ms=13, label="start")
            if minimum is not None:
                ax.plot(*minimum, "kX", ms=10, label="minimum")
            ax.set_xlim(x0, x1)
            ax.set_ylim(y0, y1)
            ax.set_title(f"{surface}, {steps} steps: {family}", fontsize=10)
            ax.legend(fontsize=8, loc="lower right" if col == 0 else "lower left")
    fig.suptitle(f"fused_optim on 2-D surfaces from the same start ({_where()})", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=70)
    plt.close(fig)


def plot_training(curves: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = -(-len(OPTIMIZERS) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), sharex=True, sharey=True, squeeze=False)
    for ax, label in zip(axes.flat, OPTIMIZERS):
        for regime, losses in curves[label].items():
            ax.plot(losses, label=f"{regime} ({REGIMES[regime]})")
        ax.set_yscale("log")
        ax.set_title(f"{label}, lr {MLP_LR[label]}", fontsize=10)
        ax.grid(True, alpha=0.3)
    for ax in axes.flat[len(OPTIMIZERS) :]:
        ax.axis("off")
    axes[0][0].legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    for row in axes:
        row[0].set_ylabel(f"MSE on all {DATA} points")
    fig.suptitle(f"MLP regression, batch vs mini-batch vs stochastic, per optimizer ({_where()})", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def run(label: str, steps: int, epochs: int):
    """Everything the pictures need from one optimizer: its paths and its loss curves."""
    paths = {surface: path_on(surface, label, steps) for surface in SURFACES}
    curves = {regime: train_mlp(label, batch, epochs) for regime, batch in REGIMES.items()}
    return paths, curves


def run_all(steps: int, epochs: int, workers: int) -> dict:
    if workers <= 1:
        return {label: run(label, steps, epochs) for label in OPTIMIZERS}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from itertools import repeat

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(zip(OPTIMIZERS, pool.map(run, OPTIMIZERS, repeat(steps), repeat(epochs))))


def _where() -> str:
    if DEVICE.type == "cuda":
        return f"Triton kernels on {torch.cuda.get_device_name()}"
    return "Triton kernels on CPU through the interpreter"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trajectories", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--steps", type=int, default=300, help="steps on each surface")
    parser.add_argument("--epochs", type=int, default=15, help="epochs of the MLP regression")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "demo")
    cores = 1 if DEVICE.type == "cuda" else min(4, os.cpu_count() or 1)
    parser.add_argument("--workers", type=int, default=cores, help="processes (default: CPU cores up to 4; 1 on CUDA)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = run_all(args.steps, args.epochs, args.workers)
    paths = {surface: {label: results[label][0][surface] for label in OPTIMIZERS} for surface in SURFACES}
    curves = {label: results[label][1] for label in OPTIMIZERS}
    plot_paths(paths, args.out / "trajectories.png", args.steps)
    plot_training(curves, args.out / "training.png")
    for surface, found in paths.items():
        ends = ", ".join(f"{label} ({p[-1, 0]:.2f}, {p[-1, 1]:.2f})" for label, p in found.items())
        print(f"{surface}, where each optimizer ended: {ends}")
    for label, regimes in curves.items():
        finals = ", ".join(f"{r} {losses[-1]:.4f}" for r, losses in regimes.items())
        print(f"MLP loss after {args.epochs} epochs, {label}: {finals}")
    took = time.perf_counter() - start
    print(f"wrote {args.out / 'trajectories.png'} and {args.out / 'training.png'} in {took:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
