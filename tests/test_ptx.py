"""What the compiler makes of the update kernel for Hopper (sm_90), checked on any machine, for
every algorithm and the main variants: 128-bit global loads and stores for every array on the
full-block path, correctly rounded sqrt and division, no local memory, no register spills, a
register budget per variant, and no float64 arithmetic in fp32 kernels (step scalars that need
float64 transcendentals are computed once per step by the advance kernel, which is checked too).

The kernels must be compiled from real JITFunctions, so this runs in a process without
TRITON_INTERPRET: once with the installed Triton, and once with the lowest Triton fused_optim
supports (``floor_python``, a side environment of its own)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import fused_optim

SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    import triton
    import triton.language as tl
    from fused_optim.kernels import ALGORITHMS
    from fused_optim.kernels._inspect import compile_for, fp64_arithmetic, ptxas_report, sass_instructions
    from fused_optim.kernels._inspect import vector_accesses
    from fused_optim.kernels._quant import CODES, QB, SQRT
    from fused_optim.kernels._tables import block_size
    from fused_optim.kernels._update import _advance_kernel, _no_reduce, _no_scalars, _same_aux, _update_kernel

    dtypes = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}
    bytes_of = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}
    warps = int(sys.argv[2])
    out = {"triton": triton.__version__}

    def report(kernel):
        ptx = kernel.asm["ptx"]
        return dict(
            vector_accesses(ptx), **ptxas_report(ptx, arch=90), local=ptx.count(".local"),
            sass=sass_instructions(kernel.asm["cubin"]),
            approx=len(re.findall(r"\\.approx(?:\\.ftz)?\\.f32|div\\.full\\.f32", ptx)),  # fp32 math
            sqrt_rn=ptx.count("sqrt.rn."), div_rn=ptx.count("div.rn."), fp64=fp64_arithmetic(ptx),
        )

    for case in json.loads(sys.argv[1]):
        algo = ALGORITHMS[case["algo"]]
        dt, st = case["dtype"], case["state_dtype"]
        codes = case["codes"]  # 8-bit states: "i8" or "fp8e4nv" codes of the keys in CODES
        quant = [codes is not None and key in CODES for key in algo.state_keys]
        types = {"tensor_table": "*i64", "block_table": "*i64", "step_table": "*fp64", "grad_scale": "*fp32",
                 "found_inf": "*fp32", "clip_coef": "*fp32", "master": "*fp32", "sum_table": "*fp32",
                 "states": tuple("*" + (codes if q else st) for q in quant),
                 "scales": tuple("*fp32" for _ in algo.state_keys), "qmap": "*fp32"}
        options = case["options"] + [False] * (3 - len(case["options"]))
        block = block_size(warps, min(bytes_of[dt], bytes_of[st], 4 if case["flags"]["MASTER"] else 8))
        quant_flags = dict(
            QUANT=sum(1 << i for i, q in enumerate(quant) if q),
            Q_SQRT=sum(1 << i for i, (q, key) in enumerate(zip(quant, algo.state_keys)) if q and CODES[key] == SQRT),
            Q_FP8=codes == "fp8e4nv", Q_STOCHASTIC=case["stochastic_codes"], QB_=QB,
            PARTS=min(2, block // QB) if codes else 4,
        )
        constexprs = dict(
            case["flags"], MATH=algo.math, N_H=algo.n_hyper, N_K=algo.n_step, USES_FRESH=algo.uses_fresh,
            REDUCE=algo.reduce or _no_reduce, N_SUMS=algo.n_sums, PHASE=case.get("phase", 2 if algo.n_sums else 0),
            LIVE=sum(1 << i for i, key in enumerate(algo.state_keys) if key in case["states"]),
            O0=options[0], O1=options[1], O2=options[2], P_DTYPE=dtypes[dt], S_DTYPE=dtypes[st],
            C_DTYPE=tl.float64 if dt == "fp64" else tl.float32, BLOCK=block, BLOCKS=case["blocks"], **quant_flags,
        )
        constexprs["LIVE"] |= sum(1 << (16 + i) for i, key in enumerate(algo.state_keys) if key in algo.read_only)
        out[case["id"]] = report(compile_for(_update_kernel, types, constexprs, num_warps=warps))
    for name, algo in ALGORITHMS.items():  # device step counts: one small launch per segment
        if algo.n_step and algo.device_scalars is None:
            continue  # step scalars from the host only (Schedule-Free's per-group ones): never advanced on the device
        types = {"tensor_table": "*i64", "steps": "*fp32", "aux": ("*fp32",) * max(algo.n_aux, 1),
                 "step_table": "*fp64", "found_inf": "*fp32", "lr_ptr": "*fp32"}
        constexprs = dict(
            SCALARS=algo.device_scalars or _no_scalars,
            ADVANCE_AUX=algo.advance_aux or _same_aux, N_H=algo.n_hyper, N_K=algo.n_step,
            N_AUX=algo.n_aux, HAS_FOUND_INF=True, LR_ON_DEVICE=True, DECOUPLED=True,
            O0=False, O1=False, O2=False, BLOCK_T=256,
        )
        out[f"advance-{name}"] = report(compile_for(_advance_kernel, types, constexprs, num_warps=4))
    from fused_optim.kernels.clip import _grad_norm_kernel
    for gdt, norm_inf, blocks in (("fp32", False, 1), ("bf16", True, 1), ("fp32", False, 4), ("bf16", True, 4)):
        constexprs = {"G_DTYPE": dtypes[gdt], "ACC_DTYPE": tl.float32, "NORM_INF": norm_inf,
                      "BLOCK": block_size(warps, bytes_of[gdt]), "BLOCKS": blocks}
        types = {"tensor_table": "*i64", "block_table": "*i64", "partials": "*fp32"}
        kernel = compile_for(_grad_norm_kernel, types, constexprs, num_warps=warps)
        out[f"clip-{gdt}" + (f"-blocks{blocks}" if blocks > 1 else "")] = report(kernel)
    from fused_optim.kernels.adafactor import _adafactor_kernel
    for label, dt, st, feature in (("fp32", "fp32", "fp32", None), ("bf16-master", "bf16", "fp32", "MASTER"),
                                   ("bf16-stochastic", "bf16", "bf16", "STOCHASTIC")):
        types = {"tensor_table": "*i64", "info": "*i64", "tiles": "*i64", "scalars": "*fp64", "row_var": "*" + st,
                 "col_var": "*" + st, "variance": "*" + st, "sums": "*fp32", "row_sum": "*fp32", "col_sum": "*fp32",
                 "rv_sum": "*fp32", "g2_sum": "*fp32", "row_new": "*fp32", "col_new": "*fp32", "clip_coef": "*fp32",
                 "master": "*fp32"}
        for phase in (0, 1, 2):
            constexprs = dict(PHASE=phase, P_DTYPE=dtypes[dt], S_DTYPE=dtypes[st], C_DTYPE=tl.float32,
                              WEIGHT_DECAY=True, MAXIMIZE=True, HAS_CLIP=True, MASTER=feature == "MASTER",
                              STOCHASTIC=feature == "STOCHASTIC")
            kernel = compile_for(_adafactor_kernel, types, constexprs, num_warps=warps)
            out[f"adafactor-{label}-{phase}"] = report(kernel)
    print(json.dumps(out))
    """
)

