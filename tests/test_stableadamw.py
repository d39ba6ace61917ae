"""StableAdamW against the reference, ``optimi.StableAdamW`` (for-loop path: ``foreach=False,
triton=False``): params, every state key and the per-group entries after every step, with the
update clipping active on some steps; state_dict both ways, schedulers, bad arguments, the
training features, two launches per segment."""

import copy

import pytest
import torch

import fused_optim
from fused_optim import StableAdamW
from fused_optim.kernels._tables import record_launches
from parity import SHAPES, TOL, Config, close, leaves, one_rank_mesh, param_arg, random_tensors

optimi = pytest.importorskip("optimi")

FIRST, RUN = TOL[torch.float32]
# grads scaled per step: larger than their history (RMS of g^2 / v above 1: the lr is clipped) or smaller
SCALES = (1.0, 8.0, 0.2, 3.0, 1.0, 30.0, 0.05, 2.0)

CONFIGS = [
    Config("defaults", {"lr": 1e-2}),
    Config("betas + eps, no decay", {"lr": 3e-2, "betas": (0.8, 0.95), "eps": 1e-4, "weight_decay": 0.0}),
    Config("beta1 0, large decay, eps 0", {"lr": 1e-2, "betas": (0.0, 0.5), "eps": 0.0, "weight_decay": 0.3}),
    Config("decouple_lr", {"lr": 1e-2, "weight_decay": 1e-4, "decouple_lr": True, "max_lr": 2e-2}),
    Config("tensor lr", {"lr": torch.tensor(2e-2), "weight_decay": 0.05}),
]


FOR_LOOP = {"foreach": False, "triton": False}  # optimi's for-loop path; accepted (and ignored) here


def Reference(params, **kwargs):
    return optimi.StableAdamW(params, **kwargs, **FOR_LOOP)


def Fused(params, **kwargs):
    return StableAdamW(params, **kwargs, **FOR_LOOP)


def _skips(step, i):
    """Params without a grad on some steps (the group's step count advances all the same)."""
    return (step + i) % 4 == 0 or (i == 1 and step < 3)


def _grads(shapes, dtype, step, device, seed=0):
    return [g * SCALES[step % len(SCALES)] for g in random_tensors(shapes, dtype, 1000 * seed + 100 + step, device)]


def _same_entries(opt, ref, where: str) -> None:
    """Every per-group entry equal to the reference's, with the same type (the step an int32 tensor)."""
    for index, (group, theirs) in enumerate(zip(opt.param_groups, ref.param_groups)):
        entries = [k for k in group if k != "params"]  # (a loaded group has params last, in torch.optim too)
        assert entries == [k for k in theirs if k != "params"], (list(group), list(theirs), where)
        for key, value in theirs.items():
            if key == "params":
                continue
            mine = group[key]
            assert type(mine) is type(value), (key, type(mine), type(value), where)
            if isinstance(value, torch.Tensor):
                assert mine.dtype == value.dtype and torch.equal(mine, value), (index, key, mine, value, where)
            else:
                assert mine == value, (index, key, mine, value, where)


def _same_state(opt, ref, params, ref_params, tol, where: str, entries: bool = True) -> None:
    """Params and every state key the reference keeps (``eps_sq`` in the param's dtype, ``kahan_comp``
    None), then the per-group entries."""
    for i, (p, q) in enumerate(zip(params, ref_params)):
        close(p.detach(), q.detach(), tol, f"param {i} {where}")
        mine, theirs = opt.state.get(p, {}), ref.state.get(q, {})
        assert list(mine) == list(theirs), (i, list(mine), list(theirs), where)
        for key, value in theirs.items():
            if value is None:
                assert mine[key] is None, (i, key, where)
                continue
            assert mine[key].dtype == value.dtype and mine[key].shape == value.shape, (i, key, where)
            close(mine[key], value, tol, f"state {key!r} of param {i} {where}")
    if entries:
        _same_entries(opt, ref, where)


def _pair(kwargs, device, shapes=SHAPES, dtype=torch.float32, groups=None, **options):
    init = random_tensors(shapes, dtype, 0, device)
    params, ref_params = leaves(init), leaves(init)
    opt = Fused(param_arg(params, groups), **copy.deepcopy(kwargs), **options)
    ref = Reference(param_arg(ref_params, groups), **copy.deepcopy(kwargs))
    return opt, ref, params, ref_params


