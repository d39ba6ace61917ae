"""The benchmark runner works end to end without a GPU (tiny sizes, interpreter): a smoke test,
not a timing test. Speed goals live in the benchmarks themselves."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Smoke tests that run the benchmark code in this process on CPU tensors through the interpreter,
# which is on only where there is no CUDA; on a GPU machine the GPU proof runs the real workloads.
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="in-process CPU smoke test (the GPU proof benches)")


def _run_module(*args: str) -> str:
    """stdout of ``python -m <args>`` run from the repository, as a user would run it."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the scripts switch the interpreter on themselves without CUDA
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU smoke tests, also on a GPU machine (the GPU proof runs the real thing)
    out = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_runner_end_to_end_on_cpu(tmp_path):
    text = _run_module("benchmarks", "--algorithms", "AdamW", "--out", str(tmp_path))
    assert "NOT performance figures" in text
    assert "Parity after" in text and "AdamW" in text
    for case in ("Rprop", "ASGD", "Adafactor weight_decay=0.01 (matrices)", "Adafactor beta2_decay", "LAMB lr=0.01"):
        assert case in text, case
    for name in ("LARS", "Lion", "AdEMAMix", "StableAdamW", "ScheduleFreeAdamW"):  # against their references
        line = next(line for line in text.splitlines() if line.strip().startswith(name + " "))
        assert "param " in line and "skipped" not in line, line
    if hasattr(torch.optim, "Muon"):
        assert "Muon lr=0.02" in text and "param err fused" in text
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta"]["performance_figures"] is False
    assert results["meta"]["command"].startswith("python -m benchmarks")
    rows = results["rows"]
    assert {r["workload"] for r in rows} == {"sizes", "counts", "models", "algorithms", "features", "host"}
    timed = [r for r in rows if r["workload"] not in ("host", "features")]
    for provider in ("fused_optim", "torch for-loop", "torch foreach", "torch fused"):
        mine = [r for r in timed if r["provider"] == provider]
        assert mine and all(r["median_ms"] > 0 and r["gbps"] > 0 and r["copy_gbps"] > 0 for r in mine), provider
    assert all(r["bytes_per_step"] == 28 * r["n_params"] for r in timed)  # fp32 AdamW
    host = [r for r in rows if r["workload"] == "host"]
    assert all(r["host_us"] > 0 and r["host_us_new_grads"] > 0 for r in host if r["provider"] != "fused_optim graph")
    graph = [r for r in host if r["provider"] == "fused_optim graph"]
    assert graph and all(r["host_us"] is None and "CUDA graphs need CUDA" in r["note"] for r in graph)
    # AdamW with a training feature: bytes per param of the fused update (+ the clip's grad read)
    per_param = {
        "AMP": 28,
        "clip": 32,
        "master bf16": 28,
        "bf16 states": 20,
        "stochastic bf16": 14,
        "capturable": 28,
        "int8 states": 16 + 16 / 256,
        "fp8 states": 16 + 16 / 256,
    }  # fmt: skip (8-bit: 2 fp32 scales / 256)
    recipes = [r for r in rows if r["workload"] == "features"]
    assert {r["algorithm"] for r in recipes} == set(per_param)
    for r in recipes:
        assert r["bytes_per_step"] == per_param[r["algorithm"]] * r["n_params"], r
        if r["provider"] == "fused_optim":
            assert r["median_ms"] > 0 and r["gbps"] > 0, r
        states = {"int8 states": 2 + 8 / 256, "fp8 states": 2 + 8 / 256, "bf16 states": 4}.get(r["algorithm"])
        if states and r["provider"] in ("fused_optim", "torch fused"):  # the state memory (+ step counts)
            expected = states if r["provider"] == "fused_optim" else 8
            assert abs(r["state_bytes_per_param"] - expected) < 0.01, r
    for name in ("results.csv", "sizes.png", "counts.png"):
        assert (tmp_path / name).stat().st_size > 0, name


# bytes per param and step of the optimizers beyond torch.optim (fp32): each array read once and
# written once, plus the sums launch of LAMB (param, grad and both moments read again), LARS (param
# and grad) and StableAdamW (grad and exp_avg_sq)
BEYOND = {"LAMB": 44, "LARS": 28, "Lion": 20, "AdEMAMix": 36, "StableAdamW": 36, "ScheduleFreeAdamW": 28}