OFF = {"HAS_GRAD_SCALE": False, "HAS_FOUND_INF": False, "HAS_CLIP": False, "MASTER": False, "STOCHASTIC": False}
AMP_CLIP = dict(OFF, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, HAS_CLIP=True)
DECAY = {"WEIGHT_DECAY": True, "DECOUPLED": False, "MAXIMIZE": True, "PER_TENSOR_STEP": False}
ADAM = ["exp_avg", "exp_avg_sq"]
RMS = ["square_avg", "momentum_buffer", "grad_avg"]


def _case(algo, dtype, states, loads, stores, *, registers, options=(), label="", state_dtype=None, sqrt=True,
          div=True, flags=None, features=OFF, blocks=1, codes=None, stochastic_codes=False, phase=None):  # fmt: skip
    """One kernel variant. ``loads``/``stores``: how many arrays (param, grad, states) are read and
    written with 128-bit accesses on the full-block path. With master weights the param is written,
    not read, and the fp32 master copy is read and written. ``registers``: (count of the
    per-algorithm kernel before the one-kernel design, count now, the higher of the newest and the
    lowest supported Triton); the budget is the count now plus 8, never above the count before
    plus 8. ``blocks``: blocks per program (each unrolled block has its own accesses). ``codes``:
    8-bit states ("i8" or "fp8e4nv"; their codes move 4 or 8 bytes per thread, not counted in
    ``loads``/``stores``). ``phase``: the pass of a two-pass algorithm (default: its update pass)."""
    extra = {} if phase is None else {"phase": phase}
    return {**extra, "id": f"{algo}-{dtype}{label}", "algo": algo, "dtype": dtype, "state_dtype": state_dtype or dtype,
            "states": states, "options": list(options), "flags": {**DECAY, **(flags or {}), **features},
            "blocks": blocks, "loads": loads, "stores": stores, "sqrt": sqrt, "div": div, "codes": codes,
            "stochastic_codes": stochastic_codes,
            "registers": min(registers[0], registers[1]) + 8, "registers_before": registers[0]}  # fmt: skip