def _set(params, ref_params, grads, skip=None, step=0):
    for i, (p, q, g) in enumerate(zip(params, ref_params, grads)):
        p.grad, q.grad = (None, None) if skip is not None and skip(step, i) else (g.clone(), g.clone())


def _rms(ref, q, g) -> float:
    """The reference's clipping term for one tensor, from its new second moment."""
    state = ref.state[q]
    return (g.double() ** 2 / state["exp_avg_sq"].double().clamp(min=float(state["eps_sq"]))).mean().sqrt().item()


# --- parity with optimi ---------------------------------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_matches_optimi_over_steps(config, device):
    """Eight steps with params left without grads on some of them; grads growing and shrinking so
    that the lr is clipped (RMS > 1) in some tensors and steps and not in others."""
    opt, ref, params, ref_params = _pair(config.kwargs, device)
    rms = []
    for step in range(8):
        grads = _grads(SHAPES, torch.float32, step, device)
        _set(params, ref_params, grads, _skips, step)
        opt.step()
        ref.step()
        _same_state(opt, ref, params, ref_params, FIRST if step == 0 else RUN, f"after step {step + 1}")
        rms += [_rms(ref, q, g) for i, (q, g) in enumerate(zip(ref_params, grads)) if g.numel() and not _skips(step, i)]
    assert max(rms) > 1.2 and min(rms) < 0.8, (min(rms), max(rms))


def test_float64_params(device):
    opt, ref, params, ref_params = _pair(CONFIGS[3].kwargs, device, dtype=torch.float64)
    for step in range(5):
        _set(params, ref_params, _grads(SHAPES, torch.float64, step, device), _skips, step)
        opt.step()
        ref.step()
        _same_state(opt, ref, params, ref_params, TOL[torch.float64][step > 0], f"after step {step + 1}")


def test_param_groups_and_scheduler(device):
    """Two groups with their own options (one given with ``betas``, which optimi would ignore: it is
    translated here, and the reference is given the same values as beta1, beta2), an LR scheduler
    stepped after every step."""
    a = {"lr": 2e-2, "weight_decay": 0.1}
    b = {"lr": 5e-3, "weight_decay": 0.0, "eps": 1e-5}
    init = random_tensors(SHAPES, torch.float32, 0, device)
    params, ref_params = leaves(init), leaves(init)
    opt = Fused([{"params": params[:4], **a}, {"params": params[4:], **b, "betas": (0.7, 0.9)}], lr=1e-3)
    ref = Reference(
        [{"params": ref_params[:4], **a}, {"params": ref_params[4:], **b, "beta1": 0.7, "beta2": 0.9}], lr=1e-3
    )
    scheds = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.7) for o in (opt, ref)]
    for step in range(5):
        _set(params, ref_params, _grads(SHAPES, torch.float32, step, device), _skips, step)
        opt.step()
        ref.step()
        for sched in scheds:
            sched.step()
        _same_state(opt, ref, params, ref_params, RUN, f"after step {step + 1}")


def test_eps_sq_of_each_param_is_the_one_it_was_made_with(device):
    """eps_sq is made at a param's first step from the group's eps then: with eps changed between
    two params' first steps, one launch holds tensors with different eps_sq (a per-tensor table of
    step scalars), as optimi keeps them. Tiny grads make eps_sq the bound of v."""
    shapes = [(40,), (30,), (7, 3)]
    opt, ref, params, ref_params = _pair({"lr": 1e-2, "eps": 1e-3}, device, shapes=shapes)
    for step in range(5):
        grads = [g * 1e-3 for g in _grads(shapes, torch.float32, step, device)]
        _set(params, ref_params, grads, lambda step, i: i == 2 and step < 2, step)
        for o in (opt, ref):
            o.param_groups[0]["eps"] = 1e-3 if step < 2 else 3e-3
        with record_launches() as log:
            opt.step()
        ref.step()
        _same_state(opt, ref, params, ref_params, RUN, f"after step {step + 1}")
        per_tensor = ("PER_TENSOR_STEP", "True") in log[-1][1]
        assert per_tensor == (step >= 2), step  # param 2's eps_sq differs from the others' from step 3 on
    assert float(opt.state[params[0]]["eps_sq"]) != float(opt.state[params[2]]["eps_sq"])


# --- checkpoints ------------------------------------------------------------------------------------
def _train(opt, params, steps, seed):
    for step in range(steps):
        for i, (p, g) in enumerate(zip(params, _grads(SHAPES, torch.float32, step, params[0].device, seed))):
            p.grad = None if _skips(step, i) else g
        opt.step()


