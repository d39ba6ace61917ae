"""``python -m benchmarks``: parity with torch.optim, then the roofline suite.

Every point runs fused_optim next to what users would otherwise pick, in the same process:
torch's for-loop (``foreach=False``), foreach and fused implementations, ``torch.compile``d
``opt.step`` (compile time reported separately), and a device-to-device copy of the same number
of bytes as the ceiling. The optimizers beyond torch.optim (LAMB, LARS, Lion, AdEMAMix,
StableAdamW, ScheduleFreeAdamW) run next to their reference implementations instead, in every
variant each offers, and ``torch.compile`` of one (``benchmarks/baselines.py``). Bytes per step
come from ``FusedOptimizer.bytes_per_step()``: every param, grad and state element read once,
every param and state element written once, at their real element sizes; where an algorithm's
kernels read an array more than once, what they move (Adafactor's passes over tiles; Muon's two
launches, its Newton-Schulz matmuls not counted; the sums pass of LAMB, LARS and StableAdamW). The
``muon`` workload times ``torch.optim.Muon``'s per-param loop against fused_optim's batched
Newton-Schulz, and each one's Newton-Schulz share. Without CUDA everything runs tiny through
Triton's interpreter and torch on CPU, and the output says these are not performance figures.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import inspect
import json
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import triton

import fused_optim
from fused_optim.kernels import INTERPRETED

from . import baselines, features, toolchain
from .parity import parity_table
from .timing import copy_gbps, device_time_ms, grad_swapper, host_time_us, kernels_skipped, kernels_skipped_for
from .workloads import ALGORITHMS, MATRIX_ALGORITHMS, WORKLOAD_ALGORITHMS, Point, plan

PROVIDERS = ("fused_optim", "torch for-loop", "torch foreach", "torch fused", "torch.compile")
GRAPH = "fused_optim graph"  # host workload only: the step captured once in a CUDA graph, then replayed
TORCH_FUSED = {"Adam", "AdamW", "SGD", "Adagrad"}  # torch.optim classes with fused=True
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEADERS = {
    "sizes": "size sweep, 64 tensors",
    "counts": "the same total split into more and more tensors",
    "models": "real model parameter lists",
    "algorithms": "every algorithm at one size",
    "features": "AdamW with a training feature on, against the torch recipe for the same",
    "muon": "Muon on transformer matrices, torch's per-param loop against batched Newton-Schulz",
}
LEGENDS = {
    "muon": "MB/step counts the element-wise launches, not Newton-Schulz's matmuls; NS ms: ms/step minus\n"
    "  ms/step with Newton-Schulz skipped, the Newton-Schulz share of the step",
}
MUON_WORKLOADS = {"muon"}  # need torch.optim.Muon (torch >= 2.9)


@dataclass
class Row:
    workload: str
    point: str
    algorithm: str
    provider: str
    n_params: int
    n_tensors: int
    dtype: str
    bytes_per_step: int
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    gbps: float | None = None
    copy_gbps: float | None = None
    pct_of_copy: float | None = None
    compile_s: float | None = None
    host_us: float | None = None
    host_us_new_grads: float | None = None
    ns_ms: float | None = None  # muon: median_ms minus the median with Newton-Schulz skipped
    state_bytes_per_param: float | None = None  # features: the optimizer's state memory (step counts included)
    note: str = ""


def _params(shapes, device, dtype, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.randn(s, generator=gen, device=device, dtype=dtype).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device, dtype=dtype)
    return params


def _step_fn(provider: str, name: str, params):
    """(step callable, compile seconds or None), or raise when torch has no such implementation."""
    kwargs = ALGORITHMS[name]
    if provider == "fused_optim":
        opt = baselines.ready(name, getattr(fused_optim, name)(params, **kwargs))
        return opt.step, None
    if provider == GRAPH:
        return _graph_step(name, params), None
    if name in baselines.REFERENCES:  # beyond torch.optim: its reference implementation's variants
        if provider != "torch.compile":
            return baselines.build(name, params, kwargs, provider).step, None
        step = baselines.compiled(name, params, kwargs)
        compile_s = _first_call(step, params)
        step()  # the state made: a second compile may follow, as for torch.optim's classes
        guard = baselines.recompiles(step)
        if guard is not None:
            raise NotImplementedError(
                f"of {baselines.compiled_label(name)}: not timed, compiled again at its third step ({guard})"
            )
        return step, compile_s
    torch_cls = getattr(torch.optim, name)
    has_foreach = "foreach" in inspect.signature(torch_cls).parameters  # not Muon: a per-param loop only
    if provider == "torch for-loop":
        return torch_cls(params, **({"foreach": False} if has_foreach else {}), **kwargs).step, None
    if provider == "torch foreach":
        if not has_foreach:
            raise NotImplementedError(f"torch.optim.{name} has no foreach implementation")
        return torch_cls(params, foreach=True, **kwargs).step, None
    if provider == "torch fused":
        if name not in TORCH_FUSED:
            raise NotImplementedError(f"torch.optim.{name} has no fused implementation")
        return torch_cls(params, fused=True, **kwargs).step, None
    opt = torch_cls(params, **kwargs)

    @torch.compile(fullgraph=False)
    def compiled_step():
        opt.step()

    return compiled_step, _first_call(compiled_step, params)


def _first_call(step, params) -> float:
    """Seconds the first call of a compiled step takes (the compile, mostly)."""
    start = time.perf_counter()
    step()
    _sync(params[0].device)
    return time.perf_counter() - start


def _graph_step(name: str, params):
    """fused_optim's step captured in a CUDA graph (``capturable=True`` where the algorithm has
    step state): each call is one ``replay()``, the way to take the per-tensor Python checks out
    of the step. The graph reads the grads where they were at capture."""
    if params[0].device.type != "cuda":
        raise NotImplementedError("CUDA graphs need CUDA")
    cls = getattr(fused_optim, name)
    kwargs = dict(ALGORITHMS[name])
    if "capturable" in inspect.signature(cls).parameters:
        kwargs["capturable"] = True
    opt = baselines.ready(name, cls(params, **kwargs))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: layout, tables and compilation happen outside the capture
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    graph.opt = opt  # keep the optimizer (its state buffers) alive as long as the graph
    return graph.replay


@contextlib.contextmanager
def newton_schulz_skipped(provider: str):
    """Muon's Newton-Schulz replaced by a no-op (the update applied as it is) in fused_optim's
    step or in torch's: the step's time minus the time in here is its Newton-Schulz share."""
    if provider == "fused_optim":
        target, attr, skip = fused_optim.Muon, "_orthogonalize", lambda self, *args: None
    else:
        import torch.optim._muon as target

        attr, skip = "_zeropower_via_newtonschulz", lambda update, *args: update
    saved = getattr(target, attr)
    setattr(target, attr, skip)
    try:
        yield
    finally:
        setattr(target, attr, saved)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release():
    torch._dynamo.reset()  # compiled steps keep their optimizer (and its state) alive otherwise
    if torch.cuda.is_available():  # on CPU the sizes are tiny: a collection (~0.2 s) per provider buys nothing
        gc.collect()
        torch.cuda.empty_cache()


def measure(point: Point, name: str, providers, device, dtype: str, compile_max_tensors: int = 1 << 30) -> list[Row]:
    recipe = features.RECIPES.get(name) if point.workload == "features" else None
    if recipe is not None:
        dtype = next(k for k, v in DTYPES.items() if v == recipe.dtype)
        providers = [p for p in features.PROVIDERS if p in providers] + list(recipe.others)
    params = _params(point.shapes_for(name), device, DTYPES[dtype])
    if recipe is not None:
        probe = fused_optim.AdamW(params, **features.ADAMW, **recipe.fused_kwargs)
        probe.step()
        n_bytes = features.bytes_per_step(name, probe)
    else:
        probe = baselines.ready(name, getattr(fused_optim, name)(params, **ALGORITHMS[name]))
        # the probe only lays out state; on CPU the interpreter would run 1,000 tiny programs for the host point
        with kernels_skipped() if point.workload == "host" and device.type == "cpu" else contextlib.nullcontext():
            probe.step()
        n_bytes = probe.bytes_per_step()
    del probe
    _release()
    ceiling = copy_gbps(n_bytes, device) if point.workload != "host" else None
    base = {
        "workload": point.workload,
        "point": point.label,
        "algorithm": name,
        "n_params": point.n_params,
        "n_tensors": len(point.shapes),
        "dtype": dtype,
        "bytes_per_step": n_bytes,
        "copy_gbps": ceiling,
    }
    rows = []
    if point.workload == "host":
        providers = [*providers, GRAPH]
    elif name in baselines.REFERENCES:  # its reference's variants take the torch.optim providers' places
        ours, compiled = [p for p in providers if p == "fused_optim"], [p for p in providers if p == "torch.compile"]
        providers = [*ours, *baselines.providers(name), *compiled]
    for provider in providers:
        row = Row(provider=provider, **base)
        try:
            if recipe is not None:
                step = features.step_fn(name, provider, params)
                row.note = features.note(name, provider)
            elif provider == "torch.compile" and len(params) > compile_max_tensors:
                row.note = f"not run: {len(params)} tensors > --compile-max-tensors {compile_max_tensors}"
                rows.append(row)
                continue
            else:
                if provider == "torch.compile" and name in baselines.REFERENCES:
                    row.note = f"of {baselines.compiled_label(name)}"
                step, row.compile_s = _step_fn(provider, name, params)
            if point.workload == "host":
                calls = 50 if device.type == "cuda" else 5
                with kernels_skipped_for(provider, device):
                    row.host_us = host_time_us(step, device, calls)
                    if provider == GRAPH:
                        row.note = "replays read the grads captured; new grad tensors need a new capture"
                    else:  # as after zero_grad(set_to_none=True) + backward, when addresses change
                        row.host_us_new_grads = host_time_us(step, device, calls, before=grad_swapper(params))
            else:
                row.median_ms, row.p20_ms, row.p80_ms = device_time_ms(step, device)
                if recipe is not None and isinstance(getattr(step, "__self__", None), torch.optim.Optimizer):
                    row.state_bytes_per_param = features.state_bytes(step.__self__) / point.n_params
                row.gbps = n_bytes / (row.median_ms * 1e-3) / 1e9
                row.pct_of_copy = 100 * row.gbps / ceiling
                if point.workload in MUON_WORKLOADS and provider in ("fused_optim", "torch for-loop"):
                    with newton_schulz_skipped(provider):
                        row.ns_ms = row.median_ms - device_time_ms(step, device)[0]
        except Exception as err:  # a provider torch does not offer here: recorded, not fatal
            row.note = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        rows.append(row)
        step = None
        _release()
    return rows


def _device(device) -> tuple[str, str]:
    """(name, slug for the results folder)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.machine()} (Triton {'interpreter' if INTERPRETED else 'not used'})"
    slug = "cpu-interpreter" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return name, slug


