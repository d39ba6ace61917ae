"""ScheduleFreeAdamW against the reference, ``schedulefree.AdamWScheduleFree``: params, both state
keys and the per-group entries after every step, train()/eval() switches, state_dict both ways,
schedulers, bad arguments and the training features."""

import copy
import inspect
import math

import pytest
import torch

import fused_optim
import fused_optim.schedulefree
from fused_optim import ScheduleFreeAdamW
from fused_optim.kernels._tables import record_launches
from parity import (
    SHAPES,
    TOL,
    Config,
    assert_rounded_stochastically,
    assert_same,
    bf16_states_side_by_side,
    close,
    leaves,
    one_rank_mesh,
    param_arg,
    random_tensors,
    set_grads,
)
from references import grad_scaler_side_by_side

schedulefree = pytest.importorskip("schedulefree")
Reference = schedulefree.AdamWScheduleFree

RUN = TOL[torch.float32][1]
ENTRIES = ("k", "train_mode", "weight_sum", "lr_max", "scheduled_lr")
SMALL = [(7, 13), (3, 4, 5), (), (0,), (1,)]

CONFIGS = [
    Config("defaults"),
    Config("lr + weight_decay", {"lr": 0.01, "weight_decay": 0.1}),
    Config("warmup", {"lr": 0.02, "warmup_steps": 4}),
    Config("r + weight_lr_power 1", {"lr": 0.01, "r": 1.0, "weight_lr_power": 1.0}),
    Config("no lr weighting", {"lr": 0.01, "r": 0.5, "weight_lr_power": 0.0}),
    Config("betas + eps", {"betas": (0.8, 0.99), "eps": 1e-3}),
    Config("tensor lr", {"lr": torch.tensor(0.01), "warmup_steps": 2, "weight_decay": 0.01}),
    Config(
        "everything, reference single-tensor",
        {
            "lr": 0.02,
            "betas": (0.95, 0.98),
            "eps": 1e-6,
            "weight_decay": 0.05,
            "warmup_steps": 3,
            "r": 2.0,
            "weight_lr_power": 3.0,
            "foreach": False,
        },
    ),
]
EVERYTHING = CONFIGS[-1].kwargs


def _skips(step, i):
    """Params without a grad on some steps (the group's k advances all the same)."""
    return (step + i) % 4 == 0 or (i == 1 and step < 3)


def _same_entries(opt, ref, where: str) -> None:
    """Every per-group entry equal to the reference's, with the same type (tensors where lr is one)."""
    for index, (group, theirs) in enumerate(zip(opt.param_groups, ref.param_groups)):
        assert set(group) == set(theirs), (set(group) ^ set(theirs), where)
        for key, value in theirs.items():
            if key == "params":
                continue
            mine = group[key]
            assert type(mine) is type(value), (key, type(mine), type(value), where)
            if isinstance(value, torch.Tensor):
                assert torch.equal(mine, value), (key, mine, value, where)
            else:
                assert mine == value, (index, key, mine, value, where)


def _check(opt, ref, params, ref_params, tol, where: str) -> None:
    assert_same(opt, ref, params, ref_params, tol, where)
    _same_entries(opt, ref, where)


def _pair(kwargs, device, shapes=SHAPES, dtype=torch.float32, groups=None, seed=0, **options):
    init = random_tensors(shapes, dtype, seed, device)
    params, ref_params = leaves(init), leaves(init)
    opt = ScheduleFreeAdamW(param_arg(params, groups), **copy.deepcopy(kwargs), **options)
    ref = Reference(param_arg(ref_params, groups), **copy.deepcopy(kwargs))
    opt.train()
    ref.train()
    return opt, ref, params, ref_params


def _run(kwargs, device, *, shapes=SHAPES, dtype=torch.float32, steps=6, groups=None, scheduler=None, grad_none=_skips):
    opt, ref, params, ref_params = _pair(kwargs, device, shapes, dtype, groups)
    scheds = (scheduler(opt), scheduler(ref)) if scheduler else ()
    first, run = TOL[dtype]
    for step in range(steps):
        set_grads(params, ref_params, step, 0, grad_none)
        opt.step()
        ref.step()
        for sched in scheds:
            sched.step()
        _check(opt, ref, params, ref_params, first if step == 0 else run, f"after step {step + 1}")
    return opt, ref, params, ref_params


