"""The plan check's per-step read in C++ (``_native.cpp``), built at first use.

Every ``step()`` reads each param's grad and the storage addresses of the params and grads, to
know that the cached plan still holds (``_plans._shards``). In Python that is three attribute reads
per param, about 120 ns each (DTensor params cost more); the module's ``scan`` does the same reads
in one call and checks every param and grad against the plan's (rows made by ``describe``).

It is compiled against the installed torch by torch's extension builder the first time a process
needs it (about 10 s on a 2-core machine; then cached under torch's extension directory, so later
processes load it in milliseconds). Where it cannot be built (no C++ compiler or ninja) or
``FUSED_OPTIM_NATIVE=0`` is set, the Python path does the same reads; the two agree exactly
(tests/test_host.py). torch's builder locks the build directory while one process builds (the
ranks of a job wait for it); a process killed in the middle of a build leaves that lock behind,
and later processes wait on it: delete the ``fused_optim_native_*`` directory under
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) then.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("_native.cpp")

_loaded = False
_module = None
reason = "not built yet"  # why ``module()`` is None, once it is


def module():
    """The compiled module (``scan``, ``describe``: ``_native.cpp`` says what they take), or None
    where it is switched off or failed to build."""
    if not _loaded:
        load()
    return _module


def load() -> None:
    """Build (or load the cached build of) the extension once per process."""
    global _loaded, _module, reason
    _loaded = True
    if os.environ.get("FUSED_OPTIM_NATIVE", "1").lower() in ("0", "false", "off", "no"):
        reason = "switched off by FUSED_OPTIM_NATIVE=0"
        return
    try:
        from torch.utils.cpp_extension import load as build

        source = SOURCE.read_bytes()
        # one build per source and torch: a build for another torch is never loaded
        tag = hashlib.sha256(source + torch.__version__.encode()).hexdigest()[:12]
        _module = build(f"fused_optim_native_{tag}", [str(SOURCE)], extra_cflags=["-O2"])
        reason = ""
    except Exception as e:  # no compiler, no ninja, a header it does not build with
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        warnings.warn(
            f"fused_optim: the native plan check could not be built ({reason}); step() reads grads in "
            "Python, which costs the host about 120 ns more per param. FUSED_OPTIM_NATIVE=0 skips the build.",
            stacklevel=2,
        )
