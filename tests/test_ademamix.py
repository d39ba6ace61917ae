"""fused_optim.AdEMAMix against pytorch_optimizer.AdEMAMix itself and against a float64
implementation of the paper's formulas: params and every state tensor after every step, step
counts, the warm-up schedules, arguments, checkpoints both ways, capturable steps and the
training features.

pytorch_optimizer's single-tensor step (``foreach=False``) does what the kernel does, operation
for operation, except that torch's CPU sqrt may be one ulp off where the kernel's is IEEE: with
``Tensor.sqrt`` correctly rounded while it steps, the two are equal bit for bit. Its step count
lives in the param group (``param_groups[i]["step"]``); ours is per param, as torch.optim's, and
the two agree whenever every param has a grad at every step."""

import inspect
import math

import pytest
import torch

import fused_optim
from fused_optim.ademamix import schedule_alpha, schedule_beta3
from parity import (
    SHAPES,
    TOL,
    Config,
    NoHostReads,
    bf16_states_side_by_side,
    clip_side_by_side,
    close,
    leaves,
    one_rank_mesh,
    random_tensors,
    set_grads,
    stochastic_rounding_side_by_side,
)
from references import (
    BF16_STATES,
    EXACT,
    FUSED_FMA,
    RUN,
    compare,
    correctly_rounded_sqrt,
    grad_scale_arguments_side_by_side,
    grad_scaler_side_by_side,
    side_by_side,
)

# the reference (a test dependency; absent where only the package is installed, as on the GPU machine)
pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

# torch's CUDA kernels divide by a CPU scalar as a product with its reciprocal (the bias corrections):
# equal to the reference bit for bit on CPU, within the fp32 tolerance on a GPU
EQUAL = EXACT if not torch.cuda.is_available() else RUN


class Reference(pytorch_optimizer.AdEMAMix):
    """pytorch_optimizer's AdEMAMix, single-tensor path, stepping with a correctly rounded sqrt."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **{"foreach": False, **kwargs})

    def step(self, closure=None):
        with correctly_rounded_sqrt():
            return super().step(closure)


CONFIGS = [
    Config("defaults"),
    Config("lr and betas", {"lr": 0.01, "betas": (0.8, 0.99, 0.999)}),
    Config("beta1 0.3: lerp weight above 0.5", {"lr": 0.01, "betas": (0.3, 0.9, 0.6)}),
    Config("beta1 0", {"lr": 0.01, "betas": (0.0, 0.9, 0.99)}),
    Config("beta3 1", {"lr": 0.01, "betas": (0.9, 0.99, 1.0)}),
    Config("L2 weight_decay", {"lr": 0.01, "weight_decay": 0.1}),
    Config("weight_decouple", {"lr": 0.01, "weight_decay": 0.1, "weight_decouple": True}),
    Config("fixed_decay", {"lr": 0.01, "weight_decay": 0.01, "weight_decouple": True, "fixed_decay": True}),
    Config("fixed_decay, coupled: L2", {"lr": 0.01, "weight_decay": 0.1, "fixed_decay": True}),
    Config("alpha", {"lr": 0.01, "alpha": 2.0}),
    Config("warm-up", {"lr": 0.01, "t_alpha_beta3": 4}),
    Config("warm-up, float length", {"lr": 0.01, "t_alpha_beta3": 10.5, "betas": (0.5, 0.9, 0.99)}),
    Config("large eps", {"lr": 0.01, "eps": 1e-2}),
    Config("maximize", {"lr": 0.01, "maximize": True}),
    Config(
        "everything",
        {
            "lr": 0.02,
            "betas": (0.8, 0.95, 0.999),
            "weight_decay": 0.05,
            "weight_decouple": True,
            "fixed_decay": True,
            "alpha": 3.0,
            "t_alpha_beta3": 4,
            "eps": 1e-6,
            "maximize": True,
        },
    ),
]
EVERYTHING = CONFIGS[-1].kwargs


def check_steps(opt, ref, params, ref_params, step) -> None:
    """Our per-param step counts equal the reference's group counts (every param had a grad)."""
    for group, ref_group in zip(opt.param_groups, ref.param_groups):
        for p in group["params"]:
            assert float(opt.state[p]["step"]) == ref_group["step"] == step + 1


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_equals_pytorch_optimizer_with_a_correctly_rounded_sqrt(config, device):
    side_by_side(
        fused_optim.AdEMAMix, Reference, config.kwargs, device=device, tol=EQUAL, ours_only=("step",), check=check_steps
    )