def _print_rows(rows: list[Row]) -> None:
    by_case: dict[tuple, list[Row]] = {}
    for row in rows:
        by_case.setdefault((row.workload, row.point, row.algorithm), []).append(row)
    for (workload, point, algorithm), case in by_case.items():
        fused = next((r for r in case if r.provider == "fused_optim"), None)
        label = point + (" (as matrices)" if workload == "algorithms" and algorithm in MATRIX_ALGORITHMS else "")
        head = f"  {algorithm:<17} {label:<40} {case[0].bytes_per_step / 1e6:10.1f} MB/step"
        if workload == "host":
            print(head)
            print(f"      {'provider':<18}{'same grads':>12}{'new grads':>12}")
            for r in case:
                if r.host_us is None:
                    print(f"      {r.provider:<18}  {r.note}")
                    continue
                moved = f"{r.host_us_new_grads:9.1f} us" if r.host_us_new_grads is not None else f"{'-':>12}"
                print(f"      {r.provider:<18}{r.host_us:9.1f} us{moved}")
            continue
        print(f"{head}   copy {case[0].copy_gbps:8.1f} GB/s")
        ns = any(r.ns_ms is not None for r in case)
        memory = any(r.state_bytes_per_param is not None for r in case)
        extra = f"{'NS ms':>10}" if ns else f"{'state B/param':>14}" if memory else ""
        columns = f"{'ms/step':>10}{extra}{'GB/s':>10}{'% copy':>9}{'fused speedup':>15}{'compile s':>11}"
        width = max(16, *(len(r.provider) + 1 for r in case))  # reference labels name their package
        print(f"      {'provider':<{width}}{columns}")
        for r in case:
            if r.median_ms is None:
                print(f"      {r.provider:<{width}}  {r.note}")
                continue
            note = f"  ({r.note})" if r.note else ""
            ratio = f"{r.median_ms / fused.median_ms:14.2f}x" if fused and fused.median_ms else ""
            comp = f"{r.compile_s:11.1f}" if r.compile_s is not None else ""
            share = (f"{r.ns_ms:10.4f}" if r.ns_ms is not None else f"{'-':>10}") if ns else ""
            if memory:
                share = f"{r.state_bytes_per_param:14.2f}" if r.state_bytes_per_param is not None else f"{'-':>14}"
            timing = f"{r.median_ms:10.4f}{share}{r.gbps:10.1f}{r.pct_of_copy:8.1f}%"
            print(f"      {r.provider:<{width}}{timing}{ratio:>15}{comp:>11}{note}")