def test_signature_and_defaults_are_the_references():
    ours = list(inspect.signature(ScheduleFreeAdamW.__init__).parameters.values())
    theirs = list(inspect.signature(Reference.__init__).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(theirs)]] == [(p.name, p.kind, p.default) for p in theirs]
    assert all(p.kind is p.KEYWORD_ONLY for p in ours[len(theirs) :])  # fused_optim's own options
    p = torch.zeros(2, requires_grad=True)
    mine, ref = ScheduleFreeAdamW([p]).param_groups[0], Reference([p]).param_groups[0]
    assert list(mine) == list(ref)  # same entries, same order (state_dict layout)
    _same_entries(ScheduleFreeAdamW([p]), Reference([p]), "at construction")


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_parity_with_the_reference(config, device):
    _run(config.kwargs, device)


def test_float64(device):
    _run(EVERYTHING, device, shapes=SMALL, dtype=torch.float64, steps=4)


def test_param_groups_scheduler_and_a_group_without_grads(device):
    """Three groups with their own options; an LR scheduler (schedule-free runs without one, but
    the reference reads whatever lr a scheduler sets: scheduled_lr, lr_max and the average weights
    follow it); group 1 has no grad at all on step 3, and its k still advances, as the reference's."""
    groups = [([0, 1, 2], {"lr": 0.01, "weight_decay": 0.1}), ([3, 4], {"warmup_steps": 3}), ([5, 6, 7], EVERYTHING)]

    def skips(step, i):
        return (step == 2 and i in (3, 4)) or (step + i) % 5 == 0

    _run(
        {}, device, groups=groups, grad_none=skips,
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.7**s if s < 3 else 1.5),
    )  # fmt: skip


def _nondense_pair(device):
    """Two params that are not dense (every other column): staged through copies in every launch."""
    bases = [torch.randn(8, 10, device=device) for _ in range(2)]
    return [b[:, ::2].requires_grad_() for b in bases], [b.clone()[:, ::2].requires_grad_() for b in bases]


def test_train_eval_round_trips(device):
    """eval() puts x in the params, train() y again, for every group in the other mode only (a
    second call changes nothing); step() in eval mode raises the reference's message."""
    opt, ref, params, ref_params = _pair({"lr": 0.3, "weight_decay": 0.01}, device, SMALL)  # z far from y
    mine, theirs = _nondense_pair(device)
    opt.add_param_group({"params": mine, "betas": (0.8, 0.99)})
    ref.add_param_group({"params": theirs, "betas": (0.8, 0.99)})
    opt.param_groups[1]["train_mode"] = ref.param_groups[1]["train_mode"] = True  # added in train mode
    params, ref_params = params + mine, ref_params + theirs
    for round_ in range(2):
        for step in range(3):
            set_grads(params, ref_params, step, round_, _skips)
            opt.step()
            ref.step()
        _check(opt, ref, params, ref_params, RUN, f"round {round_}, after the steps")
        for switch in ("eval", "eval", "train", "train", "eval", "train"):
            getattr(opt, switch)()
            getattr(ref, switch)()
            _check(opt, ref, params, ref_params, RUN, f"round {round_}, after {switch}()")
    opt.eval()
    ref.eval()
    with pytest.raises(Exception) as theirs_err:
        ref.step()
    with pytest.raises(RuntimeError) as err:
        opt.step()
    assert str(err.value) == str(theirs_err.value)


def test_before_train_nothing_moves_and_step_raises(device):
    p = torch.randn(5, device=device, requires_grad=True)
    opt = ScheduleFreeAdamW([p])
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="not in train mode"):
        opt.step()
    before = p.detach().clone()
    opt.train()  # no state yet: nothing to move
    opt.eval()
    opt.train()
    assert torch.equal(p.detach(), before) and not opt.state
    opt.step()
    assert set(opt.state[p]) == {"z", "exp_avg_sq"}


