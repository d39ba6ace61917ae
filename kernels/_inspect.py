"""Compile a kernel for a GPU target on any machine (no GPU needed) and read what the compiler made:
128-bit global accesses, IEEE square roots and divisions, local memory, float64 transcendentals,
ptxas's register and spill report, and the machine code (SASS) instruction count. Used by the
tests and the benchmarks; needs kernels
decorated without TRITON_INTERPRET (run it in a process of its own when the interpreter is on).
Works with every Triton fused_optim supports (3.3 and newer)."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import triton

_ACCESS = re.compile(r"\b(ld|st)\.global[.\w]*?\.v(\d)\.[bfsu](\d+)\b")


def compile_for(kernel, types: dict, constexprs: dict, arch: int = 90, num_warps: int = 4):
    """Compile ``kernel`` for ``sm_<arch>``. ``types`` gives the Triton type of each runtime argument
    (``"*fp32"``, ``"i64"``, or a tuple of those for a tuple argument; ``"i64"`` when not named);
    pointers are 16-byte aligned, as torch allocations are."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        ty = signature[name] = types.get(name, "i64")
        for j, t in enumerate(ty) if isinstance(ty, tuple) else [(None, ty)]:
            if t.startswith("*"):
                attrs[(i,) if j is None else (i, j)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(src, target=target, options={"num_warps": num_warps, "enable_fp_fusion": False})


def vector_accesses(ptx: str) -> dict[str, int]:
    """Counts of 128-bit global loads and stores (``v4`` of 32-bit or ``v2`` of 64-bit words)."""
    counts = {"ld128": 0, "st128": 0}
    for op, n, bits in _ACCESS.findall(ptx):
        if int(n) * int(bits) == 128:
            counts[op + "128"] += 1
    return counts


def fp64_arithmetic(ptx: str) -> int:
    """float64 arithmetic instructions (conversions, moves, loads and stores excluded): a float64
    ``exp``/``log`` is inlined from libdevice as dozens of ``fma.rn.f64``, so an fp32 kernel
    without any of these computes no float64 transcendental."""
    return len(re.findall(r"\b(?:add|sub|mul|fma|div|sqrt|rcp|neg|min|max|abs|ex2|lg2)\.[\w.]*f64\b", ptx))


def ptxas_report(ptx: str, arch: int = 90) -> dict[str, int]:
    """Registers, stack frame and spill bytes as ptxas reports them for ``ptx``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [_ptxas_path(arch), f"--gpu-name={_target(ptx)}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
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


def sass_instructions(cubin: bytes) -> int:
    """Machine instructions (SASS, NOPs excluded) in a cubin, as ``cuobjdump -sass`` lists them;
    one program runs each once per block, so it measures the issue cost of a variant."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        tool = str(Path(_ptxas_path(90)).with_name("cuobjdump"))
        sass = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    opcodes = re.findall(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", sass, re.M)
    return sum(op.split(".")[0] != "NOP" for op in opcodes)


def _ptxas_path(arch: int) -> str:
    """The ptxas Triton itself runs for ``sm_<arch>``."""
    from triton.backends.nvidia import compiler

    tool = compiler.get_ptxas(arch) if hasattr(compiler, "get_ptxas") else compiler._path_to_binary("ptxas")
    return tool[0] if isinstance(tool, tuple) else tool.path  # (path, version) up to Triton 3.4


def _target(ptx: str) -> str:
    """The architecture the PTX was generated for (``sm_90a`` for Hopper)."""
    return re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
