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

SCRIPT = textwrap.dedent(
    """
    import importlib, json, re, sys
    import triton.language as tl
    from fused_optim.kernels._inspect import compile_for, ptxas_report, vector_accesses
    from fused_optim.kernels._tables import block_size

    dtypes = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}
    bytes_of = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}
    warps = int(sys.argv[2])
    out = {}
    for case in json.loads(sys.argv[1]):
        algo = "adam" if case["algo"] == "adamw" else case["algo"]
        kernel = getattr(importlib.import_module(f"fused_optim.kernels.{algo}"), f"_{algo}_kernel")
        dt, st = case["dtype"], case["state_dtype"]
        pointers = {"tensor_table": "i64", "block_table": "i64", "step_table": "fp64", "steps": "fp32",
                    "mu_product": "fp32", "lr_ptr": "fp32", "grad_scale": "fp32", "found_inf": "fp32",
                    "clip_coef": "fp32", "master": "fp32"}
        pointers.update({k: st for k in case["states"]})
        block = block_size(warps, min(bytes_of[dt], bytes_of[st], 4 if case["flags"]["MASTER"] else 8))
        constexprs = dict(case["flags"], P_DTYPE=dtypes[dt], S_DTYPE=dtypes[st], BLOCK=block)
        constexprs["C_DTYPE"] = tl.float64 if dt == "fp64" else tl.float32
        ptx = compile_for(kernel, pointers, constexprs, arch=90, num_warps=warps).asm["ptx"]
        out[case["id"]] = dict(
            vector_accesses(ptx), **ptxas_report(ptx, arch=90), local=ptx.count(".local"),
            approx=len(re.findall(r"\\.approx(?:\\.ftz)?\\.f32|div\\.full\\.f32", ptx)),  # fp32 elementwise math
            sqrt_rn=ptx.count("sqrt.rn."), div_rn=ptx.count("div.rn."),
        )
    from fused_optim.kernels.clip import _grad_norm_kernel
    for gdt, norm_inf in (("fp32", False), ("bf16", True)):
        constexprs = {"G_DTYPE": dtypes[gdt], "ACC_DTYPE": tl.float32, "NORM_INF": norm_inf,
                      "BLOCK": block_size(warps, bytes_of[gdt])}
        pointers = {"tensor_table": "i64", "block_table": "i64", "partials": "fp32"}
        ptx = compile_for(_grad_norm_kernel, pointers, constexprs, arch=90, num_warps=warps).asm["ptx"]
        out[f"clip-{gdt}"] = dict(vector_accesses(ptx), **ptxas_report(ptx, arch=90), local=ptx.count(".local"))
    print(json.dumps(out))
    """
)

OFF = {
    "DEVICE_STEP": False, "LR_ON_DEVICE": False, "HAS_GRAD_SCALE": False, "HAS_FOUND_INF": False,
    "HAS_CLIP": False, "MASTER": False, "STOCHASTIC": False,
}  # fmt: skip
ON = dict(OFF, DEVICE_STEP=True, LR_ON_DEVICE=True, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, HAS_CLIP=True)
ADAM_STATES = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
ADAM = {"WEIGHT_DECAY": True, "DECOUPLED": False, "MAXIMIZE": True, "PER_TENSOR_STEP": False, "AMSGRAD": False}
TWO = ["exp_avg", "exp_avg_sq"]
DECAY = {"WEIGHT_DECAY": True, "DECOUPLED": True, "MAXIMIZE": True, "PER_TENSOR_STEP": False}
SGD = {"WEIGHT_DECAY": True, "MOMENTUM": True, "NESTEROV": True, "MAXIMIZE": True}
RMS = {"WEIGHT_DECAY": True, "MOMENTUM": True, "CENTERED": True, "MAXIMIZE": True}


def _case(algo, dtype, states, flags, loads, stores, *, sqrt=True, div=True, label="", state_dtype=None, features=OFF):
    """One kernel variant. ``loads``/``stores``: how many arrays (param, grad, states) are read and
    written on the full-block path. With master weights the param is written, not read, and the
    fp32 master copy is read and written."""
    return {"id": f"{algo}-{dtype}{label}", "algo": algo, "dtype": dtype, "state_dtype": state_dtype or dtype,
            "states": states, "flags": {**flags, **features}, "loads": loads, "stores": stores, "sqrt": sqrt,
            "div": div}  # fmt: skip


