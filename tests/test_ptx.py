"""What the compiler makes of every update kernel for Hopper (sm_90), checked on any machine:
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
    import importlib, json, sys
    import triton.language as tl
    from fused_optim.kernels._inspect import compile_for, ptxas_report, vector_accesses
    from fused_optim.kernels._tables import block_size

    dtypes = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}
    bytes_of = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}
    warps = int(sys.argv[2])
    out = {}
    for case in json.loads(sys.argv[1]):
        kernel = getattr(importlib.import_module(f"fused_optim.kernels.{case['algo']}"), f"_{case['algo']}_kernel")
        dt = case["dtype"]
        pointers = {"tensor_table": "i64", "block_table": "i64", "step_table": "fp64"}
        pointers.update({k: dt for k in case["states"]})
        constexprs = dict(case["flags"], P_DTYPE=dtypes[dt], S_DTYPE=dtypes[dt], BLOCK=block_size(warps, bytes_of[dt]))
        constexprs["C_DTYPE"] = tl.float64 if dt == "fp64" else tl.float32
        ptx = compile_for(kernel, pointers, constexprs, arch=90, num_warps=warps).asm["ptx"]
        out[case["id"]] = dict(
            vector_accesses(ptx), **ptxas_report(ptx, arch=90), local=ptx.count(".local"),
            approx=ptx.count(".approx") + ptx.count("div.full"),
            sqrt_rn=ptx.count("sqrt.rn."), div_rn=ptx.count("div.rn."),
        )
    print(json.dumps(out))
    """
)

ADAM_STATES = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
ADAM_FLAGS = {"WEIGHT_DECAY": True, "DECOUPLED": False, "MAXIMIZE": True, "PER_TENSOR_STEP": False}


def _case(algo, dtype, states, flags, loads, stores, sqrt=True, div=True, label=""):
    """One kernel variant; ``loads``/``stores``: arrays read and written on the full-block path."""
    case_id = f"{algo}-{dtype}{label}"
    return {"id": case_id, "algo": algo, "dtype": dtype, "states": states, "flags": flags, "loads": loads,
            "stores": stores, "sqrt": sqrt, "div": div}  # fmt: skip


CASES = [
    _case("adam", "fp32", ADAM_STATES, dict(ADAM_FLAGS, AMSGRAD=False), 4, 3),
    _case("adam", "fp32", ADAM_STATES, dict(ADAM_FLAGS, AMSGRAD=True, PER_TENSOR_STEP=True), 5, 4, label="-amsgrad"),
    _case("adam", "bf16", ADAM_STATES, dict(ADAM_FLAGS, AMSGRAD=True), 5, 4, label="-amsgrad"),
    _case("adam", "fp16", ADAM_STATES, dict(ADAM_FLAGS, AMSGRAD=False), 4, 3),
    _case("adam", "fp64", ADAM_STATES, dict(ADAM_FLAGS, AMSGRAD=True), 5, 4, label="-amsgrad"),
    _case(
        "sgd",
        "fp32",
        ["momentum_buffer"],
        {"WEIGHT_DECAY": True, "MOMENTUM": True, "NESTEROV": True, "MAXIMIZE": True},
        3,
        2,
        sqrt=False,
        div=False,
    ),
    _case(
        "sgd",
        "bf16",
        ["momentum_buffer"],
        {"WEIGHT_DECAY": False, "MOMENTUM": False, "NESTEROV": False, "MAXIMIZE": False},
        2,
        1,
        sqrt=False,
        div=False,
        label="-plain",
    ),
    _case("adagrad", "fp32", ["state_sum"], {"WEIGHT_DECAY": True, "MAXIMIZE": True, "PER_TENSOR_STEP": True}, 3, 2),
    _case("adadelta", "fp32", ["square_avg", "acc_delta"], {"WEIGHT_DECAY": True, "MAXIMIZE": True}, 4, 3),
    _case(
        "rmsprop",
        "fp32",
        ["square_avg", "momentum_buffer", "grad_avg"],
        {"WEIGHT_DECAY": True, "MOMENTUM": True, "CENTERED": True, "MAXIMIZE": True},
        5,
        4,
    ),
    _case(
        "rmsprop",
        "bf16",
        ["square_avg", "momentum_buffer", "grad_avg"],
        {"WEIGHT_DECAY": False, "MOMENTUM": False, "CENTERED": False, "MAXIMIZE": False},
        3,
        2,
        label="-plain",
    ),
    _case(
        "nadam",
        "fp32",
        ["exp_avg", "exp_avg_sq"],
        {"WEIGHT_DECAY": True, "DECOUPLED": True, "MAXIMIZE": True, "PER_TENSOR_STEP": True},
        4,
        3,
    ),
    _case(
        "radam",
        "fp32",
        ["exp_avg", "exp_avg_sq"],
        {"WEIGHT_DECAY": True, "DECOUPLED": False, "MAXIMIZE": True, "PER_TENSOR_STEP": True},
        4,
        3,
    ),
    _case(
        "adamax",
        "fp32",
        ["exp_avg", "exp_inf"],
        {"WEIGHT_DECAY": True, "MAXIMIZE": True, "PER_TENSOR_STEP": False},
        4,
        3,
        sqrt=False,
    ),
    _case(
        "adamax",
        "fp64",
        ["exp_avg", "exp_inf"],
        {"WEIGHT_DECAY": True, "MAXIMIZE": True, "PER_TENSOR_STEP": True},
        4,
        3,
        sqrt=False,
    ),
]
ELEM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    warps = fused_optim.FusedOptimizer._num_warps
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(CASES), str(warps)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), warps


def test_every_kernel_is_covered():
    import fused_optim.kernels as kernels

    launchers = {name.removesuffix("_step") for name in kernels.__all__ if name.endswith("_step")}
    assert launchers == {case["algo"] for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["id"])
def test_kernel_codegen_for_sm90(report, case):
    results, warps = report
    r = results[case["id"]]
    # Full-block path: each thread moves one 16-byte vector of every array, so one 128-bit load
    # per array read and one 128-bit store per array written.
    assert block_size(warps, ELEM_BYTES[case["dtype"]]) * ELEM_BYTES[case["dtype"]] == warps * 32 * 16
    assert (r["ld128"], r["st128"]) == (case["loads"], case["stores"]), r
    assert r["local"] == 0 and r["stack_frame"] == 0, r
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
    assert r["approx"] == 0, r
    if case["dtype"] != "fp64":  # fp64 sqrt and division are always correctly rounded in PTX
        assert (r["sqrt_rn"] > 0) == case["sqrt"] and (r["div_rn"] > 0) == case["div"], r
