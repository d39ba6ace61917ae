"""Compile a kernel for a GPU target on any machine (no GPU needed) and read what the compiler made:
128-bit global accesses, IEEE square roots and divisions, local memory, and ptxas's register and
spill report. Used by the tests and the benchmarks; needs kernels decorated without
TRITON_INTERPRET (run it in a process of its own when the interpreter is on)."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import triton

_ACCESS = re.compile(r"\b(ld|st)\.global[.\w]*?\.v(\d)\.[bfsu](\d+)\b")


def compile_for(kernel, pointer_dtypes: dict[str, str], constexprs: dict, arch: int = 90, num_warps: int = 4):
    """Compile ``kernel`` for ``sm_<arch>``. Pointer arguments are named in ``pointer_dtypes``
    (Triton type names such as ``"fp32"``) and, as torch allocations are, 16-byte aligned;
    every other runtime argument is an int64 scalar."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(kernel.arg_names)
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_dtypes:
            signature[name] = "*" + pointer_dtypes[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i64"
    try:
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    except TypeError:  # Triton 3.0/3.1: index-keyed signature and constants
        from triton.compiler.compiler import AttrsDescriptor

        sig = {i: t for i, (n, t) in enumerate(signature.items()) if t != "constexpr"}
        consts = {names.index(k): v for k, v in constexprs.items()}
        src = ASTSource(
            fn=kernel,
            signature=sig,
            constants=consts,
            attrs=AttrsDescriptor(divisible_by_16=tuple(i for (i,) in attrs)),
        )
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(src, target=target, options={"num_warps": num_warps, "enable_fp_fusion": False})


def vector_accesses(ptx: str) -> dict[str, int]:
    """Counts of 128-bit global loads and stores (``v4`` of 32-bit or ``v2`` of 64-bit words)."""
    counts = {"ld128": 0, "st128": 0}
    for op, n, bits in _ACCESS.findall(ptx):
        if int(n) * int(bits) == 128:
            counts[op + "128"] += 1
    return counts


def ptxas_report(ptx: str, arch: int = 90) -> dict[str, int]:
    """Registers, stack frame and spill bytes as ptxas reports them for ``ptx``."""
    ptxas = _ptxas_path(arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [ptxas, f"--gpu-name={_target(ptx)}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    text = out.stdout + out.stderr

    def number(pattern):
        found = re.search(pattern, text)
        return int(found.group(1)) if found else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "stack_frame": number(r"(\d+) bytes stack frame"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
    }


def _ptxas_path(arch: int) -> str:
    """The ptxas Triton itself runs for ``sm_<arch>``."""
    from triton.backends.nvidia import compiler

    if hasattr(compiler, "get_ptxas"):  # Triton >= 3.5 picks a ptxas per architecture
        return compiler.get_ptxas(arch).path
    return compiler._path_to_binary("ptxas")[0]


def _target(ptx: str) -> str:
    """The architecture the PTX was generated for (``sm_90a`` for Hopper)."""
    return re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