@CPU_ONLY
def test_algorithms_workload_counts_what_each_algorithm_moves(tmp_path, capsys):
    """The algorithms workload runs Rprop, ASGD and Adafactor (on matrices of the same sizes as the
    others' vectors, for the factored path) against torch's for-loop and foreach, and the optimizers
    beyond torch.optim against every variant of their reference, with the bytes their kernels move;
    the muon workload times torch's per-param loop against batched Newton-Schulz, and each one's
    Newton-Schulz share."""
    from benchmarks import baselines
    from benchmarks.runner import main
    from benchmarks.workloads import matrices, plan, transformer_matrices

    muon = hasattr(torch.optim, "Muon")
    names = ",".join(["Rprop", "ASGD", "Adafactor", *BEYOND, *(["Muon"] if muon else [])])
    common = ["--no-parity", "--no-plots", "--out", str(tmp_path)]
    assert main(["--workloads", "algorithms,muon", "--algorithms", names, *common]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    point = plan(False, False)["algorithms"][0]
    shapes = point.shapes_for("Adafactor")
    assert shapes == matrices(point.shapes) and all(len(s) == 2 for s in shapes)
    assert point.shapes_for("Rprop") == point.shapes == [(1024,)] * 4
    factors = sum(8 * (r + c) for r, c in shapes)  # row_var and col_var, fp32, read and written once
    per_param = {"Rprop": 28, "ASGD": 20, "Adafactor": 24}  # Adafactor: grad read 3x, param read 2x
    for name, size in per_param.items():
        mine = {r["provider"]: r for r in rows if r["workload"] == "algorithms" and r["algorithm"] == name}
        extra = factors if name == "Adafactor" else 0
        assert all(r["bytes_per_step"] == size * 4096 + extra and r["n_tensors"] == 4 for r in mine.values()), name
        for provider in ("fused_optim", "torch for-loop", "torch foreach"):
            assert mine[provider]["median_ms"] > 0, (name, provider)
        assert "no fused implementation" in mine["torch fused"]["note"]
    for name, size in BEYOND.items():  # against their references, in the same run
        mine = {r["provider"]: r for r in rows if r["workload"] == "algorithms" and r["algorithm"] == name}
        assert list(mine) == ["fused_optim", *baselines.providers(name)], name
        assert all(r["bytes_per_step"] == size * 4096 for r in mine.values()), name
        for provider, r in mine.items():
            if provider.endswith("triton"):  # lion_pytorch's and optimi's Triton paths
                assert r["median_ms"] is None and "runs on CUDA only" in r["note"], r
            else:
                assert r["median_ms"] > 0 and r["note"] == "", r
    if not muon:
        return
    mine = {r["provider"]: r for r in rows if r["workload"] == "muon"}
    n = sum(r * c for r, c in transformer_matrices(4, 16))
    assert all(r["n_params"] == n == 12288 and r["n_tensors"] == 16 and r["algorithm"] == "Muon" for r in mine.values())
    assert all(r["bytes_per_step"] == 36 * n for r in mine.values())  # the two launches; matmuls not counted
    for provider in ("fused_optim", "torch for-loop"):
        assert mine[provider]["median_ms"] > 0 and mine[provider]["ns_ms"] is not None, provider
    assert "no foreach implementation" in mine["torch foreach"]["note"]
    assert "NS ms" in capsys.readouterr().out


@CPU_ONLY
def test_muon_workload_is_skipped_without_torch_muon(tmp_path, monkeypatch, capsys):
    from benchmarks.runner import main

    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    assert main(["--workloads", "muon", "--no-parity", "--no-plots", "--out", str(tmp_path)]) == 0
    assert "muon: skipped (torch.optim.Muon needs torch >= 2.9" in capsys.readouterr().out
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == []


@CPU_ONLY
def test_parity_of_adafactor_and_muon():
    """Adafactor's factored and vector states, and Muon's buffers (fp32 ulps) and params (no
    farther from a float64 Newton-Schulz than torch's), in the benchmarks' parity table."""
    from benchmarks.parity import parity
    from benchmarks.workloads import matrices, split

    cpu = torch.device("cpu")
    shapes = matrices(split(2048, 4))
    factored = parity("Adafactor", {"weight_decay": 0.01}, shapes, cpu, steps=3)
    assert {"param", "step", "row_var", "col_var"} <= factored.keys()
    vectors = parity("Adafactor", {}, split(2048, 4), cpu, steps=3)
    assert {"param", "step", "variance"} <= vectors.keys()
    for worst in (factored, vectors):
        assert all(v < 1e-5 for v in worst.values()), worst
    if hasattr(torch.optim, "Muon"):
        worst = parity("Muon", {"lr": 0.02}, shapes, cpu, steps=3)
        assert worst["momentum_buffer"] < 1e-6 and worst["param"] < 1e-3, worst
        assert worst["param err fused"] <= 1.5 * worst["param err torch"] + 1e-7, worst


@CPU_ONLY
def test_parity_of_the_optimizers_beyond_torch_optim():
    """Each against its reference's for-loop on identical grads, within the fp32 run tolerance of
    their tests (rtol 1e-5); LAMB and LARS against the benchmarks' eager formulas in float64, which
    are tests/test_lamb.py's float64 references' formulas (checked here too)."""
    from test_lamb import Lamb64, Lars64

    from benchmarks.baselines import REFERENCES, EagerLAMB, EagerLARS
    from benchmarks.parity import CASES, parity
    from benchmarks.workloads import split

    cpu = torch.device("cpu")
    beyond = [(name, kwargs) for name, kwargs, _ in CASES if name in REFERENCES]
    assert [name for name, _ in beyond] == list(BEYOND)
    for name, kwargs in beyond:
        worst = parity(name, kwargs, split(2048, 4), cpu, steps=3)
        assert "param" in worst and all(v < 1e-5 for v in worst.values()), (name, worst)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((7, 13), (40,), ())]
    for eager, exact, kwargs in (
        (EagerLAMB, Lamb64, {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-4, "weight_decay": 0.1}),
        (EagerLARS, Lars64, {"lr": 0.3, "momentum": 0.5, "weight_decay": 0.01, "trust_coefficient": 0.02}),
    ):
        params, yardstick = [p.clone().requires_grad_() for p in init], exact(init, **kwargs)
        opt = eager(params, **kwargs)
        for _ in range(4):
            grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            yardstick.step(grads)
        for p, q in zip(params, yardstick.params):
            torch.testing.assert_close(p.detach(), q, rtol=1e-13, atol=1e-14)