# Device step counts (capturable, AMP) make the update kernel read its step scalars per tensor
# (PER_TENSOR_STEP), as host steps do when tensors of one launch are at different steps.
DEVICE = {"PER_TENSOR_STEP": True}
SF = {"WEIGHT_DECAY": False, "MAXIMIZE": False}  # Schedule-Free: no skeleton decay, no maximize
SA = {"WEIGHT_DECAY": False, "MAXIMIZE": False}  # StableAdamW: decay with the clipped lr in the math, no maximize
CASES = [
    _case("adam", "fp32", ADAM, 4, 3, registers=(63, 39)),
    _case(
        "adam",
        "fp32",
        [*ADAM, "max_exp_avg_sq"],
        5,
        4,
        registers=(58, 47),
        options=[True],
        label="-amsgrad",
        flags=DEVICE,
    ),
    _case("adam", "bf16", [*ADAM, "max_exp_avg_sq"], 5, 4, registers=(130, 67), options=[True], label="-amsgrad"),
    _case("adam", "fp16", ADAM, 4, 3, registers=(111, 60)),
    _case("adam", "fp64", [*ADAM, "max_exp_avg_sq"], 5, 4, registers=(56, 56), options=[True], label="-amsgrad"),
    _case("sgd", "fp32", ["momentum_buffer"], 3, 2, registers=(40, 30), options=[True, True], sqrt=False, div=False),
    _case(
        "sgd",
        "bf16",
        [],
        2,
        1,
        registers=(32, 32),
        label="-plain",
        sqrt=False,
        div=False,
        flags={"WEIGHT_DECAY": False, "MAXIMIZE": False},
    ),
    _case("adagrad", "fp32", ["sum"], 3, 2, registers=(40, 32), flags=DEVICE),
    _case("adadelta", "fp32", ["square_avg", "acc_delta"], 4, 3, registers=(61, 42)),
    _case("rmsprop", "fp32", RMS, 5, 4, registers=(48, 47), options=[True, True]),
    _case(
        "rmsprop",
        "bf16",
        ["square_avg"],
        3,
        2,
        registers=(64, 52),
        label="-plain",
        flags={"WEIGHT_DECAY": False, "MAXIMIZE": False},
    ),
    _case("nadam", "fp32", ADAM, 4, 3, registers=(62, 44), flags=dict(DEVICE, DECOUPLED=True)),
    _case("radam", "fp32", ADAM, 4, 3, registers=(60, 40), flags=DEVICE),
    _case("adamax", "fp32", ["exp_avg", "exp_inf"], 4, 3, registers=(48, 37), sqrt=False),
    _case("rprop", "fp32", ["prev", "step_size"], 4, 3, registers=(32, 32), sqrt=False, div=False),
    _case("asgd", "fp32", ["ax"], 3, 2, registers=(32, 32), sqrt=False, div=False, flags=DEVICE),
    _case("rprop", "bf16", ["prev", "step_size"], 4, 3, registers=(36, 36), sqrt=False, div=False),
    # the update pass of LAMB and LARS (after the pass that sums their per-tensor norms)
    _case("lamb", "fp32", ADAM, 4, 3, registers=(40, 40)),
    _case("lars", "fp32", ["momentum_buffer"], 3, 2, registers=(31, 31)),
    # StableAdamW's update pass (after the pass that sums g^2 / v and the count): decay in the math
    _case("stableadamw", "fp32", ADAM, 4, 3, registers=(39, 39), options=[True], flags=SA),
    _case("stableadamw", "bf16", ADAM, 4, 3, registers=(61, 61), options=[True], flags=SA),
    # ... and their first pass (PHASE 1), which reads and sums and stores nothing: LAMB reads param,
    # grad and both moments (the update's norm needs the new moments), LARS param and grad,
    # StableAdamW grad and exp_avg_sq
    _case("lamb", "fp32", ADAM, 4, 0, registers=(32, 32), label="-sums", phase=1),
    _case("lars", "fp32", ["momentum_buffer"], 2, 0, registers=(30, 30), label="-sums", phase=1, sqrt=False, div=False),
    _case(
        "stableadamw",
        "fp32",
        ADAM,
        2,
        0,
        registers=(31, 31),
        options=[True],
        flags=SA,
        label="-sums",
        phase=1,
        sqrt=False,
    ),
    _case("adamax", "fp64", ["exp_avg", "exp_inf"], 4, 3, registers=(52, 47), sqrt=False, flags=DEVICE),
    # AMP (grad scale, inf skip), clipping, device step counts and a device lr: the same accesses
    _case(
        "adam", "fp32", ADAM, 4, 3, registers=(60, 40), label="-amp-clip-capturable", flags=DEVICE, features=AMP_CLIP
    ),
    _case(
        "nadam",
        "fp32",
        ADAM,
        4,
        3,
        registers=(64, 48),
        label="-amp-clip-capturable",
        flags=dict(DEVICE, DECOUPLED=True),
        features=AMP_CLIP,
    ),
    _case(
        "radam", "fp32", ADAM, 4, 3, registers=(64, 40), label="-amp-clip-capturable", flags=DEVICE, features=AMP_CLIP
    ),
    _case(
        "adagrad",
        "fp32",
        ["sum"],
        3,
        2,
        registers=(47, 32),
        label="-amp-clip-capturable",
        flags=DEVICE,
        features=AMP_CLIP,
    ),
    _case(
        "sgd",
        "fp32",
        ["momentum_buffer"],
        3,
        2,
        registers=(40, 30),
        options=[True, True],
        label="-amp-clip",
        sqrt=False,
        div=False,
        features=AMP_CLIP,
    ),
    # bf16 params with an fp32 master copy and fp32 moments; with stochastic rounding; fp32 with bf16 moments
    _case(
        "adam",
        "bf16",
        ADAM,
        4,
        4,
        registers=(124, 72),
        label="-master",
        state_dtype="fp32",
        features=dict(OFF, MASTER=True),
    ),
    _case(
        "rmsprop",
        "bf16",
        RMS,
        5,
        5,
        registers=(125, 80),
        options=[True, True],
        label="-master",
        state_dtype="fp32",
        features=dict(OFF, MASTER=True),
    ),
    _case("adam", "bf16", ADAM, 4, 3, registers=(111, 58)),
    _case("adam", "bf16", ADAM, 4, 3, registers=(120, 62), label="-stochastic", features=dict(OFF, STOCHASTIC=True)),
    # several blocks per program (FusedOptimizer._blocks_per_program, to be tuned on a GPU): unrolled
    _case("adam", "fp32", ADAM, 4, 3, registers=(63, 48), label="-blocks2", blocks=2),
    _case(
        "sgd",
        "fp32",
        ["momentum_buffer"],
        3,
        2,
        registers=(40, 32),
        options=[True, True],
        label="-blocks4",
        sqrt=False,
        div=False,
        blocks=4,
    ),
    _case(
        "adam",
        "fp32",
        ADAM,
        4,
        3,
        registers=(113, 63),
        label="-decoupled-bf16-states",
        state_dtype="bf16",
        flags={"DECOUPLED": True},
    ),
    # Schedule-Free AdamW: decay in the math (at y), not by the skeleton; its train()/eval() switch reads
    # the param (or the master copy) and z (read-only) and writes the param: no grad is read
    _case("schedulefree_adamw", "fp32", ["z", "exp_avg_sq"], 4, 3, registers=(40, 40), options=[True], flags=SF),
    _case(
        "schedulefree_adamw",
        "bf16",
        ["z", "exp_avg_sq"],
        4,
        4,
        registers=(74, 74),
        options=[True],
        label="-master",
        state_dtype="fp32",
        flags=SF,
        features=dict(OFF, MASTER=True),
    ),
    # Lion: the sign of an fma, decay as a factor on the param; AdEMAMix: Adam with a slow moment (host step
    # scalars), and its warm-up layout (device step counts: step scalars from the per-tensor table)
    _case(
        "lion",
        "fp32",
        ["exp_avg"],
        3,
        2,
        registers=(28, 28),
        sqrt=False,
        div=False,
        flags={"DECOUPLED": True, "MAXIMIZE": False},
    ),
    _case("ademamix", "fp32", ["exp_avg", "exp_avg_sq", "exp_avg_slow"], 5, 4, registers=(46, 46)),
    _case(
        "ademamix_warmup",
        "fp32",
        ["exp_avg", "exp_avg_sq", "exp_avg_slow"],
        5,
        4,
        registers=(46, 46),
        label="-amp-clip-capturable",
        flags=dict(DEVICE, DECOUPLED=True),
        features=AMP_CLIP,
    ),
    _case("schedulefree_switch", "fp32", ["z"], 2, 1, registers=(26, 26), sqrt=False, div=False, flags=SF),
    # 8-bit states (kernels/_quant.py): codes dequantized on load and requantized on store, per block of 256;
    # int8 searches its dynamic map (8 gathers of a cached table). The masked path runs in 2 parts: in 4,
    # ptxas (Triton 3.9) kept int8 Adam at 40 registers and spilled 8 words; in 1, bf16 Adam took 126.
    _case("adam", "fp32", ADAM, 2, 1, registers=(64, 64), label="-int8", codes="i8", state_dtype="fp32"),
    _case("adam", "fp32", ADAM, 2, 1, registers=(56, 56), label="-fp8", codes="fp8e4nv", state_dtype="fp32"),
    _case("adam", "bf16", ADAM, 2, 1, registers=(80, 80), label="-int8", codes="i8", state_dtype="fp32"),
    _case(
        "adam",
        "fp32",
        ADAM,
        2,
        1,
        registers=(74, 74),
        label="-int8-sr",
        codes="i8",
        state_dtype="fp32",
        stochastic_codes=True,
    ),
    _case(
        "sgd",
        "fp32",
        ["momentum_buffer"],
        2,
        1,
        registers=(48, 48),
        options=[True, True],
        label="-int8",
        sqrt=False,
        div=False,
        codes="i8",
        state_dtype="fp32",
    ),
    _case(
        "schedulefree_adamw",
        "fp32",
        ["z", "exp_avg_sq"],
        3,
        2,
        registers=(58, 58),
        options=[True],
        label="-int8",
        codes="i8",
        state_dtype="fp32",
        flags=SF,
    ),
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
    else:  # reads param, grad, states; writes param, states (a sums pass: nothing)
        reads, writes = [p, p] + [s] * states_read, [p] + [s] * states_written if case["stores"] else []
    narrow = min(reads + writes)
    blocks = case["blocks"]
    return blocks * sum(b // narrow for b in reads), blocks * sum(b // narrow for b in writes)


def compile_report(python: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    warps = fused_optim.FusedOptimizer._num_warps
    out = subprocess.run(
        [python, "-c", SCRIPT, json.dumps(CASES), str(warps)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=["installed Triton", "lowest supported Triton"])
def report(request):
    if request.param == "installed Triton":
        return compile_report(sys.executable)
    return compile_report(request.getfixturevalue("floor_python"))


def test_every_algorithm_is_covered():
    from fused_optim.kernels import ALGORITHMS

    assert set(ALGORITHMS) == {case["algo"] for case in CASES}


# Triton 3.6 (the GPU machine's; measured here with its wheel, 2026-12-05) where it differs from
# 3.3 and 3.9: ptxas takes 100 registers for two 8-bit Adam variants, and keeps int8 SGD at 40
# registers with a spilled word (an 8-byte stack frame) where the others spill nothing.
TRITON_36 = {
    "adam-bf16-int8": {"registers": 108},
    "adam-fp32-int8-sr": {"registers": 108},
    "sgd-fp32-int8": {"spill": 4},  # bytes spilled and loaded back
}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["id"])
def test_kernel_codegen_for_sm90(report, case):
    r = report[case["id"]]
    known = TRITON_36.get(case["id"], {}) if report["triton"].startswith("3.6.") else {}
    assert (r["ld128"], r["st128"]) == _expected_accesses(case), r
    assert r["local"] == 0 and r["stack_frame"] <= 2 * known.get("spill", 0), r
    assert r["spill_stores"] <= known.get("spill", 0) and r["spill_loads"] <= known.get("spill", 0), r
    assert r["registers"] <= known.get("registers", case["registers"]), r
    assert r["approx"] == 0, r  # no approximate fp32 sqrt, division or reciprocal
    if case["dtype"] != "fp64":  # fp64 sqrt and division are always correctly rounded in PTX
        assert r["sqrt_rn"] > 0 or not case["sqrt"], r
        assert r["div_rn"] > 0 or not case["div"], r
        assert r["fp64"] == 0, r  # step scalars arrive ready: no float64 math per program


def test_stochastic_rounding_draws_one_philox_per_eight_elements(report):
    """bf16 stochastic rounding needs 16 random bits per element: one Philox draw (four 32-bit words)
    serves 8 elements. Drawing one per element added 1,060 SASS instructions to bf16 Adam (Triton
    3.9, before); the four masked parts of the tail path hold most of what is left."""
    extra = report["adam-bf16-stochastic"]["sass"] - report["adam-bf16"]["sass"]
    assert extra <= 700, extra


@pytest.mark.parametrize(
    "name", sorted(n for n, a in fused_optim.kernels.ALGORITHMS.items() if a.device_scalars or not a.n_step)
)
def test_advance_kernel_codegen_for_sm90(report, name):
    """Step scalars with float64 transcendentals are computed once per tensor and step, here."""
    r = report[f"advance-{name}"]
    assert r["local"] == 0 and r["stack_frame"] == 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
    assert r["registers"] <= 64, r


@pytest.mark.parametrize("grads", ["fp32", "bf16"])
def test_grad_norm_kernel_codegen_for_sm90(report, grads):
    """The clipping reduction reads each grad once, as one 128-bit vector per thread."""
    r = report[f"clip-{grads}"]
    assert r["ld128"] == 1 and r["st128"] == 0, r
    several = report[f"clip-{grads}-blocks4"]  # four blocks per program: one vector each
    assert several["ld128"] == 4 and several["st128"] == 0, several
    assert several["local"] == 0 and several["spill_stores"] == 0 and several["registers"] <= 56, several
    assert r["local"] == 0 and r["stack_frame"] == 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0, r


# Adafactor's passes (kernels/adafactor.py), all with clipping, weight decay and maximize on:
# registers (the higher of the newest and the lowest supported Triton, measured 2026-12-05) + 8.
ADAFACTOR = {
    "fp32-0": 64, "fp32-1": 96, "fp32-2": 78, "bf16-master-0": 72, "bf16-master-1": 102, "bf16-master-2": 112,
    "bf16-stochastic-0": 80, "bf16-stochastic-1": 95, "bf16-stochastic-2": 80,
}  # fmt: skip


@pytest.mark.parametrize("variant", ADAFACTOR)
def test_adafactor_codegen_for_sm90(report, variant):
    """No spills or local memory, a register budget, IEEE fp32 math, and float64 only for the
    per-tensor coefficient of the update pass (a few scalar instructions per program)."""
    r = report[f"adafactor-{variant}"]
    assert r["local"] == 0 and r["stack_frame"] == 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
    assert r["registers"] <= ADAFACTOR[variant] + 8, r
    assert r["approx"] == 0, r
    assert r["fp64"] <= (12 if variant.endswith("-2") else 0), r