@pytest.mark.parametrize("direction", ["fused to optimi", "optimi to fused", "fused to fused"])
def test_state_dict_loads_both_ways(direction, device, tmp_path):
    """Saved after some steps (params without grads on some), loaded into a fresh optimizer of the
    other (or the same) kind: equal states and group entries right after loading, then the same steps."""
    kwargs = {"lr": 2e-2, "weight_decay": 0.1}
    make = {"fused": Fused, "optimi": Reference}
    src_name, _, dst_name = direction.split()
    init = random_tensors(SHAPES, torch.float32, 0, device)
    src_params = leaves(init)
    src = make[src_name](src_params, **kwargs)
    _train(src, src_params, 4, seed=1)
    torch.save(src.state_dict(), tmp_path / "optim.pt")
    dst_params = leaves([p.detach() for p in src_params])
    dst = make[dst_name](dst_params, **kwargs)
    dst.load_state_dict(torch.load(tmp_path / "optim.pt"))
    _same_state(dst, src, dst_params, src_params, {"rtol": 0, "atol": 0}, "right after loading")
    for step in range(4):
        _set(dst_params, src_params, _grads(SHAPES, torch.float32, step, device, seed=2))
        dst.step()
        src.step()
        _same_state(dst, src, dst_params, src_params, RUN, f"{step + 1} steps after loading")


def test_deepcopy_keeps_optimis_group_entries(device):
    params = leaves(random_tensors(SHAPES, torch.float32, 0, device))
    opt = StableAdamW(params, lr=1e-2)
    _train(opt, params, 2, seed=3)
    twin = copy.deepcopy(opt)
    assert [list(g) for g in twin.param_groups] == [list(g) for g in opt.param_groups]
    assert "betas" not in twin.param_groups[0]


# --- arguments ----------------------------------------------------------------------------------------
BAD = [
    {"lr": -1e-3},
    {"lr": float("nan")},
    {"lr": float("inf")},
    {"lr": "0.1"},
    {"betas": (1.0, 0.9)},
    {"betas": (0.9, -0.1)},
    {"betas": (0.9,)},
    {"eps": -1.0},
    {"weight_decay": -0.1},
    {"max_lr": -1.0},
    {"decouple_lr": True, "max_lr": 0.0},
    {"kahan_sum": "yes"},
]


@pytest.mark.parametrize("kwargs", BAD, ids=repr)
def test_bad_arguments_raise_value_error(kwargs):
    """Where optimi takes them (a NaN or infinite lr, a zero max_lr it would divide by) or raises
    something else, a ValueError with a clear message, at construction and for an added group."""
    with pytest.raises(ValueError, match="Invalid"):
        StableAdamW([torch.zeros(2, requires_grad=True)], **{"lr": 1e-3, **kwargs})
    opt = StableAdamW([torch.zeros(2, requires_grad=True)], lr=1e-3)
    with pytest.raises(ValueError, match="Invalid"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], **kwargs})


def test_unsupported_options_raise_not_implemented():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="1-element"):
        StableAdamW([p], lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError):
        StableAdamW([p])  # lr is required, as in optimi
    with pytest.raises(NotImplementedError, match="gradient_release"):
        StableAdamW([p], lr=1e-3, gradient_release=True)
    with pytest.raises(NotImplementedError, match="capturable"):
        StableAdamW([p], lr=1e-3, capturable=True)
    opt = StableAdamW([p], lr=1e-3)
    opt.param_groups[0]["decouple_lr"] = True  # set later, without a max_lr (optimi would divide by None)
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="max_lr"):
        opt.step()
    for harmless in ({"foreach": True}, {"triton": True}, {"kahan_sum": False}, {"kahan_sum": True}):
        StableAdamW([p], lr=1e-3, **harmless)  # kahan_sum=True: no effect on fp32 params, as in optimi


def test_kahan_sum_and_complex_params_raise_before_anything_changes(device):
    bf16 = torch.randn(8, device=device).to(torch.bfloat16).requires_grad_()
    fp32 = torch.randn(5, device=device, requires_grad=True)
    opt = StableAdamW([fp32, bf16], lr=1e-2, kahan_sum=True)
    before = [fp32.detach().clone(), bf16.detach().clone()]
    fp32.grad, bf16.grad = torch.randn_like(fp32), torch.randn_like(bf16)
    with pytest.raises(NotImplementedError, match="master_weights=True"):
        opt.step()
    assert torch.equal(fp32, before[0]) and torch.equal(bf16, before[1]) and not opt.state
    assert "step" not in opt.param_groups[0]
    z = torch.randn(4, dtype=torch.complex64, device=device, requires_grad=True)
    opt = StableAdamW([z], lr=1e-2)
    z.grad = torch.randn_like(z)
    with pytest.raises(NotImplementedError, match="complex"):
        opt.step()