@pytest.mark.parametrize("foreach", [False, None], ids=["single-tensor", "foreach"])
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[-1]], ids=repr)
def test_within_fp32_tolerance_of_pytorch_optimizer_as_it_is(config, foreach, device):
    first, run = TOL[torch.float32]
    side_by_side(
        fused_optim.AdEMAMix, pytorch_optimizer.AdEMAMix, config.kwargs, device=device,
        ref_kwargs={**config.kwargs, "foreach": foreach}, tol=run, first_tol=first, ours_only=("step",),
    )  # fmt: skip


def test_groups_tensor_lr_and_a_scheduler(device):
    groups = [([0, 1, 2, 7], {"lr": 0.02, "t_alpha_beta3": 3}), ([3, 4, 5, 6], {"weight_decay": 0.2, "alpha": 1.0})]
    side_by_side(
        fused_optim.AdEMAMix, Reference, {"lr": 0.01, "weight_decay": 0.1, "weight_decouple": True},
        device=device, groups=groups, tol=EQUAL, ours_only=("step",),
        scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    )  # fmt: skip
    # a 1-element tensor lr steps as the float (pytorch_optimizer's addcdiv_ takes no tensor value)
    init = random_tensors(SHAPES, torch.float32, 0, device)
    a, b = leaves(init), leaves(init)
    opts = (
        fused_optim.AdEMAMix(a, **EVERYTHING | {"lr": torch.tensor(0.01)}),
        fused_optim.AdEMAMix(b, **EVERYTHING | {"lr": 0.01}),
    )
    for step in range(3):
        set_grads(a, b, step, 0)
        for o in opts:
            o.step()
        compare(opts[0], opts[1], a, b, EXACT, f"tensor lr, step {step + 1}")


def test_fp64_params(device):
    side_by_side(
        fused_optim.AdEMAMix, Reference, EVERYTHING, device=device, dtype=torch.float64,
        tol=TOL[torch.float64][1], ours_only=("step",),
    )  # fmt: skip


