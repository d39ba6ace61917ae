"""Packaging: kernels/ ships only as fused_optim.kernels; README's commands and CI agree."""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import fused_optim

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_is_the_subpackage():
    import fused_optim.kernels as kernels

    assert kernels.__name__ == "fused_optim.kernels"
    assert Path(kernels.__file__).resolve().parent == ROOT / "kernels"


def test_wheel_has_no_top_level_kernels(tmp_path):
    """``pip install .`` installs what this wheel holds: the package, its kernels as a subpackage
    and the C++ source of the native reads."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = tmp_path.glob("fused_optim-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fused_optim/kernels/adam.py" in names and "fused_optim/kernels/_tables.py" in names
    assert "fused_optim/adam.py" in names
    assert "fused_optim/_native.cpp" in names  # the native reads build from it at first use
    top = {name.split("/")[0] for name in names}
    assert top == {"fused_optim", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, top


def test_installed_package_exposes_no_top_level_kernels(tmp_path):
    """From outside the checkout, ``import kernels`` finds nothing of ours."""
    code = (
        "import importlib.util, fused_optim.kernels; spec = importlib.util.find_spec('kernels'); "
        "print(spec.origin if spec else 'none')"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    origin = out.stdout.strip()
    assert origin == "none" or str(ROOT) not in origin, origin


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```(?:bash|sh)\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_quick_start_and_ci_agree():
    commands = _quick_start_commands()
    assert len(commands) == 2, commands
    tests, main_job = commands
    assert "pytest" in tests and "benchmarks" in main_job
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, "README's test command must be what .ci/run runs"
    assert any(line.startswith("python -m pip install torch==2.13.0") for line in ci)
    assert ci.index(tests) > next(i for i, line in enumerate(ci) if "torch==2.13.0" in line)


def test_version_matches_pyproject():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{fused_optim.__version__}"' in pyproject


FLOOR_RUN = """
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch, triton, fused_optim
from algorithms import ALGORITHMS

print(triton.__version__)
OWN = {"Adam": {"amsgrad": True, "weight_decay": 0.1}, "AdamW": {}, "Adafactor": {"lr": 0.03, "weight_decay": 0.05}}
for name, configs in {**dict.fromkeys(OWN), **ALGORITHMS}.items():
    kwargs = configs[-1].kwargs if configs else OWN[name]
    torch.manual_seed(0)
    params = [torch.randn(33, 5, requires_grad=True), torch.randn(1100, requires_grad=True)]
    ref = [p.detach().clone().requires_grad_() for p in params]
    ours = getattr(fused_optim, name)(params, **kwargs)
    theirs = getattr(torch.optim, name)(ref, foreach=False, **kwargs)
    for _ in range(3):
        for p, q in zip(params, ref):
            q.grad = torch.randn_like(q)
            p.grad = q.grad.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {kwargs}: {m}")
"""


def test_the_lowest_supported_triton_runs_every_algorithm(floor_python):
    """The floor in pyproject.toml is checked: with the lowest supported Triton, every algorithm (its
    configuration with every option) runs through the interpreter and matches torch.optim. (The
    PTX tests compile every kernel variant with it too.)"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    out = subprocess.run(
        [floor_python, "-c", FLOOR_RUN], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    from conftest import floor_versions

    assert out.stdout.split()[0].startswith(floor_versions()["triton"]), out.stdout