# --- training features -------------------------------------------------------------------------------
def test_max_grad_norm_is_clip_then_step(device):
    opt, ref, params, ref_params = _pair({"lr": 1e-2, "weight_decay": 0.1}, device, max_grad_norm=0.5)
    for step in range(4):
        _set(params, ref_params, _grads(SHAPES, torch.float32, step, device))
        torch.nn.utils.clip_grad_norm_(ref_params, 0.5)
        opt.step()
        ref.step()
        _same_state(opt, ref, params, ref_params, RUN, f"clipped step {step + 1}")


def test_amp_unscales_and_skips_inf_steps(device):
    """grad_scale unscales in the kernels; a step with found_inf set changes nothing, the group's step
    count included (GradScaler skips the reference's step()). Then GradScaler itself."""
    opt, ref, params, ref_params = _pair({"lr": 1e-2, "weight_decay": 0.1}, device)
    scale = torch.tensor(1024.0, device=device)
    for step in range(4):
        grads = _grads(SHAPES, torch.float32, step, device)
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g * 1024.0, g.clone()
        opt.step(grad_scale=scale, found_inf=torch.tensor(float(step == 1), device=device))
        if step != 1:
            ref.step()
        _same_state(opt, ref, params, ref_params, RUN, f"AMP step {step + 1}")
    scaler = torch.amp.GradScaler(device.type, init_scale=256.0)
    scaler.scale(torch.ones((), device=device))  # makes its scale
    for step in range(3):
        grads = _grads(SHAPES, torch.float32, 4 + step, device)
        if step == 1:
            grads[0] = grads[0].clone().fill_(float("inf"))
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g * scaler.get_scale(), g.clone()
        scaler.step(opt)
        scaler.update()
        if step != 1:
            ref.step()
        _same_state(opt, ref, params, ref_params, RUN, f"GradScaler step {step + 1}")


def test_master_weights_follow_optimi_on_fp32_copies(device):
    """bf16 params with fp32 master copies: the masters take the steps of optimi on fp32 copies of
    the params with the same (bf16) grads; the params are the masters rounded."""
    kwargs = {"lr": 1e-2, "weight_decay": 0.1}
    init = [t.to(torch.bfloat16) for t in random_tensors(SHAPES, torch.float32, 0, device)]
    params, ref_params = leaves(init), leaves([t.float() for t in init])
    opt, ref = Fused(params, master_weights=True, **kwargs), Reference(ref_params, **kwargs)
    for step in range(5):
        grads = _grads(SHAPES, torch.bfloat16, step, device)
        for i, (p, q, g) in enumerate(zip(params, ref_params, grads)):
            p.grad, q.grad = (None, None) if _skips(step, i) else (g, g.float())
        opt.step()
        ref.step()
        for i, (p, q) in enumerate(zip(params, ref_params)):
            if p not in opt.state:
                continue
            master = opt.state[p]["master_param"]
            close(master, q.detach(), RUN, f"master {i} step {step + 1}")
            assert torch.equal(p, master.to(torch.bfloat16))
            for key in ("exp_avg", "exp_avg_sq"):
                assert opt.state[p][key].dtype == torch.float32
                close(opt.state[p][key], ref.state[q][key], RUN, f"{key} {i} step {step + 1}")
            assert opt.state[p]["eps_sq"].dtype == torch.bfloat16  # the param's dtype, as optimi's