@CPU_ONLY
def test_torch_compile_of_references_is_timed_or_says_why(monkeypatch):
    """torch.compile of a reference's step (CUDA only by default) is timed when its third call runs
    without compiling again (the eager LAMB, whose step count is a tensor; Lion; AdEMAMix through
    pytorch_optimizer's own compiled update), and refused, with the failing guard, where a number
    kept in the param groups (schedulefree's ``weight_sum``) makes every step compile again. The
    ``aot_eager`` backend: the guards inductor's graphs get (floats specialized), without its code
    generation."""
    from benchmarks import runner

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: compile_(*args, **{**kwargs, "backend": "aot_eager"}))
    cpu = torch.device("cpu")
    try:
        params = runner._params([(64,)], cpu, torch.float32)
        with pytest.raises(NotImplementedError, match=r"schedulefree foreach: not timed, compiled again at its third"):
            runner._step_fn("torch.compile", "ScheduleFreeAdamW", params)
        for name in ("LAMB", "Lion", "AdEMAMix"):
            step, compile_s = runner._step_fn(
                "torch.compile", name, runner._params([(64,), (3, 5)], cpu, torch.float32)
            )
            assert compile_s > 0
            with torch.compiler.set_stance("fail_on_recompile"):
                step()
    finally:
        runner._release()


def test_demo_paths_are_torch_optims_paths(monkeypatch):
    """The demo's fused optimizers trace the same paths as torch.optim with the same settings."""
    from benchmarks import trajectories as demo

    for surface in demo.SURFACES:
        ours = {label: demo.path_on(surface, label, 25) for label in demo.OPTIMIZERS}
        with monkeypatch.context() as m:
            m.setattr(demo, "fused_optim", torch.optim)
            theirs = {label: demo.path_on(surface, label, 25) for label in demo.OPTIMIZERS}
        for label in demo.OPTIMIZERS:
            assert ours[label].shape == theirs[label].shape, (surface, label)
            np.testing.assert_allclose(ours[label], theirs[label], rtol=1e-5, atol=1e-5, err_msg=f"{surface}, {label}")


