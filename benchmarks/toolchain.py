"""Before the first kernel on a GPU machine: will the CUDA driver load what Triton's ptxas makes?

Triton assembles kernels with a ptxas it bundles (CUDA 13 for Triton 3.9); a driver older than that
ptxas refuses the image ("the provided PTX was compiled with an unsupported toolchain"), and
every kernel fails at its first launch. ``check()`` compares the driver's CUDA version with the
ptxas Triton would run for the device and, when that ptxas is newer, points Triton at one the
driver accepts (``TRITON_PTXAS_PATH``, and ``TRITON_PTXAS_BLACKWELL_PATH``, which Triton 3.6
reads for sm_100 and newer and 3.9 for sm_90 too; both are set): the newest one the driver
accepts among the other ptxas Triton ships (Triton 3.9 also carries a CUDA 12 one) and the CUDA
toolkit's (``$CUDA_HOME``, ``/usr/local/cuda*``, ``PATH``). The benchmark runner and the test
suite call it on CUDA machines before anything compiles; ``python -m benchmarks.toolchain``
prints the decision.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import subprocess
from collections.abc import Callable

Version = tuple[int, int]
ENV_KEYS = ("TRITON_PTXAS_PATH", "TRITON_PTXAS_BLACKWELL_PATH")


def driver_cuda_version() -> Version | None:
    """The CUDA version the installed driver supports (``cuDriverGetVersion``), None without one."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    value = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(value)) != 0:
        return None
    return value.value // 1000, value.value % 1000 // 10


def ptxas_version(path: str) -> Version | None:
    """``ptxas --version``'s release, e.g. (13, 0); None when it does not run."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


def triton_ptxas(arch: int = 90) -> str:
    """The ptxas Triton runs for ``sm_<arch>`` now (after any ``TRITON_PTXAS*_PATH``)."""
    from fused_optim.kernels._inspect import _ptxas_path

    return _ptxas_path(arch)


def toolkit_ptxas() -> list[str]:
    """Other ptxas binaries: those Triton ships for other architectures, and those of installed
    CUDA toolkits, in no particular order."""
    found = [triton_ptxas(80)]
    found += [os.path.join(os.environ[k], "bin", "ptxas") for k in ("CUDA_HOME", "CUDA_PATH") if k in os.environ]
    found += sorted(glob.glob("/usr/local/cuda*/bin/ptxas"))
    if shutil.which("ptxas"):
        found.append(shutil.which("ptxas"))
    return list(dict.fromkeys(p for p in found if os.path.isfile(p)))


def choose(
    driver: Version | None, current: str, candidates: list[str], version_of: Callable[[str], Version | None]
) -> tuple[str | None, str]:
    """(the ptxas to point Triton at, or None to keep ``current``; a one-line explanation)."""
    mine = version_of(current)
    if driver is None:
        return None, f"no CUDA driver found; Triton's ptxas {mine} stays"
    if mine is not None and mine <= driver:
        return None, f"driver CUDA {driver[0]}.{driver[1]} accepts Triton's ptxas {mine[0]}.{mine[1]} ({current})"
    usable = [(v, p) for p in candidates if (v := version_of(p)) is not None and v <= driver]
    if not usable:
        raise RuntimeError(
            f"Triton's ptxas ({current}, CUDA {mine}) is newer than the driver (CUDA {driver[0]}.{driver[1]}) "
            f"and no ptxas of CUDA <= {driver[0]}.{driver[1]} was found among {candidates or 'none'}: set "
            "TRITON_PTXAS_PATH (and TRITON_PTXAS_BLACKWELL_PATH) to one, or update the driver"
        )
    version, path = max(usable)
    return path, (
        f"driver CUDA {driver[0]}.{driver[1]} is older than Triton's ptxas {mine} ({current}): "
        f"using ptxas {version[0]}.{version[1]} ({path})"
    )


def check(environ=os.environ) -> str:
    """Point Triton at a ptxas the driver accepts when its own is too new; returns what was decided."""
    path, message = choose(driver_cuda_version(), triton_ptxas(), toolkit_ptxas(), ptxas_version)
    if path is not None:
        for key in ENV_KEYS:
            environ[key] = path
    return message


if __name__ == "__main__":
    print(check())