# --- the paper ------------------------------------------------------------------------------------
class Paper64:
    """AdEMAMix in float64 from the paper (Algorithm 1 and the warm-up schedules of section 3),
    with per-param step counts and pytorch_optimizer's decay options."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), weight_decay=0.0, weight_decouple=False,
                 fixed_decay=False, alpha=5.0, t_alpha_beta3=None, eps=1e-8, maximize=False):  # fmt: skip
        self.params = [p.detach().double() for p in params]
        self.lr, self.betas, self.wd, self.decouple, self.fixed = lr, betas, weight_decay, weight_decouple, fixed_decay
        self.alpha, self.t, self.eps, self.maximize = alpha, t_alpha_beta3, eps, maximize
        self.state = [{} for _ in params]

    def step(self, grads):
        b1, b2, b3 = self.betas
        for i, (param, grad) in enumerate(zip(self.params, grads)):
            if grad is None:
                continue
            p = param
            g = -grad.double() if self.maximize else grad.double()
            s = self.state[i]
            if not s:
                s.update(step=0, m1=torch.zeros_like(p), m2=torch.zeros_like(p), v=torch.zeros_like(p))
            s["step"] += 1
            t = s["step"]
            alpha_t, b3_t = self.alpha, b3
            if self.t is not None:
                alpha_t = min(t * self.alpha / self.t, self.alpha)
                a = t / self.t
                b3_t = min(math.exp(math.log(b1) * math.log(b3) / ((1 - a) * math.log(b3) + a * math.log(b1))), b3)
            if self.decouple:
                p = p * (1 - self.wd * (1.0 if self.fixed else self.lr))
            else:
                g = g + self.wd * p
            s["m1"] = b1 * s["m1"] + (1 - b1) * g
            s["m2"] = b3_t * s["m2"] + (1 - b3_t) * g
            s["v"] = b2 * s["v"] + (1 - b2) * g * g
            m1_hat, v_hat = s["m1"] / (1 - b1**t), s["v"] / (1 - b2**t)
            self.params[i] = p - self.lr * (m1_hat + alpha_t * s["m2"]) / (v_hat.sqrt() + self.eps)


@pytest.mark.parametrize("config", [CONFIGS[6], CONFIGS[-1]], ids=repr)
def test_follows_the_paper_in_float64_with_per_param_steps(config, device):
    """Against float64 arithmetic of the paper's formulas, params without grads on some steps (their
    step counts stay behind): ours within the fp32 tolerance of the exact result."""
    init = random_tensors(SHAPES, torch.float32, 0, device)
    params = leaves(init)
    opt, exact = fused_optim.AdEMAMix(params, **config.kwargs), Paper64(init, **config.kwargs)
    for step in range(8):
        grads = random_tensors(SHAPES, torch.float32, 30 + step, device)
        grads = [None if (step + i) % 3 == 0 else g for i, g in enumerate(grads)]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        exact.step(grads)
        for i, (p, q) in enumerate(zip(params, exact.params)):
            close(p.double(), q, RUN, f"param {i} step {step + 1}")
            if exact.state[i]:
                assert float(opt.state[p]["step"]) == exact.state[i]["step"]
                for key, ref_key in (("exp_avg", "m1"), ("exp_avg_sq", "v"), ("exp_avg_slow", "m2")):
                    close(opt.state[p][key].double(), exact.state[i][ref_key], RUN, f"{key} {i} step {step + 1}")


def test_warmup_schedules_are_the_papers():
    """alpha_t and beta3_t as the paper writes them, equal to pytorch_optimizer's (no epsilon in the
    logarithms): beta3_t rises from about beta1 to beta3 over T steps, alpha_t linearly to alpha."""
    beta1, beta3, alpha, t = 0.9, 0.9999, 5.0, 100
    for step in range(1, 151):
        a = step / t
        paper = min(
            math.exp(math.log(beta1) * math.log(beta3) / ((1 - a) * math.log(beta3) + a * math.log(beta1))), beta3
        )
        assert schedule_beta3(float(step), beta1, beta3, t) == paper
        assert paper == pytorch_optimizer.AdEMAMix.schedule_beta3(t, step, beta1, beta3)
        assert schedule_alpha(float(step), alpha, t) == min(step * alpha / t, alpha)
        assert schedule_alpha(float(step), alpha, t) == pytorch_optimizer.AdEMAMix.schedule_alpha(t, step, alpha)
    assert schedule_beta3(0.0, beta1, beta3, t) == pytest.approx(beta1, rel=1e-15)
    assert all(schedule_beta3(s, beta1, beta3, t) < schedule_beta3(s + 1.0, beta1, beta3, t) for s in range(t))
    assert schedule_beta3(float(t), beta1, beta3, t) == pytest.approx(beta3, rel=1e-15)
    assert schedule_alpha(float(t), alpha, t) == alpha
    assert schedule_beta3(7.0, beta1, beta3, None) == beta3 and schedule_alpha(7.0, alpha, None) == alpha


# --- checkpoints ------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["ours to ours", "ours to pytorch_optimizer", "pytorch_optimizer to ours"])
def test_state_dict_round_trip(direction, device, tmp_path):
    """Train, save, load into a fresh optimizer (ours or pytorch_optimizer's), and both go on equal:
    our state_dict carries each group's step as pytorch_optimizer keeps it, and loading one of its
    checkpoints gives every param its group's step (and keeps our maximize, which it does not save)."""
    src_cls, dst_cls = {
        "ours to ours": (fused_optim.AdEMAMix, fused_optim.AdEMAMix),
        "ours to pytorch_optimizer": (fused_optim.AdEMAMix, Reference),
        "pytorch_optimizer to ours": (Reference, fused_optim.AdEMAMix),
    }[direction]
    src_params = leaves(random_tensors(SHAPES, torch.float32, 0, device))
    kwargs = EVERYTHING | {"foreach": False}  # saved in the groups: pytorch_optimizer's single-tensor path
    src = src_cls(src_params, **kwargs)
    for step in range(3):
        for p, g in zip(src_params, random_tensors(SHAPES, torch.float32, 10 + step, device)):
            p.grad = g
        src.step()
    torch.save(src.state_dict(), tmp_path / "optim.pt")
    dst_params = leaves([p.detach() for p in src_params])
    dst = dst_cls(dst_params, **kwargs)
    saved = torch.load(tmp_path / "optim.pt")
    if src_cls is fused_optim.AdEMAMix:
        assert saved["param_groups"][0]["step"] == 3 and all(s["step"] == 3 for s in saved["state"].values())
    dst.load_state_dict(saved)
    if dst_cls is fused_optim.AdEMAMix:
        assert dst.param_groups[0]["maximize"] is True  # pytorch_optimizer keeps it outside its groups
        assert "step" not in dst.param_groups[0] and all(float(dst.state[p]["step"]) == 3 for p in dst_params)
        ours, ours_params, theirs, their_params = dst, dst_params, src, src_params
    else:
        assert dst.param_groups[0]["step"] == 3
        for p in dst_params:  # our per-param step, carried along unused
            del dst.state[p]["step"]
        ours, ours_params, theirs, their_params = src, src_params, dst, dst_params
    for step in range(3):
        set_grads(dst_params, src_params, step, 2)
        dst.step()
        src.step()
        compare(ours, theirs, ours_params, their_params, EQUAL, f"{step + 1} steps after loading", ("step",))


# --- arguments ------------------------------------------------------------------------------------
BAD = [
    {"lr": -1e-3},
    {"lr": float("nan")},
    {"lr": torch.tensor([0.1, 0.2])},
    {"betas": (1.0, 0.9, 0.99)},
    {"betas": (0.9, 1.0, 0.99)},
    {"betas": (0.9, 0.99, 1.5)},
    {"betas": (0.9, 0.99)},
    {"weight_decay": -0.1},
    {"alpha": -1.0},
    {"eps": -1e-8},
    {"t_alpha_beta3": 0},
    {"t_alpha_beta3": -5},
    {"t_alpha_beta3": 10, "betas": (0.0, 0.9, 0.99)},  # ln(beta1)
    {"t_alpha_beta3": 10, "betas": (0.9, 0.99, 0.5)},  # beta1 > beta3: the schedule's denominator crosses 0
]


@pytest.mark.parametrize("kwargs", BAD, ids=str)
def test_bad_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError, match=r"Invalid|1-element"):
        fused_optim.AdEMAMix([torch.zeros(2, requires_grad=True)], **kwargs)


