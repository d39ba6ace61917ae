"""Test setup: the real Triton kernels run on CUDA when present, else on CPU through Triton's
interpreter. TRITON_INTERPRET must be set before any kernel is decorated, so it happens here,
before fused_optim is imported by any test module."""

import os
import sys
from pathlib import Path

import pytest
import torch

# `python -m pytest` puts the working directory (the repository root) first on sys.path, where
# kernels/ would shadow the Hugging Face package named `kernels` that transformers imports. The
# root goes last: installed packages win, and benchmarks/ still imports from it.
ROOT = Path(__file__).resolve().parents[1]
_at_root = [p for p in sys.path if Path(p or ".").resolve() == ROOT]
sys.path[:] = [p for p in sys.path if p not in _at_root] + _at_root

# FUSED_OPTIM_TEST_FALLBACK=1 (set by tests/test_cpu_fallback.py for a subprocess) leaves the
# interpreter off, so CPU params take torch.optim's own implementation, the fallback under test.
if not torch.cuda.is_available() and os.environ.get("FUSED_OPTIM_TEST_FALLBACK") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda":  # a driver older than Triton's ptxas would refuse every kernel
    from benchmarks import toolchain

    print(toolchain.check())


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def floor_versions() -> dict[str, str]:
    """The lowest torch and Triton pyproject.toml claims to support (``torch>=2.7`` -> ``2.7``)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    return dict(re.findall(r'"(torch|triton)>=([\d.]+)"', text))


@pytest.fixture(scope="session")
def floor_python() -> str:
    """A Python whose Triton is the lowest version fused_optim supports, and everything else (torch,
    fused_optim itself) from this environment, whose site-packages come after its own on the path:
    a virtual environment made once, then reused from ~/.cache (or $FUSED_OPTIM_FLOOR_ENV). Needs
    the package registry the first time."""
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    version = floor_versions()["triton"]
    version = version if version.count(".") == 2 else version + ".0"
    default = Path.home() / ".cache" / "fused_optim" / f"triton-{version}"
    root = Path(os.environ.get("FUSED_OPTIM_FLOOR_ENV", default))
    python = root / "bin" / "python"
    probe = [str(python), "-c", "import triton, torch, fused_optim; print(triton.__version__)"]
    found = subprocess.run(probe, capture_output=True, text=True, check=False) if python.exists() else None
    if found is None or found.returncode != 0 or found.stdout.strip() != version:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(root)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"triton=={version}"], check=True)
        own = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        outer = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
        # addsitedir also runs this environment's .pth files (the editable install of fused_optim)
        lines = [f"import site; site.addsitedir({path!r})" for path in outer]
        (Path(own) / "outer_environment.pth").write_text("\n".join(lines) + "\n")
        found = subprocess.run(probe, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == version, found.stdout
    return str(python)