def test_bf16_params_as_accurate_as_optimis_bf16_paths(device):
    """bf16 params without a master copy: one rounding per stored value from fp32 math, at least as
    close to optimi's float64 run as optimi's own bf16 paths, with Kahan summation (its default for
    bf16) and without (rounding after every op). (Measured, 6 steps: mean error 3.3e-3 here, 4.2e-3
    and 5.0e-3 there; with master_weights, 6e-8 for the master copy.)"""
    kwargs = {"lr": 1e-2, "weight_decay": 0.1}
    init = [t.to(torch.bfloat16) for t in random_tensors(SHAPES, torch.float32, 0, device)]
    ours, kahan, native, exact = leaves(init), leaves(init), leaves(init), leaves([t.double() for t in init])
    opts = [StableAdamW(ours, **kwargs), Reference(kahan, **kwargs), Reference(native, kahan_sum=False, **kwargs)]
    opts.append(Reference(exact, **kwargs))
    for step in range(6):
        grads = _grads(SHAPES, torch.bfloat16, step, device)
        for ps in (ours, kahan, native, exact):
            for p, g in zip(ps, grads):
                p.grad = g.to(p.dtype)
        for o in opts:
            o.step()

    def error(ps):
        return torch.cat([(p.double() - q).abs().flatten() for p, q in zip(ps, exact)]).mean().item()

    assert opts[1].state[kahan[0]]["kahan_comp"] is not None
    assert error(ours) <= min(error(kahan), error(native)), (error(ours), error(kahan), error(native))


def test_stochastic_rounding_and_bf16_states(device):
    """bf16 params rounded stochastically stay within one bf16 spacing of optimi's float64 step from
    the same start, and are not always the nearest value; bf16 states hold its moments to bf16
    precision."""
    kwargs = {"lr": 1e-2, "weight_decay": 0.1}
    init = [t.to(torch.bfloat16) for t in random_tensors(SHAPES, torch.float32, 0, device)]
    params, exact = leaves(init), leaves([t.double() for t in init])
    opt = StableAdamW(params, stochastic_rounding=True, state_dtype=torch.bfloat16, **kwargs)
    ref = Reference(exact, **kwargs)
    grads = _grads(SHAPES, torch.bfloat16, 0, device)
    for p, q, g in zip(params, exact, grads):
        p.grad, q.grad = g, g.double()
    opt.step()
    ref.step()
    away = 0
    for i, (p, q) in enumerate(zip(params, exact)):
        spacing = q.detach().abs() * 2**-7 + 1e-30
        assert ((p.double() - q).abs() <= spacing).all(), i
        away += int((p != q.to(torch.bfloat16)).sum())
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][key].dtype == torch.bfloat16
            close(opt.state[p][key].double(), ref.state[q][key], {"rtol": 2**-8, "atol": 1e-30}, f"{key} {i}")
    assert away > 50


def test_optimis_kahan_compensation_goes_into_the_master_copy(device, tmp_path):
    """An optimi checkpoint of bf16 params with Kahan summation (its default for them) loads with
    master_weights=True: the master copy is the param plus its compensation, kahan_comp None; without
    a master copy loading raises NotImplementedError before anything changes."""
    init = [t.to(torch.bfloat16) for t in random_tensors([(7, 13), (40,)], torch.float32, 0, device)]
    src_params = leaves(init)
    src = optimi.StableAdamW(src_params, lr=1e-3, foreach=False, triton=False)
    for step in range(3):
        for p, g in zip(src_params, _grads([(7, 13), (40,)], torch.bfloat16, step, device)):
            p.grad = g
        src.step()
    comps = [src.state[p]["kahan_comp"] for p in src_params]
    assert src.param_groups[0]["kahan_sum"] is True and any(c.abs().sum() > 0 for c in comps)
    torch.save(src.state_dict(), tmp_path / "optim.pt")
    params = leaves([p.detach() for p in src_params])
    opt = StableAdamW(params, lr=1e-3, master_weights=True)
    opt.load_state_dict(torch.load(tmp_path / "optim.pt"))
    for p, q, comp in zip(params, src_params, comps):
        assert opt.state[p]["kahan_comp"] is None
        assert torch.equal(opt.state[p]["master_param"], q.detach().float() + comp.float())
    plain = StableAdamW(leaves([p.detach() for p in src_params]), lr=1e-3)
    with pytest.raises(NotImplementedError, match="master_weights=True"):
        plain.load_state_dict(torch.load(tmp_path / "optim.pt"))
    assert not plain.state and plain.param_groups[0]["setup"] is False


def test_two_launches_per_segment_and_step(device):
    """The sums, then the update: two launches of the one update kernel per segment."""
    params = [torch.randn(5 + i, device=device, requires_grad=True) for i in range(20)]
    params += [torch.randn(9, device=device, dtype=torch.float64, requires_grad=True)]
    opt = StableAdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    with record_launches() as log:
        opt.step()
    assert [kernel for kernel, _ in log] == ["_update_kernel[stableadamw_math]"] * 4
    n32, n64 = sum(p.numel() for p in params[:-1]), params[-1].numel()
    assert opt.bytes_per_step() == 36 * n32 + 72 * n64  # 28 (as AdamW) + the grad and exp_avg_sq read again