def test_signature_extends_pytorch_optimizers():
    ours = inspect.signature(fused_optim.AdEMAMix.__init__).parameters
    theirs = dict(inspect.signature(pytorch_optimizer.AdEMAMix.__init__).parameters)
    assert [(n, p.default) for n, p in theirs.items() if n != "kwargs"] == [
        (n, ours[n].default) for n in theirs if n != "kwargs"
    ]
    assert list(ours)[len(theirs) - 1 : len(theirs) + 2] == ["cautious", "stable_adamw", "capturable"]


@pytest.mark.parametrize("option", ["cautious", "stable_adamw"])
def test_options_not_implemented(option):
    with pytest.raises(NotImplementedError, match=option):
        fused_optim.AdEMAMix([torch.zeros(2, requires_grad=True)], **{option: True})
    p = torch.zeros(3, requires_grad=True)
    opt = fused_optim.AdEMAMix([torch.zeros(2, requires_grad=True)])
    opt.add_param_group({"params": [p], option: True})
    p.grad = torch.ones_like(p)
    with pytest.raises(NotImplementedError, match=option):
        opt.step()
    assert not opt.state


def test_complex_and_sparse_grads_raise_before_anything_changes(device):
    q = torch.randn(3, device=device, requires_grad=True)
    p = torch.randn(4, dtype=torch.complex64, device=device, requires_grad=True)
    opt = fused_optim.AdEMAMix([q, p], lr=0.1)
    q.grad, p.grad = torch.ones_like(q), torch.ones_like(p)
    before = q.detach().clone()
    with pytest.raises(NotImplementedError, match="complex"):
        opt.step()
    opt = fused_optim.AdEMAMix([q, torch.randn(4, device=device, requires_grad=True)], lr=0.1)
    opt.param_groups[0]["params"][1].grad = torch.ones(4, device=device).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(q.detach(), before) and not opt.state