def test_demo_end_to_end(tmp_path):
    text = _run_module("benchmarks.trajectories", "--steps", "20", "--epochs", "2", "--out", str(tmp_path))
    for label in ("SGD", "Nesterov", "Adadelta", "RAdam", "Adamax"):
        assert f"{label} (" in text and f"{label}: batch" in text, label
    for name in ("trajectories.png", "training.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name


@CPU_ONLY
def test_runs_of_separate_workloads_add_up_and_compile_can_be_capped(tmp_path, capsys):
    """A workload per call (as on a time-limited GPU) keeps the other workloads' rows; results are
    written as cases finish; torch.compile is skipped, with a note, above --compile-max-tensors."""
    from benchmarks.runner import main

    common = ["--algorithms", "SGD", "--no-parity", "--no-plots", "--out", str(tmp_path)]
    assert main(["--workloads", "host", *common]) == 0
    assert main(["--workloads", "algorithms", "--compile", "--compile-max-tensors", "2", *common]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["runs"]) == {"host", "algorithms"}
    assert "--workloads host" in results["runs"]["host"]["command"]
    rows = results["rows"]
    assert {r["workload"] for r in rows} == {"host", "algorithms"}
    compiled = [r for r in rows if r["provider"] == "torch.compile"]
    assert compiled and all(r["median_ms"] is None and "--compile-max-tensors 2" in r["note"] for r in compiled)
    fused = [r for r in rows if r["workload"] == "algorithms" and r["provider"] == "fused_optim"]
    assert len(fused) == 1 and fused[0]["median_ms"] > 0
    csv_lines = (tmp_path / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == len(rows) + 1
    assert main(["--workloads", "host", *common]) == 0  # measured again: replaced, not duplicated
    again = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert sorted((r["workload"], r["provider"]) for r in again) == sorted((r["workload"], r["provider"]) for r in rows)


def _fake_ptxas(folder: Path, release: str) -> str:
    path = folder / f"ptxas-{release}"
    path.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    path.chmod(0o755)
    return str(path)


def test_toolchain_points_triton_at_a_ptxas_the_driver_accepts(tmp_path, monkeypatch):
    """A driver older than Triton's bundled ptxas would refuse every kernel: the GPU scripts then
    use the newest toolkit ptxas that is not newer than the driver, or stop with the reason."""
    from benchmarks import toolchain

    bundled, old, older, newer = (_fake_ptxas(tmp_path, r) for r in ("13.1", "13.0", "12.8", "13.2"))
    monkeypatch.setattr(toolchain, "triton_ptxas", lambda arch=90: bundled)
    monkeypatch.setattr(toolchain, "toolkit_ptxas", lambda: [older, newer, old])
    environ = {}
    monkeypatch.setattr(toolchain, "driver_cuda_version", lambda: (13, 1))
    assert "accepts" in toolchain.check(environ) and environ == {}
    monkeypatch.setattr(toolchain, "driver_cuda_version", lambda: (13, 0))
    assert old in toolchain.check(environ)
    assert environ == dict.fromkeys(toolchain.ENV_KEYS, old)
    monkeypatch.setattr(toolchain, "driver_cuda_version", lambda: (12, 4))
    with pytest.raises(RuntimeError, match=r"no ptxas of CUDA <= 12\.4"):
        toolchain.check({})
    monkeypatch.setattr(toolchain, "driver_cuda_version", lambda: None)
    assert "no CUDA driver" in toolchain.check(environ)


def test_toolchain_reads_real_ptxas_versions():
    from benchmarks import toolchain

    assert toolchain.ptxas_version(toolchain.triton_ptxas()) >= (12, 0)
    assert toolchain.ptxas_version("/nonexistent/ptxas") is None


def test_host_workload_on_cpu(tmp_path):
    """``python -m benchmarks.host`` at CI size: one process (same and new grads) and a 2-process
    FSDP2 job, fused_optim (with its native and with its Python reads) next to torch foreach and
    for-loop, every row timed, the targets
    judged, the results in JSON with the command and machine."""
    out = tmp_path / "host.json"
    args = ["--tensors", "50,200", "--fsdp-params", "20", "--calls", "3", "--out", str(out)]
    text = _run_module("benchmarks.host", *args)
    results = json.loads(out.read_text())
    rows = results["rows"]
    providers = ["fused_optim", "fused_optim (Python reads)", "torch foreach", "torch for-loop"]
    assert [(r["part"], r["tensors"], r["provider"]) for r in rows] == [
        *(("single", n, p) for n in (50, 200) for p in providers),
        *(("fsdp2", 20, p) for p in providers),
    ]
    assert all(r["same_grads_us"] > 0 and r["new_grads_us"] > 0 for r in rows if r["part"] == "single")
    assert all(r["step_us"] > 0 and r["ranks"] == 2 for r in rows if r["part"] == "fsdp2")
    assert results["meta"]["command"].startswith("python -m benchmarks.host --tensors 50,200")
    assert len(results["targets"]) == 7 and all(t["measured"] for t in results["targets"])
    assert "FSDP2: step() >= 20x cheaper than torch foreach" in text


def test_gpu_check_rehearses_every_part_on_cpu(tmp_path):
    """The GPU proof script's dry run: every part (toolchain, tests on the device, the >2^31-element
    tensor check at a tiny size, benchmarks, targets summary) runs and records its outcome; a rerun
    of one part keeps the others' records."""
    text = _run_module("benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path))
    assert "every part passed" in text
    record = json.loads((tmp_path / "parts.json").read_text())
    assert list(record) == ["toolchain", "tests", "large", "bench", "summary"]
    assert all(part["ok"] and part["dry_run"] for part in record.values())
    assert "not performance figures" in (tmp_path / "summary.txt").read_text()
    assert "native reads: built" in (tmp_path / "log.txt").read_text()  # the toolchain part builds them
    _run_module("benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path), "--parts", "summary")
    assert json.loads((tmp_path / "parts.json").read_text()).keys() == record.keys()


def test_gpu_check_targets_say_met_or_missed_by_how_much():
    from benchmarks.gpu_check import targets

    def row(workload, algorithm, provider, ms, **extra):
        return {"workload": workload, "algorithm": algorithm, "provider": provider, "median_ms": ms,
                "n_params": 1 << 26, "n_tensors": 64, **extra}  # fmt: skip

    rows = [
        row("sizes", "Adam", "fused_optim", 1.0, pct_of_copy=95.0),
        row("sizes", "Adam", "fused_optim", 1.0, pct_of_copy=90.0, n_params=1 << 28),
        *(row("algorithms", a, "fused_optim", 1.0) for a in ("Adam", "AdamW", "SGD")),
        *(row("algorithms", a, "torch fused", 1.2) for a in ("Adam", "AdamW", "SGD")),
        row("host", "AdamW", "fused_optim", None, host_us=40.0),
    ]
    lines = targets(rows)
    assert lines[0].startswith(">= 93% of copy bandwidth") and "missed by 3.0 points" in lines[0]
    assert "met; Adam 1.20x" in lines[1]
    assert "not measured" in lines[2]
    assert any("host time" in line and "met; AdamW 40 us" in line for line in lines)


def test_gpu_check_stages_the_reference_packages_and_clears_stale_build_locks(tmp_path, monkeypatch):
    """``--stage-deps`` copies the tests' reference packages for the GPU machine (no registry there);
    a build lock that a killed part left behind is removed when a part ends."""
    from benchmarks import gpu_check

    monkeypatch.setattr(gpu_check, "DEPS", tmp_path / "deps")
    assert "lion_pytorch, pytorch_optimizer, optimi, schedulefree" in gpu_check.stage_deps()
    for name in gpu_check.REFERENCE_PACKAGES:
        assert (tmp_path / "deps" / name / "__init__.py").is_file(), name
    assert gpu_check._env(False)["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path / "deps")
    lock = tmp_path / "ext" / "py311_cpu" / "fused_optim_native_0123456789ab" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    gpu_check._clear_build_locks()
    assert not lock.exists() and lock.parent.is_dir()