def _plot(rows: list[Row], workload: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    selected = [r for r in rows if r.workload == workload and r.gbps is not None]
    algorithms = list(dict.fromkeys(r.algorithm for r in selected))
    if not algorithms:
        return
    fig, axes = plt.subplots(1, len(algorithms), figsize=(5 * len(algorithms), 4), squeeze=False)
    for ax, name in zip(axes[0], algorithms):
        mine = [r for r in selected if r.algorithm == name]
        xs = sorted({_x(r, workload) for r in mine})
        for provider in PROVIDERS:
            points = sorted((_x(r, workload), r.gbps) for r in mine if r.provider == provider)
            if points:
                ax.plot(*zip(*points), marker="o", label=provider)
        copy = sorted({(_x(r, workload), r.copy_gbps) for r in mine})
        ax.plot(*zip(*copy), linestyle="--", color="black", label="copy, same bytes")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_title(name)
        if workload == "sizes":
            ax.set_xlabel(f"params ({mine[0].n_tensors} tensors)")
        else:
            ax.set_xlabel(f"tensors ({mine[0].n_params:,} params in all)")
        ax.set_ylabel("GB/s (bytes read + written)")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _earlier(out: Path, device: str, workloads: list[str]) -> tuple[list[Row], dict]:
    """The rows and ``runs`` entries an earlier run on the same device left in ``out`` for other
    workloads than these (the suite is often run a workload per call): kept beside the new ones."""
    try:
        old = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return [], {}
    if old.get("meta", {}).get("device") != device:
        return [], {}
    names = {f.name for f in fields(Row)}
    kept = [Row(**{k: v for k, v in r.items() if k in names}) for r in old.get("rows", [])]
    runs = {w: m for w, m in old.get("runs", {}).items() if w not in workloads}
    return [r for r in kept if r.workload not in workloads], runs


def _save(out: Path, meta: dict, runs: dict, rows: list[Row]) -> None:
    """Write results.json (``runs``: the command and date that measured each workload) and results.csv."""
    out.mkdir(parents=True, exist_ok=True)
    results = {"meta": meta, "runs": runs, "rows": [asdict(r) for r in rows]}
    tmp = out / "results.json.tmp"  # replaced in one step: a run killed while writing keeps the old file
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "results.json")
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in fields(Row)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def _x(row: Row, workload: str) -> int:
    return row.n_params if workload == "sizes" else row.n_tensors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--workloads", default="sizes,counts,models,algorithms,features,host,muon",
                        help="comma-separated subset of sizes,counts,models,algorithms,features,host,muon")  # fmt: skip
    parser.add_argument("--algorithms", default=None, help="comma-separated filter, e.g. Adam,SGD")
    parser.add_argument("--quick", action="store_true", help="fewer and smaller points (CUDA)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time torch.compile'd steps (default: on with CUDA, off on CPU)")  # fmt: skip
    parser.add_argument("--compile-max-tensors", type=int, default=1024,
                        help="skip torch.compile at points with more tensors (slow to compile)")  # fmt: skip
    parser.add_argument("--parity", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<device>)")
    parser.add_argument("--blocks-per-program", type=int, default=None,
                        help="FusedOptimizer._blocks_per_program for this run (tuning)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.blocks_per_program is not None:
        fused_optim.FusedOptimizer._blocks_per_program = args.blocks_per_program

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:  # before anything compiles: a driver older than Triton's ptxas refuses every kernel
        print(toolchain.check())
    name, slug = _device(device)
    out = args.out or Path(__file__).parent / "results" / slug
    compile_ok = cuda if args.compile is None else args.compile
    providers = [p for p in PROVIDERS if compile_ok or p != "torch.compile"]
    only = set(args.algorithms.split(",")) if args.algorithms else None
    command = " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])])
    meta = {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "fused_optim": fused_optim.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "blocks_per_program": fused_optim.FusedOptimizer._blocks_per_program,
        "performance_figures": cuda,
    }
    print("fused_optim benchmarks")
    print(" | ".join(f"{k}: {v}" for k, v in meta.items() if k != "performance_figures"))
    if not cuda:
        print("NOTE: no CUDA. Kernels run on CPU through Triton's interpreter and torch runs on CPU, at tiny")
        print("sizes: the timings below are NOT performance figures. Host times of fused_optim leave out")
        print("the kernels (the interpreter runs them inside the launch).")

    if args.parity:
        print()
        if cuda:
            parity_table(device, 2**20, tensors=64, steps=10)
        else:
            parity_table(device, 2**12, tensors=8, steps=4)

    points = plan(cuda, args.quick)
    workloads = args.workloads.split(",")
    if not hasattr(torch.optim, "Muon"):
        for workload in MUON_WORKLOADS & set(workloads):
            print(f"\n{workload}: skipped (torch.optim.Muon needs torch >= 2.9; this is torch {torch.__version__})")
            points[workload] = []
    tasks = [
        (workload, point, algo)
        for workload in workloads
        for point in points[workload]
        for algo in WORKLOAD_ALGORITHMS[workload]
        if only is None or algo in only or (workload == "features" and "AdamW" in only)
    ]
    rows: list[Row] = []
    from tqdm import tqdm

    kept, runs = _earlier(out, name, workloads)
    runs.update(dict.fromkeys(workloads, meta))
    for _, point, algo in tqdm(tasks, desc="measuring", unit="case", file=sys.stderr, disable=None):
        rows += measure(point, algo, providers, device, args.dtype, args.compile_max_tensors)
        _save(out, meta, runs, kept + rows)  # after every case: a run cut short keeps what it measured

    for workload in workloads:
        mine = [r for r in rows if r.workload == workload]
        if mine:
            what = "host time of the step() call, device idle" if workload == "host" else HEADERS[workload]
            print(f"\n== {workload}, {args.dtype}: {what}")
            if workload in LEGENDS:
                print(f"  ({LEGENDS[workload]})")
            _print_rows(mine)

    every = kept + rows
    _save(out, meta, runs, every)  # also when no case was selected
    if args.plots:
        title = f"{name}, {args.dtype}, torch {torch.__version__}, triton {triton.__version__}, {meta['date'][:10]}"
        if not cuda:
            title += ": NOT performance figures"
        _plot(every, "sizes", title, out / "sizes.png")
        _plot(every, "counts", title, out / "counts.png")
    print(f"\nresults: {out}")
    return 0