# --- capturable -------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[2], CONFIGS[-1]], ids=repr)
def test_capturable_and_host_steps_give_identical_results(config, device):
    """Step scalars from the device step counts (the warm-up schedules included, in float64 in the
    advance kernel) equal the host's: params and every state key bit for bit, grads None on some steps."""
    init = random_tensors(SHAPES, torch.float32, 0, device)
    params, host_params = leaves(init), leaves(init)
    opt = fused_optim.AdEMAMix(params, **config.kwargs, capturable=True)
    host = fused_optim.AdEMAMix(host_params, **config.kwargs)
    for step in range(7):
        set_grads(params, host_params, step, 0, grad_none=lambda s, i: s < 3 and (s + i) % 4 == 0)
        if step == 4:  # the warm-up switched on or off mid-run, same tables: the other step-scalar layout
            for o in (opt, host):
                o.param_groups[0]["t_alpha_beta3"] = None if config.kwargs.get("t_alpha_beta3") else 5
        opt.step()
        host.step()
        compare(opt, host, params, host_params, EXACT, f"after step {step + 1}")
    stepped = [p for p in params if opt.state[p]]
    assert all(opt.state[p]["step"].device == p.device and opt.state[p]["step"].dtype == torch.float32 for p in stepped)


def test_capturable_step_with_amp_clip_and_a_scheduled_tensor_lr_reads_nothing_on_the_host(device):
    params = leaves(random_tensors(SHAPES, torch.float32, 0, device))
    kwargs = dict(EVERYTHING, lr=torch.tensor(0.01, device=device))
    opt = fused_optim.AdEMAMix(params, **kwargs, capturable=True, max_grad_norm=1.0)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    scaler = torch.amp.GradScaler(device.type, init_scale=256.0)
    weights = random_tensors(SHAPES, torch.float32, 1, device)
    for step in range(3):
        scaler.scale(sum((p * w).sum() for p, w in zip(params, weights))).backward()
        if step == 0:
            scaler.step(opt)  # the first step builds tables and lays out state
        else:
            with NoHostReads():
                scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad(set_to_none=False)
    assert float(opt.state[params[0]]["step"]) == 3


def test_capturable_with_a_tensor_lr_follows_a_scheduler_like_the_reference(device):
    init = random_tensors(SHAPES, torch.float32, 0, device)
    params, ref_params = leaves(init), leaves(init)
    opt = fused_optim.AdEMAMix(params, **EVERYTHING | {"lr": torch.tensor(0.02)}, capturable=True)
    ref = Reference(ref_params, **EVERYTHING)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, ref)]
    for step in range(5):
        set_grads(params, ref_params, step, 0)
        opt.step()
        ref.step()
        for s in scheds:
            s.step()
        compare(opt, ref, params, ref_params, RUN, f"after step {step + 1}", ("step",))


# --- training features -----------------------------------------------------------------------------
def _pair(device, dtype=torch.float32, **options):
    init = random_tensors(SHAPES, dtype, 0, device)
    params, ref_params = leaves(init), leaves(init)
    return (
        fused_optim.AdEMAMix(params, **EVERYTHING, **options),
        Reference(ref_params, **EVERYTHING),
        params,
        ref_params,
    )


def test_grad_scaler_unscales_and_skips_inf_steps_in_the_kernel(device):
    """Skipped steps advance neither our device step counts nor the reference's group count (GradScaler
    does not call its step)."""
    opt, ref, params, ref_params = _pair(device)
    grad_scaler_side_by_side(
        opt,
        ref,
        params,
        ref_params,
        SHAPES,
        device,
        lambda where: compare(opt, ref, params, ref_params, RUN, where, ("step",)),
    )
    assert float(opt.state[params[0]]["step"]) == ref.param_groups[0]["step"] == 4 and opt._amp_steps


def test_grad_scale_and_found_inf_as_arguments(device):
    opt, ref, params, ref_params = _pair(device)
    check = lambda where: compare(opt, ref, params, ref_params, RUN, where, ("step",))  # noqa: E731
    grad_scale_arguments_side_by_side(opt, ref, params, ref_params, device, check)