def test_dtensor_params_and_distributed_checkpoint(device, tmp_path):
    """DTensor params (one rank): the same steps as plain tensors, moments DTensors placed like their
    params, eps_sq a plain 0-dim tensor as optimi makes it; torch.distributed.checkpoint saves and
    restores the state and the group entries."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.tensor import Shard, distribute_tensor

    with one_rank_mesh(device) as mesh:
        shapes = [(12, 7), (30,)]
        init = random_tensors(shapes, torch.float32, 3, device)
        params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in init]
        plain = leaves(init)
        kwargs = {"lr": 1e-2, "weight_decay": 0.1}
        opt, ref = StableAdamW(params, **kwargs), StableAdamW(plain, **kwargs)
        for step in range(3):
            for p, q, g in zip(params, plain, _grads(shapes, torch.float32, step, device)):
                p.grad, q.grad = distribute_tensor(g, mesh, [Shard(0)]), g.clone()
            opt.step()
            ref.step()
            for p, q in zip(params, plain):
                assert torch.equal(p.full_tensor(), q.detach())
                for key in ("exp_avg", "exp_avg_sq"):
                    assert opt.state[p][key].placements == p.placements
                    assert torch.equal(opt.state[p][key].full_tensor(), ref.state[q][key])
                assert type(opt.state[p]["eps_sq"]) is torch.Tensor and opt.state[p]["kahan_comp"] is None
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).to(device)
    opt = Fused(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(torch.randn(5, 4, device=device)).sum().backward()
        opt.step()
        opt.zero_grad()
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=tmp_path)
    again = copy.deepcopy(model)
    fresh = Fused(again.parameters(), lr=1e-2)
    state = {"optim": get_optimizer_state_dict(again, fresh)}  # a fresh optimizer: one step at lr 0
    dcp.load(state, checkpoint_id=tmp_path)
    set_optimizer_state_dict(again, fresh, state["optim"])
    _same_state(fresh, opt, list(again.parameters()), list(model.parameters()), {"rtol": 0, "atol": 0}, "loaded")


def _fsdp2_whole_tensor_rms(kwargs: dict) -> None:
    """One rank of a 2-process FSDP2 job: the sharded params take the steps of optimi on the whole
    params with the same (gathered) grads, with the lr clipped on some steps: each rank's sums are
    added up over the ranks between the two launches, so the RMS is the whole tensor's."""
    import torch.distributed as dist

    import ranks as d

    torch.manual_seed(0)
    ref_model = torch.nn.Sequential(
        torch.nn.Linear(8, 19), torch.nn.Tanh(), torch.nn.Linear(19, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3)
    ).to(d._device())
    model = d.fsdp2(copy.deepcopy(ref_model))
    opt, ref = Fused(model.parameters(), **kwargs), Reference(ref_model.parameters(), **kwargs)
    rms = []
    for step in range(4):
        x, y = d.batch(step, dist.get_rank())
        (torch.nn.functional.mse_loss(model(x), y) * SCALES[step]).backward()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            q.grad = p.grad.full_tensor()
        grads = [q.grad.clone() for q in ref_model.parameters()]
        opt.step()
        ref.step()
        opt.zero_grad()
        for i, (p, q, g) in enumerate(zip(model.parameters(), ref_model.parameters(), grads)):
            where = f"param {i} step {step + 1} rank {dist.get_rank()}"
            close(p.full_tensor().detach(), q.detach(), RUN, where)
            for key in ("exp_avg", "exp_avg_sq"):
                assert opt.state[p][key].placements == p.placements, where
                close(opt.state[p][key].full_tensor(), ref.state[q][key], RUN, f"{key} of {where}")
            rms.append(_rms(ref, q, g))
    assert max(rms) > 1.2, rms  # the lr was clipped: by the whole tensor's RMS, or the params would differ


def test_fsdp2_clips_by_the_whole_tensor_rms():
    import torch.distributed as dist

    import ranks as d

    if not dist.is_available() or d.fully_shard is None:
        pytest.skip("needs torch.distributed with FSDP2")
    d.run_ranks(_fsdp2_whole_tensor_rms, d.WORLD, {"lr": 1e-2, "weight_decay": 0.1})


def test_is_exported():
    assert fused_optim.StableAdamW is StableAdamW