@pytest.mark.parametrize("saved_in", ["eval", "train"])
@pytest.mark.parametrize("direction", ["fused to reference", "reference to fused"])
def test_state_dict_interchange(direction, saved_in, device, tmp_path):
    """A state_dict saved by one (in eval mode, as the reference recommends, or in train mode)
    loads into the other: states and per-group entries equal at once, and both go on alike."""
    src_cls, dst_cls = (
        (ScheduleFreeAdamW, Reference) if direction == "fused to reference" else (Reference, ScheduleFreeAdamW)
    )
    kwargs = {"lr": 0.2, "weight_decay": 0.05, "warmup_steps": 2, "r": 1.0}
    src_params = leaves(random_tensors(SMALL, torch.float32, 0, device))
    src = src_cls(src_params, **kwargs)
    src.train()
    for step in range(4):
        for i, p in enumerate(src_params):
            p.grad = None if _skips(step, i) else torch.randn_like(p)
        src.step()
    if saved_in == "eval":
        src.eval()
    torch.save(src.state_dict(), tmp_path / "optim.pt")
    dst_params = leaves([p.detach() for p in src_params])
    dst = dst_cls(dst_params)
    dst.load_state_dict(torch.load(tmp_path / "optim.pt"))
    _check(dst, src, dst_params, src_params, {"rtol": 0, "atol": 0}, "right after loading")
    for switch in ("train",) if saved_in == "eval" else ("eval", "train"):  # the same lerp, bit for bit
        getattr(dst, switch)()
        getattr(src, switch)()
        _check(dst, src, dst_params, src_params, {"rtol": 0, "atol": 0}, f"{switch}() right after loading")
    for step in range(3):
        set_grads(dst_params, src_params, step, 3, _skips)
        dst.step()
        src.step()
        _check(dst, src, dst_params, src_params, RUN, f"{step + 1} steps after loading")
    dst.eval()
    src.eval()
    _check(dst, src, dst_params, src_params, RUN, "eval() after loading")


def test_copies_and_loaded_checkpoints_switch_too(device):
    """eval()/train() lay the state out first where the optimizer has none yet: a deep copy, a
    checkpoint just loaded into a fresh optimizer."""
    opt, ref, params, ref_params = _pair(EVERYTHING, device, SMALL)
    for step in range(2):
        set_grads(params, ref_params, step, 0)
        opt.step()
        ref.step()
    twin = copy.deepcopy(opt)
    twin_params = [p for group in twin.param_groups for p in group["params"]]
    loaded_params = leaves([p.detach() for p in params])
    loaded = ScheduleFreeAdamW(loaded_params)
    loaded.load_state_dict(opt.state_dict())
    for o in (opt, ref, twin, loaded):
        o.eval()
    _check(opt, ref, params, ref_params, RUN, "eval()")
    for o, ps in ((twin, twin_params), (loaded, loaded_params)):
        assert_same(o, opt, ps, params, {"rtol": 0, "atol": 0}, "eval() of a copy")


BAD = [
    ({"lr": -1e-3}, "Invalid learning rate"),
    ({"lr": float("nan")}, "Invalid learning rate"),
    ({"lr": torch.tensor([0.1, 0.2])}, "1-element"),
    ({"lr": "0.1"}, "Invalid learning rate"),
    ({"eps": -1e-8}, "Invalid epsilon"),
    ({"betas": (0.0, 0.999)}, "index 0"),
    ({"betas": (1.0, 0.999)}, "index 0"),
    ({"betas": (0.9, 1.0)}, "index 1"),
    ({"betas": (0.9, -0.1)}, "index 1"),
    ({"betas": (0.9,)}, "Invalid betas"),
    ({"weight_decay": -0.1}, "Invalid weight_decay"),
    ({"warmup_steps": -1}, "Invalid warmup_steps"),
    ({"warmup_steps": 2.5}, "Invalid warmup_steps"),
    ({"warmup_steps": True}, "Invalid warmup_steps"),
    ({"r": -1.0}, "Invalid r"),
    ({"weight_lr_power": -2.0}, "Invalid weight_lr_power"),
    ({"weight_lr_power": math.inf}, "Invalid weight_lr_power"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD, ids=[f"{k}-{m}" for k, m in BAD])
def test_bad_arguments_raise_value_error(kwargs, message):
    """The reference accepts every one of these (a negative lr runs; beta1 = 0 fails only at
    eval(), with ZeroDivisionError)."""
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=message):
        ScheduleFreeAdamW([p], **kwargs)
    with pytest.raises(ValueError, match=message):  # in a group of its own
        ScheduleFreeAdamW([{"params": [p], **kwargs}])
    opt = ScheduleFreeAdamW([p])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], **kwargs})
    assert len(opt.param_groups) == 1