def test_max_grad_norm_clips_inside_step(device):
    opt, ref, params, ref_params = _pair(device, max_grad_norm=0.7)
    clip_side_by_side(
        opt, ref, params, ref_params, lambda where: compare(opt, ref, params, ref_params, RUN, where, ("step",))
    )


def test_master_weights_follow_pytorch_optimizer_on_fp32_copies(device):
    init = random_tensors(SHAPES, torch.bfloat16, 0, device)
    params, ref_params = leaves(init), leaves([t.float() for t in init])
    opt = fused_optim.AdEMAMix(params, **EVERYTHING, master_weights=True)
    ref = Reference(ref_params, **EVERYTHING)
    for step in range(4):
        for p, q, g in zip(params, ref_params, random_tensors(SHAPES, torch.bfloat16, 10 + step, device)):
            p.grad, q.grad = g, g.float()
        opt.step()
        ref.step()
        for i, (p, q) in enumerate(zip(params, ref_params)):
            state = opt.state[p]
            close(state["master_param"], q.detach(), EQUAL, f"master {i} step {step + 1}")
            assert torch.equal(p.detach(), state["master_param"].bfloat16()), f"param {i} step {step + 1}"
            for key, value in ref.state[q].items():
                assert state[key].dtype == torch.float32, key
                close(state[key], value, EQUAL, f"{key} of param {i} step {step + 1}")


@pytest.mark.skipif(not FUSED_FMA or torch.cuda.is_available(), reason=BF16_STATES)
def test_bf16_states_equal_pytorch_optimizer_with_its_states_rounded(device):
    opt, ref, params, ref_params = _pair(device, state_dtype=torch.bfloat16)

    def check(where):
        for p in params:
            assert all(opt.state[p][k].dtype == torch.bfloat16 for k in ("exp_avg", "exp_avg_sq", "exp_avg_slow"))
        compare(opt, ref, params, ref_params, EXACT, where, ("step",))

    bf16_states_side_by_side(opt, ref, params, ref_params, check)


def test_stochastic_rounding_lands_on_a_neighbour_of_the_fp32_result(device):
    stochastic_rounding_side_by_side(
        lambda params: fused_optim.AdEMAMix(params, lr=0.01, stochastic_rounding=True),
        lambda exact: Reference(exact, lr=0.01),
        device,
    )


def test_dtensor_params_step_like_plain_tensors_and_restore_through_dcp(device, tmp_path):
    """DTensor params (one rank) take the plain tensors' steps; torch.distributed.checkpoint saves
    the optimizer (our state_dict with the group step) and restores it into a fresh one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.tensor import Shard, distribute_tensor

    shapes = [(12, 7), (30,)]
    with one_rank_mesh(device) as mesh:

        def model_of(tensors):
            model = torch.nn.ParameterList(
                [torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(0)])) for t in tensors]
            )
            return model, fused_optim.AdEMAMix(model.parameters(), **EVERYTHING)

        init = random_tensors(shapes, torch.float32, 3, device)
        model, opt = model_of([t.clone() for t in init])
        plain = leaves(init)
        ref = fused_optim.AdEMAMix(plain, **EVERYTHING)
        for step in range(3):
            for p, q, g in zip(model.parameters(), plain, random_tensors(shapes, torch.float32, 40 + step, device)):
                p.grad, q.grad = distribute_tensor(g, mesh, [Shard(0)]), g.clone()
            opt.step()
            ref.step()
            for p, q in zip(model.parameters(), plain):
                assert torch.equal(p.full_tensor(), q.detach())
                for key in ("exp_avg", "exp_avg_sq", "exp_avg_slow"):
                    assert torch.equal(opt.state[p][key].full_tensor(), ref.state[q][key])
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))
        restored, again = model_of([p.full_tensor().detach().clone() for p in model.parameters()])
        state = {"optim": get_optimizer_state_dict(restored, again)}
        dcp.load(state, checkpoint_id=str(tmp_path))
        set_optimizer_state_dict(restored, again, state["optim"])
        for p, q in zip(model.parameters(), restored.parameters()):
            assert float(again.state[q]["step"]) == 3
            for key in ("exp_avg", "exp_avg_sq", "exp_avg_slow"):
                assert torch.equal(again.state[q][key].full_tensor(), opt.state[p][key].full_tensor())