CASES = [
    _case("adam", "fp32", ADAM_STATES, ADAM, 4, 3),
    _case("adam", "fp32", ADAM_STATES, dict(ADAM, AMSGRAD=True, PER_TENSOR_STEP=True), 5, 4, label="-amsgrad"),
    _case("adam", "bf16", ADAM_STATES, dict(ADAM, AMSGRAD=True), 5, 4, label="-amsgrad"),
    _case("adam", "fp16", ADAM_STATES, ADAM, 4, 3),
    _case("adam", "fp64", ADAM_STATES, dict(ADAM, AMSGRAD=True), 5, 4, label="-amsgrad"),
    _case("sgd", "fp32", ["momentum_buffer"], SGD, 3, 2, sqrt=False, div=False),
    _case("sgd", "bf16", ["momentum_buffer"], dict.fromkeys(SGD, False), 2, 1, sqrt=False, div=False, label="-plain"),
    _case("adagrad", "fp32", ["state_sum"], {"WEIGHT_DECAY": True, "MAXIMIZE": True, "PER_TENSOR_STEP": True}, 3, 2),
    _case("adadelta", "fp32", ["square_avg", "acc_delta"], {"WEIGHT_DECAY": True, "MAXIMIZE": True}, 4, 3),
    _case("rmsprop", "fp32", ["square_avg", "momentum_buffer", "grad_avg"], RMS, 5, 4),
    _case(
        "rmsprop",
        "bf16",
        ["square_avg", "momentum_buffer", "grad_avg"],
        dict.fromkeys(RMS, False),
        3,
        2,
        label="-plain",
    ),
    _case("nadam", "fp32", TWO, dict(DECAY, PER_TENSOR_STEP=True), 4, 3),
    _case("radam", "fp32", TWO, dict(DECAY, DECOUPLED=False, PER_TENSOR_STEP=True), 4, 3),
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
    # AMP (grad scale, inf skip), clipping, device step counts and a device lr: the same accesses
    _case("adam", "fp32", ADAM_STATES, ADAM, 4, 3, label="-amp-clip-capturable", features=ON),
    _case("nadam", "fp32", TWO, DECAY, 4, 3, label="-amp-clip-capturable", features=ON),
    _case("radam", "fp32", TWO, DECAY, 4, 3, label="-amp-clip-capturable", features=ON),
    _case(
        "adagrad",
        "fp32",
        ["state_sum"],
        {"WEIGHT_DECAY": True, "MAXIMIZE": True, "PER_TENSOR_STEP": False},
        3,
        2,
        label="-amp-clip-capturable",
        features=ON,
    ),
    _case(
        "sgd",
        "fp32",
        ["momentum_buffer"],
        SGD,
        3,
        2,
        sqrt=False,
        div=False,
        label="-amp-clip",
        features=dict(OFF, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, HAS_CLIP=True),
    ),
    # bf16 params with an fp32 master copy and fp32 moments; with stochastic rounding; fp32 with bf16 moments
    _case(
        "adam", "bf16", ADAM_STATES, ADAM, 4, 4, label="-master", state_dtype="fp32", features=dict(OFF, MASTER=True)
    ),
    _case(
        "rmsprop",
        "bf16",
        ["square_avg", "momentum_buffer", "grad_avg"],
        RMS,
        5,
        5,
        label="-master",
        state_dtype="fp32",
        features=dict(OFF, MASTER=True),
    ),
    _case("adam", "bf16", ADAM_STATES, ADAM, 4, 3, label="-stochastic", features=dict(OFF, STOCHASTIC=True)),
    _case("adamw", "fp32", ADAM_STATES, dict(ADAM, DECOUPLED=True), 4, 3, label="-bf16-states", state_dtype="bf16"),
]
ELEM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}


def _expected_accesses(case) -> tuple[int, int]:
    """128-bit loads and stores: each thread moves one 16-byte vector of the narrowest array, so an
    array twice as wide takes two."""
    p, s = ELEM_BYTES[case["dtype"]], ELEM_BYTES[case["state_dtype"]]
    states_read, states_written = case["loads"] - 2, case["stores"] - 1
    if case["flags"]["MASTER"]:  # reads grad, master, states; writes param, master, states
        states_written -= 1
        reads, writes = [p, 4] + [s] * states_read, [p, 4] + [s] * states_written
    else:  # reads param, grad, states; writes param, states
        reads, writes = [p, p] + [s] * states_read, [p] + [s] * states_written
    narrow = min(reads + writes)
    return sum(b // narrow for b in reads), sum(b // narrow for b in writes)


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
    assert launchers == {case["algo"] for case in CASES} - {"adamw"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["id"])
def test_kernel_codegen_for_sm90(report, case):
    results, _ = report
    r = results[case["id"]]
    assert (r["ld128"], r["st128"]) == _expected_accesses(case), r
    assert r["local"] == 0 and r["stack_frame"] == 0, r
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
    assert r["approx"] == 0, r  # no approximate fp32 sqrt, division or reciprocal
    if case["dtype"] != "fp64":  # fp64 sqrt and division are always correctly rounded in PTX
        assert r["sqrt_rn"] > 0 or not case["sqrt"], r
        assert r["div_rn"] > 0 or not case["div"], r


@pytest.mark.parametrize("grads", ["fp32", "bf16"])
def test_grad_norm_kernel_codegen_for_sm90(report, grads):
    """The clipping reduction reads each grad once, as one 128-bit vector per thread."""
    r = report[0][f"clip-{grads}"]
    assert r["ld128"] == 1 and r["st128"] == 0, r
    assert r["local"] == 0 and r["stack_frame"] == 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