def test_options_that_do_not_apply():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(NotImplementedError, match="capturable=True"):
        ScheduleFreeAdamW([p], capturable=True)
    with pytest.raises(TypeError, match="maximize"):
        ScheduleFreeAdamW([p], maximize=True)  # neither has it
    ScheduleFreeAdamW([p], foreach=False, capturable=False)


def test_complex_params_are_refused_before_anything_changes(device):
    kept = torch.randn(4, device=device, requires_grad=True)
    cplx = torch.randn(4, device=device, dtype=torch.complex64, requires_grad=True)
    opt = ScheduleFreeAdamW([kept, cplx])
    opt.train()
    kept.grad, cplx.grad = torch.ones_like(kept), torch.ones_like(cplx)
    before = kept.detach().clone()
    with pytest.raises(NotImplementedError, match="complex"):
        opt.step()
    assert torch.equal(kept.detach(), before) and not opt.state and opt.param_groups[0]["k"] == 0


def test_one_launch_per_segment_for_a_step_and_for_a_switch(device):
    params = [torch.randn(5 + i, device=device, requires_grad=True) for i in range(20)]
    params += [torch.randn(7, device=device, dtype=torch.float64, requires_grad=True)]
    opt = ScheduleFreeAdamW(params, weight_decay=0.1)
    opt.train()
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(2):
        with record_launches() as log:
            opt.step()
        assert [kernel for kernel, _ in log] == ["_update_kernel[schedulefree_adamw_math]"] * 2
    for switch in (opt.eval, opt.train):
        with record_launches() as log:
            switch()
        assert [kernel for kernel, _ in log] == ["_update_kernel[schedulefree_switch_math]"] * 2


def test_switch_where_the_kernels_do_not_run_uses_torch(device, monkeypatch):
    """A loaded checkpoint on a device without the kernels still switches, with torch's lerp_ (the
    master copy too): as the reference, and bit for bit as the kernel."""
    opt, ref, params, ref_params = _pair({"lr": 0.02}, device, SMALL)
    init = random_tensors(SMALL, torch.bfloat16, 1, device)
    low = leaves(init)
    master = ScheduleFreeAdamW(low, lr=0.02, master_weights=True)
    master.train()
    for step in range(2):
        set_grads(params, ref_params, step, 0)
        for p, q in zip(low, params):
            p.grad = None if q.grad is None else q.grad.bfloat16()
        for o in (opt, ref, master):
            o.step()
    twin = copy.deepcopy(master)
    master.eval()  # the kernel
    monkeypatch.setattr(fused_optim.schedulefree, "uses_triton", lambda device: False)
    twin.eval()
    opt.eval()
    ref.eval()
    _check(opt, ref, params, ref_params, RUN, "eval() through torch")
    twin_params = twin.param_groups[0]["params"]
    assert_same(twin, master, twin_params, low, {"rtol": 0, "atol": 0}, "eval() through torch, master weights")


# --- training features ---------------------------------------------------------------------------
def test_grad_scaler_skips_inf_steps_and_their_counters(device):
    """GradScaler hands the scale to the kernels; an inf step is skipped whole (params, states and
    the group's k, weight_sum, lr_max), as GradScaler skips the reference's step()."""
    opt, ref, params, ref_params = _pair(EVERYTHING, device, SMALL)
    assert opt._step_supports_amp_scaling and not getattr(ref, "_step_supports_amp_scaling", False)
    grad_scaler_side_by_side(
        opt, ref, params, ref_params, SMALL, device, lambda where: _check(opt, ref, params, ref_params, RUN, where)
    )
    assert opt.param_groups[0]["k"] == 4
    scale = torch.tensor(64.0, device=device)  # the same through step()'s arguments
    set_grads(params, ref_params, 9, 0)
    for p in params:
        p.grad.mul_(scale)
    opt.step(grad_scale=scale, found_inf=torch.tensor(1.0, device=device))
    _check(opt, ref, params, ref_params, RUN, "a skipped step")
    opt.step(grad_scale=scale, found_inf=torch.tensor(0.0, device=device))
    ref.step()
    _check(opt, ref, params, ref_params, RUN, "a step with grad_scale")


