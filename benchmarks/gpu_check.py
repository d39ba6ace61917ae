"""``python -m benchmarks.gpu_check --out DIR``: the GPU proof, prepared to run in one call.

Parts, in order; each one's outcome is written to ``DIR/parts.json`` and ``DIR/log.txt`` as it
ends, so a call cut short keeps what ran, and ``--parts`` reruns only some:

* ``toolchain``: the driver against Triton's ptxas (``benchmarks/toolchain.py``, which points
  Triton at a compatible ptxas when needed), the device and the versions; the native reads
  built (``fused_optim/_native.py``), or why not.
* ``tests``: the test suite on CUDA: every algorithm, dtype and option against torch.optim on the
  GPU, the training features, CUDA graph capture and replay (static grads with a scheduler; a
  whole training step with grads allocated in the graph), misaligned, non-contiguous and
  channels-last params, FSDP2/DDP, two GPUs where present. The lowest-Triton side environment
  needs a package registry, which the GPU machine lacks: those tests are left out.
* ``large``: one bf16 tensor of more than 2^31 elements, two AdamW steps, checked chunk by chunk
  against torch's fp32 arithmetic rounded to bf16 (64-bit offsets, the last elements included).
* ``bench``: the benchmark workloads (``python -m benchmarks``), one subprocess each, merged in
  ``DIR/results.json``; then the host cost at 1,000 and 10,000 tensors and under FSDP2
  (``python -m benchmarks.host``, ``DIR/host.json``).
* ``summary``: one line per target of ``benchmarks/RESULTS.md``: met, or missed by how much.

``--dry-run`` runs every part on CPU through Triton's interpreter on tiny sizes (CI does, so the
script cannot fail on the GPU for a reason visible here). Each part runs in a subprocess with a
time limit (``--budget`` seconds in all, split as ``BUDGET``).

The GPU machine has no package registry: the reference packages some tests compare against
(lion-pytorch, pytorch_optimizer, torch-optimi, schedulefree; pure Python) travel with the working
tree when ``--stage-deps`` has copied them into ``.gpu_deps/`` (git-ignored; carry it), which the
parts then find on ``PYTHONPATH``. Without them those test modules are skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPS = ROOT / ".gpu_deps"  # the tests' reference packages, staged by --stage-deps
REFERENCE_PACKAGES = ("lion_pytorch", "pytorch_optimizer", "optimi", "schedulefree")
PARTS = ("toolchain", "tests", "large", "bench", "summary")
BUDGET = {"toolchain": 0.07, "tests": 0.42, "large": 0.1, "bench": 0.39, "summary": 0.02}  # shares of --budget
TOOLCHAIN_FLOOR = 60  # seconds: torch and CUDA start, and the native reads compile (about 10 s on 2 cores)
# the cheap workloads that feed most targets first: the per-algorithm speedups, the host time
WORKLOADS = ("algorithms", "host", "sizes", "counts", "features", "models", "muon")
DRY_TESTS = ["tests/test_launches.py", "-k", "capture or guard"]  # the suite itself runs in CI anyway
DRY_WORKLOADS = ("algorithms", "host")  # the runner's every workload is smoke-tested in CI


def _env(dry_run: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONUNBUFFERED"] = "1"
    if DEPS.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(DEPS), env.get("PYTHONPATH")]))
    if dry_run:  # really on CPU, also on a GPU machine
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _run(cmd: list[str], timeout: float, dry_run: bool, log: Path) -> tuple[int, str]:
    """Run ``cmd`` from the repository root, its output appended to the log; (exit code, last lines)."""
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        # a session of its own: a timeout kills the whole tree (pytest's xdist workers, their jobs)
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=_env(dry_run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=max(timeout, 1))
            code = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)  # pytest then prints its summary of what ran
            try:
                out, _ = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
            out, code = out + f"\n[timed out after {timeout:.0f} s]\n", 124
        f.write(out)
    _clear_build_locks()
    return code, "\n".join(out.strip().splitlines()[-12:])


def _clear_build_locks() -> None:
    """torch's extension builder waits forever on a build lock that a killed process left; parts
    run one at a time, so a lock still there when one ends is stale (fused_optim/_native.py)."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    for lock in root.glob("*/fused_optim_native_*/lock"):
        lock.unlink(missing_ok=True)


