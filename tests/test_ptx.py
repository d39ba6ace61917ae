"""What the compiler makes of the Adam kernel for Hopper (sm_90), checked on any machine:
128-bit global loads and stores for every array on the full-block path, correctly rounded sqrt
and division, no local memory, no register spills.

The kernels must be compiled from real JITFunctions, so this runs in a process without
TRITON_INTERPRET."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import fused_optim
from fused_optim.kernels._tables import block_size

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import triton.language as tl
    from fused_optim.kernels._inspect import compile_for, ptxas_report, vector_accesses
    from fused_optim.kernels._tables import block_size
    from fused_optim.kernels.adam import _adam_kernel

    dtypes = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}
    bytes_of = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}
    out = {}
    for name, amsgrad, per_tensor in json.loads(sys.argv[1]):
        dt = dtypes[name]
        state = {k: name for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
        compiled = compile_for(
            _adam_kernel,
            {"tensor_table": "i64", "block_table": "i64", "step_table": "fp64", **state},
            dict(P_DTYPE=dt, S_DTYPE=dt, C_DTYPE=tl.float64 if name == "fp64" else tl.float32,
                 WEIGHT_DECAY=True, DECOUPLED=False, AMSGRAD=amsgrad, MAXIMIZE=True,
                 PER_TENSOR_STEP=per_tensor, BLOCK=block_size(int(sys.argv[2]), bytes_of[name])),
            arch=90, num_warps=int(sys.argv[2]),
        )
        ptx = compiled.asm["ptx"]
        out[f"{name}-{amsgrad}-{per_tensor}"] = dict(
            vector_accesses(ptx), **ptxas_report(ptx, arch=90), local=ptx.count(".local"),
            approx=ptx.count(".approx") + ptx.count("div.full"),
            sqrt_rn=ptx.count("sqrt.rn."), div_rn=ptx.count("div.rn."),
        )
    print(json.dumps(out))
    """
)

CASES = [
    ("fp32", False, False),
    ("fp32", True, True),
    ("bf16", True, False),
    ("fp16", False, False),
    ("fp64", True, False),
]
ELEM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    warps = fused_optim.Adam._num_warps
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(CASES), str(warps)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), warps


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c[0]}{'-amsgrad' if c[1] else ''}{'-per-tensor' if c[2] else ''}"
)
def test_adam_kernel_codegen_for_sm90(report, case):
    results, warps = report
    r = results[f"{case[0]}-{case[1]}-{case[2]}"]
    name, amsgrad = case[0], case[1]
    # Full-block path: each thread moves one 16-byte vector of every array, so one 128-bit load per
    # array read (p, g, exp_avg, exp_avg_sq, + max_exp_avg_sq) and one store per array written.
    assert block_size(warps, ELEM_BYTES[name]) * ELEM_BYTES[name] == warps * 32 * 16
    loads, stores = (5, 4) if amsgrad else (4, 3)
    assert (r["ld128"], r["st128"]) == (loads, stores), r
    assert r["local"] == 0 and r["stack_frame"] == 0, r
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
    assert r["approx"] == 0, r
    if name != "fp64":  # fp64 sqrt and division are always correctly rounded in PTX
        assert r["sqrt_rn"] > 0 and r["div_rn"] > 0, r