def test_max_grad_norm_and_clip_grad_norm(device):
    opt, ref, params, ref_params = _pair(EVERYTHING, device, SMALL, max_grad_norm=0.7)
    for step in range(3):
        set_grads(params, ref_params, step, 1, _skips)
        torch.nn.utils.clip_grad_norm_([q for q in ref_params if q.grad is not None], 0.7)
        opt.step()
        ref.step()
        _check(opt, ref, params, ref_params, RUN, f"max_grad_norm, step {step + 1}")
    opt, ref, params, ref_params = _pair(EVERYTHING, device, SMALL)
    for step in range(3):
        set_grads(params, ref_params, step, 2, _skips)
        ours = opt.clip_grad_norm_(0.5)
        theirs = torch.nn.utils.clip_grad_norm_([q for q in ref_params if q.grad is not None], 0.5)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
        opt.step()
        ref.step()
        _check(opt, ref, params, ref_params, RUN, f"clip_grad_norm_, step {step + 1}")


def test_master_weights_follow_the_reference_on_fp32_copies(device):
    """bf16 params with fp32 masters: the masters (and fp32 z, exp_avg_sq) follow the reference on
    fp32 params as fp32 parity does, through steps and switches (the master switches too), and
    every bf16 param is its master rounded to nearest."""
    init = random_tensors(SMALL, torch.bfloat16, 0, device)
    params, ref_params = leaves(init), leaves([t.float() for t in init])
    opt = ScheduleFreeAdamW(params, **EVERYTHING, master_weights=True)
    ref = Reference(ref_params, **EVERYTHING)

    def check(where):
        for i, (p, q) in enumerate(zip(params, ref_params)):
            state = opt.state[p]
            assert set(state) == {"z", "exp_avg_sq", "master_param"}
            close(state["master_param"], q, RUN, f"master of param {i} {where}")
            assert torch.equal(p, state["master_param"].bfloat16()), (i, where)
            for key, value in ref.state[q].items():
                assert state[key].dtype == torch.float32
                close(state[key], value, RUN, f"{key} of param {i} {where}")
        _same_entries(opt, ref, where)

    for o in (opt, ref):
        o.train()
    for step in range(4):
        grads = random_tensors(SMALL, torch.bfloat16, 10 + step, device)
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g, g.float()
        opt.step()
        ref.step()
        check(f"after step {step + 1}")
        if step == 2:
            for switch in ("eval", "train"):
                getattr(opt, switch)()
                getattr(ref, switch)()
                check(f"after {switch}()")


def test_stochastic_rounding_in_steps_and_switches(device):
    """bf16 params rounded stochastically, in step() and in eval(): every element on one of the two
    bf16 neighbours of the fp32 value, not always the nearest, and unbiased. The fp32 value of a
    step is the master copy of the same optimizer with master weights (the same fp32 math from the
    same bf16 inputs); that of eval() is torch's fp32 lerp of the bf16 param towards z."""
    n = 4096
    init = random_tensors([(n,)], torch.bfloat16, 5, device)
    params, exact = leaves(init), leaves(init)
    opt = ScheduleFreeAdamW(params, lr=0.01, stochastic_rounding=True)
    master = ScheduleFreeAdamW(exact, lr=0.01, master_weights=True)
    for o in (opt, master):
        o.train()
    grad = random_tensors([(n,)], torch.bfloat16, 6, device)[0]
    params[0].grad, exact[0].grad = grad, grad.clone()
    opt.step()
    master.step()
    assert_rounded_stochastically(params[0].detach(), master.state[exact[0]]["master_param"], "step")
    x = params[0].detach().float().lerp(opt.state[params[0]]["z"].float(), 1 - 1 / 0.9)
    opt.eval()
    assert_rounded_stochastically(params[0].detach(), x, "eval()")