def stage_deps() -> str:
    """Copy the installed reference packages into ``.gpu_deps/`` (run where they are installed)."""
    import shutil

    DEPS.mkdir(exist_ok=True)
    staged = []
    for name in REFERENCE_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        shutil.copytree(Path(next(iter(spec.submodule_search_locations))), DEPS / name, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        staged.append(name)
    return f"staged in {DEPS}: {', '.join(staged) or 'nothing'}"


# --- parts ----------------------------------------------------------------------------------------
def part_toolchain(args, timeout: float) -> tuple[bool, str]:
    code = (
        "import torch, triton, platform; from benchmarks import toolchain; print(toolchain.check()); "
        "print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, "
        "'python', platform.python_version()); "
        "print([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or 'no CUDA device'); "
        # built here, once, before the tests' workers need it (about 10 s; a C++ compiler and ninja)
        "from fused_optim import _native; "
        "print('native reads:', 'built' if _native.module() is not None else 'NOT built: ' + _native.reason)"
    )
    rc, tail = _run([sys.executable, "-c", code], max(timeout, TOOLCHAIN_FLOOR), args.dry_run, args.log)
    if "native reads: built" not in tail:  # later parts take the Python reads rather than build again
        os.environ["FUSED_OPTIM_NATIVE"] = "0"
    return rc == 0, tail


def part_tests(args, timeout: float) -> tuple[bool, str]:
    select = DRY_TESTS if args.dry_run else ["tests", "-k", "not lowest"]
    # every failure reported (not -x); compiling is CPU-bound, so pytest-xdist workers where installed
    extra = ["-n", "8"] if not args.dry_run and importlib.util.find_spec("xdist") else []
    if importlib.util.find_spec("pytest_timeout"):
        extra += ["--timeout=150"]
    # -v: each result as it comes (xdist's lines), so a part cut short still says what failed
    cmd = [sys.executable, "-m", "pytest", "-v", "--maxfail=30", "-p", "no:cacheprovider", "-rs", "--durations=15"]
    cmd += [*extra, *select]
    rc, tail = _run(cmd, timeout, args.dry_run, args.log)
    return rc == 0, tail


LARGE = """
import sys, torch, fused_optim
n = int(sys.argv[1])
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gen = torch.Generator(device=device).manual_seed(0)
p = torch.nn.Parameter(torch.randn(n, device=device, generator=gen, dtype=torch.bfloat16))
start = p.detach().clone()
opt = fused_optim.AdamW([p], lr=1e-2, weight_decay=0.1)
grads = [torch.randn(n, device=device, generator=gen, dtype=torch.bfloat16) for _ in range(2)]
for g in grads:
    p.grad = g
    opt.step()
chunk, worst = 1 << 26, 0
for lo in range(0, n, chunk):  # torch's fp32 arithmetic on the same chunk, rounded to bf16 after each step
    hi = min(lo + chunk, n)
    q = torch.nn.Parameter(start[lo:hi].float())
    ref = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1, foreach=False)
    for g in grads:
        q.grad = g[lo:hi].float()
        ref.step()
        with torch.no_grad():
            q.copy_(q.bfloat16().float())
            for v in ref.state[q].values():
                if v.dim():
                    v.copy_(v.bfloat16().float())
    # bf16 ulps of the operands' size (a result that cancels to near 0 keeps their rounding error)
    ulp = torch.finfo(torch.bfloat16).eps * torch.maximum(q.abs(), start[lo:hi].float().abs()).clamp_min(1e-2)
    worst = max(worst, ((p.detach()[lo:hi].float() - q.detach()).abs() / ulp).max().item())
moved = (p.detach()[-1024:] != start[-1024:]).float().mean().item()
print(f"{n} elements ({n * 2 / 2**30:.2f} GiB of bf16 params): worst difference {worst:.2f} ulp; "
      f"{moved:.0%} of the last 1,024 elements moved")
assert worst <= 2 and moved > 0.8, (worst, moved)
"""


def part_large(args, timeout: float) -> tuple[bool, str]:
    n = 4096 + 3 if args.dry_run else (1 << 31) + (1 << 20) + 3
    rc, tail = _run([sys.executable, "-c", LARGE, str(n)], timeout, args.dry_run, args.log)
    return rc == 0, tail


def part_bench(args, timeout: float) -> tuple[bool, str]:
    deadline, lines, ok = time.monotonic() + timeout, [], True
    quick = ["--quick"] if args.quick else []
    for i, workload in enumerate(DRY_WORKLOADS if args.dry_run else WORKLOADS):
        left = deadline - time.monotonic()
        if left < 5:
            lines.append(f"{workload}: not run, out of time")
            ok = False
            continue
        extra = [] if i == 0 else ["--no-parity"]  # parity with torch.optim once, with the first workload
        extra += ["--no-compile"]  # no target needs torch.compile, whose cold compiles would eat the budget
        extra += ["--no-plots"]  # at most 8 files come back from the device machine
        cmd = [sys.executable, "-m", "benchmarks", "--workloads", workload, "--out", str(args.out), *quick, *extra]
        rc, _ = _run(cmd, left, args.dry_run, args.log)
        lines.append(f"{workload}: {'done' if rc == 0 else f'failed ({rc})'}")
        ok &= rc == 0
    # the host cost at scale and under FSDP2 (gloo on CPU), benchmarks/host.py
    left = deadline - time.monotonic()
    host = ["--tensors", "100", "--fsdp-params", "20", "--calls", "3"] if args.dry_run else []
    if left < 5:
        lines.append("host (benchmarks.host): not run, out of time")
        return False, "\n".join(lines)
    rc, _ = _run([sys.executable, "-m", "benchmarks.host", *host, "--out", str(args.out / "host.json")], left,
                 args.dry_run, args.log)  # fmt: skip
    lines.append(f"host (benchmarks.host): {'done' if rc == 0 else f'failed ({rc})'}")
    return ok and rc == 0, "\n".join(lines)


def part_summary(args, timeout: float) -> tuple[bool, str]:
    try:
        results = json.loads((args.out / "results.json").read_text())
    except (OSError, ValueError) as err:
        return False, f"no results.json: {err}"
    lines = targets(results["rows"])
    try:
        from benchmarks.host import targets as host_targets

        host = json.loads((args.out / "host.json").read_text())
        lines += [f"{t}: {'met' if met else 'missed'}; {m}" for t, met, m in host_targets(host["rows"])]
    except (OSError, ValueError) as err:
        lines.append(f"host cost (benchmarks.host): not measured ({err})")
    if not results.get("meta", {}).get("performance_figures"):
        lines.insert(0, "not performance figures (no CUDA): the checks below only prove the summary runs")
    (args.out / "summary.txt").write_text("\n".join(lines) + "\n")
    return True, "\n".join(lines)


# --- targets --------------------------------------------------------------------------------------
def _best(rows, **match):
    return [r for r in rows if all(r.get(k) == v for k, v in match.items()) and r.get("median_ms")]


def _ratio_line(name: str, goal: float, pairs: list[tuple[str, float | None]]) -> str:
    measured = [(label, v) for label, v in pairs if v is not None]
    if not measured:
        return f"{name}: not measured"
    worst = min(v for _, v in measured)
    verdict = "met" if worst >= goal else f"missed by {100 * (goal - worst) / goal:.1f}%"
    detail = ", ".join(f"{label} {v:.2f}x" for label, v in measured)
    return f"{name} (>= {goal:g}x): {verdict}; {detail}"


def _speedup(rows, workload: str, algorithm: str, other: str, **match) -> float | None:
    ours = _best(rows, workload=workload, algorithm=algorithm, provider="fused_optim", **match)
    theirs = _best(rows, workload=workload, algorithm=algorithm, provider=other, **match)
    if not ours or not theirs:
        return None
    return min(t["median_ms"] for t in theirs) / min(o["median_ms"] for o in ours)


def targets(rows: list[dict]) -> list[str]:
    """One line per target of benchmarks/RESULTS.md, from the runner's rows."""
    lines = []
    big = [r for r in rows if r["workload"] == "sizes" and r["provider"] == "fused_optim" and r.get("pct_of_copy")]
    big = [r for r in big if r["n_params"] >= 1 << 26] or []
    if big:
        worst = min(r["pct_of_copy"] for r in big)
        verdict = "met" if worst >= 93 else f"missed by {93 - worst:.1f} points"
        lines.append(f">= 93% of copy bandwidth at >= 64M params: {verdict}; worst {worst:.1f}%")
    else:
        lines.append(">= 93% of copy bandwidth at >= 64M params: not measured (no point that large)")
    fused = [(a, _speedup(rows, "algorithms", a, "torch fused")) for a in ("Adam", "AdamW", "SGD")]
    lines.append(_ratio_line("vs torch fused (Adam, AdamW, SGD)", 1.10, fused))
    foreach = [(a, _speedup(rows, "algorithms", a, "torch foreach")) for a in ("NAdam", "RAdam", "RMSprop", "Adadelta")]
    foreach.append(("Adamax", _speedup(rows, "algorithms", "Adamax", "torch foreach")))
    lines.append(_ratio_line("vs torch foreach (NAdam, RAdam, RMSprop, Adadelta, Adamax)", 3.0, foreach))
    many = max((r["n_tensors"] for r in rows if r["workload"] == "counts"), default=0)
    small = [(a, _speedup(rows, "counts", a, "torch fused", n_tensors=many)) for a in ("Adam", "AdamW", "SGD")]
    lines.append(_ratio_line(f"vs torch fused with {many:,} tensors", 1.5, small))
    timed = [r for r in rows if r["workload"] == "host" and r.get("host_us")]
    host = [r for r in timed if r["provider"] == "fused_optim"]
    if host:
        us = max(r["host_us"] for r in host)
        verdict = "met" if us <= 50 else f"missed by {us - 50:.0f} us"
        each = ", ".join(f"{r['algorithm']} {r['host_us']:.0f} us" for r in host)
        graph = [r for r in timed if r["provider"] == "fused_optim graph"]
        each += "".join(f"; graph replay ({r['algorithm']}) {r['host_us']:.0f} us" for r in graph)
        lines.append(f"step() host time <= 50 us for 1,000 tensors: {verdict}; {each}")
    else:
        lines.append("step() host time <= 50 us for 1,000 tensors: not measured")
    feats = [r for r in rows if r["workload"] == "features" and r["provider"] == "fused_optim" and r.get("pct_of_copy")]
    if feats:
        detail = ", ".join(f"{r['algorithm']} {r['pct_of_copy']:.0f}%" for r in feats)
        lines.append(f"training features at the fused update's bandwidth (% of copy): {detail}")
    else:
        lines.append("training features: not measured")
    return lines


# --- driver ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", type=Path, help="folder for the log, parts.json and results (required)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all parts together")
    parser.add_argument("--quick", action="store_true", help="the benchmarks' quick points")
    parser.add_argument("--dry-run", action="store_true", help="every part on CPU, tiny, through the interpreter")
    parser.add_argument("--stage-deps", action="store_true", help="copy the reference packages to .gpu_deps, exit")
    args = parser.parse_args(argv)
    if args.stage_deps:
        print(stage_deps())
        return 0
    if args.out is None:
        parser.error("--out is required")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.log = args.out / "log.txt"
    if not args.dry_run:  # every part's subprocess inherits the ptxas choice
        from benchmarks import toolchain

        print(toolchain.check(os.environ), flush=True)
    record_path = args.out / "parts.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    chosen = [p for p in PARTS if p in args.parts.split(",")]
    share = sum(BUDGET[p] for p in chosen)
    failed = []
    for part in chosen:
        start = time.monotonic()
        ok, detail = globals()[f"part_{part}"](args, args.budget * BUDGET[part] / share)
        seconds = time.monotonic() - start
        record[part] = {"ok": ok, "seconds": round(seconds, 1), "detail": detail, "dry_run": args.dry_run,
                        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}  # fmt: skip
        record_path.write_text(json.dumps(record, indent=1))
        print(f"== {part}: {'ok' if ok else 'FAILED'} ({seconds:.0f} s)\n{detail}\n", flush=True)
        if not ok:
            failed.append(part)
    print(f"failed parts: {','.join(failed)} (rerun with --parts)" if failed else "every part passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