def test_bf16_states_for_fp32_params(device):
    """state_dtype=bf16: z and exp_avg_sq stored in bf16, math in fp32; the reference is the
    reference in fp32 with both rounded to bf16 when made and after every step (z, a copy of the
    params, is then a bf16 copy: the first step, which moves y to z, rounds the params to bf16)."""
    opt, ref, params, ref_params = _pair(EVERYTHING, device, SMALL, state_dtype=torch.bfloat16)
    for q in ref_params:
        ref.state[q].update(z=q.detach().bfloat16().float(), exp_avg_sq=torch.zeros_like(q))

    def check(where):
        for i, (p, q) in enumerate(zip(params, ref_params)):
            close(p, q, RUN, f"param {i} {where}")
            for key, value in ref.state[q].items():
                assert opt.state[p][key].dtype == torch.bfloat16
                torch.testing.assert_close(opt.state[p][key].float(), value, rtol=2 * 2**-7, atol=1e-12)

    bf16_states_side_by_side(opt, ref, params, ref_params, check)
    opt.eval()
    ref.eval()
    for i, (p, q) in enumerate(zip(params, ref_params)):
        close(p, q, RUN, f"param {i} after eval()")


def test_bf16_params_no_less_accurate_than_the_references_bf16(device):
    """bf16 params without a master copy: fp32 math, one rounding per stored value; against the
    reference in float64 from the same start, no less accurate than the reference's own bf16 path."""
    init = random_tensors(SMALL, torch.bfloat16, 1, device)
    params, native, exact = leaves(init), leaves(init), leaves([t.double() for t in init])
    opts = [ScheduleFreeAdamW(params, **EVERYTHING), Reference(native, **EVERYTHING), Reference(exact, **EVERYTHING)]
    for o in opts:
        o.train()
    for step in range(8):
        for p, q, r, g in zip(params, native, exact, random_tensors(SMALL, torch.bfloat16, 100 + step, device)):
            p.grad, q.grad, r.grad = g.clone(), g.clone(), g.double()
        for o in opts:
            o.step()
    for o in opts:
        o.eval()

    def error(ps):
        return torch.cat([(p.double() - r).abs().flatten() for p, r in zip(ps, exact)]).mean().item()

    assert error(params) <= error(native) * 1.01, (error(params), error(native))


# --- distributed --------------------------------------------------------------------------------
def test_dtensor_params_take_the_steps_of_plain_ones(device):
    """DTensor params (one rank here): the kernels update each local shard, the states are DTensors
    placed like their params, eval()/train() switch the shards; bit for bit the plain tensors' run."""
    from torch.distributed.tensor import Shard, distribute_tensor

    with one_rank_mesh(device) as mesh:
        shapes = [(12, 7), (9,)]
        init = random_tensors(shapes, torch.float32, 3, device)
        params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in init]
        plain = leaves(init)
        opt, ref = ScheduleFreeAdamW(params, **EVERYTHING), ScheduleFreeAdamW(plain, **EVERYTHING)
        for o in (opt, ref):
            o.train()

        def check(where):
            for p, q in zip(params, plain):
                assert torch.equal(p.full_tensor(), q.detach()), where
                for key in ("z", "exp_avg_sq"):
                    assert isinstance(opt.state[p][key], type(p)), key
                    assert torch.equal(opt.state[p][key].full_tensor(), ref.state[q][key]), (key, where)

        for step in range(3):
            for p, q, g in zip(params, plain, random_tensors(shapes, torch.float32, 40 + step, device)):
                p.grad, q.grad = distribute_tensor(g, mesh, [Shard(0)]), g.clone()
            opt.step()
            ref.step()
            check(f"step {step + 1}")
        for o in (opt, ref):
            o.eval()
        check("eval()")


def test_distributed_checkpoint_round_trip(device, tmp_path):
    """torch.distributed.checkpoint saves and restores the state and the per-group entries. On a
    fresh optimizer, get_optimizer_state_dict runs one step with lr 0 to make the state: it needs
    train mode, as the reference's step() does."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).to(device)
    opt = ScheduleFreeAdamW(model.parameters(), **EVERYTHING)
    opt.train()
    for _ in range(3):
        model(torch.randn(5, 4, device=device)).sum().backward()
        opt.step()
        opt.zero_grad()
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=tmp_path)
    again = copy.deepcopy(model)
    fresh = ScheduleFreeAdamW(again.parameters(), **EVERYTHING)
    fresh.train()
    state = {"optim": get_optimizer_state_dict(again, fresh)}
    dcp.load(state, checkpoint_id=tmp_path)
    set_optimizer_state_dict(again, fresh, state["optim"])
    _same_entries(fresh, opt, "after loading")
    assert_same(fresh, opt, list(again.parameters()), list(model.parameters()), {"rtol": 0, "atol": 0}, "loaded")
