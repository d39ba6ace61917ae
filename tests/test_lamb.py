"""LAMB and LARS against float64 implementations of their formulas (no reference package: timm's
Lamb needs torchvision; LARS has none): params and every state key after every step."""

import pytest
import torch

import fused_optim
from fused_optim.kernels._tables import record_launches
from parity import SHAPES, TOL, close, leaves, one_rank_mesh, random_tensors

RUN = TOL[torch.float32][1]


class Lamb64:
    """LAMB in float64 from the formulas (timm's Lamb with always_adapt=True): per-param steps."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, maximize=False):
        self.params = [p.detach().double() for p in params]
        self.lr, self.betas, self.eps, self.wd, self.maximize = lr, betas, eps, weight_decay, maximize
        self.state = [{} for _ in params]

    def step(self, grads, lr=None):
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        for i, (p, grad) in enumerate(zip(self.params, grads)):
            if grad is None:
                continue
            g = -grad.double() if self.maximize else grad.double()
            s = self.state[i]
            if not s:
                s.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            s["step"] += 1
            t = s["step"]
            s["exp_avg"] = b1 * s["exp_avg"] + (1 - b1) * g
            s["exp_avg_sq"] = b2 * s["exp_avg_sq"] + (1 - b2) * g * g
            u = (s["exp_avg"] / (1 - b1**t)) / ((s["exp_avg_sq"] / (1 - b2**t)).sqrt() + self.eps) + self.wd * p
            w_norm, u_norm = p.norm(), u.norm()
            ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            self.params[i] = p - lr * ratio * u


class Lars64:
    """LARS in float64 from the formulas."""

    def __init__(
        self, params, lr=1e-3, momentum=0.9, weight_decay=0.0, trust_coefficient=1e-3, eps=1e-8, maximize=False
    ):
        self.params = [p.detach().double() for p in params]
        self.lr, self.momentum, self.wd, self.trust, self.eps = lr, momentum, weight_decay, trust_coefficient, eps
        self.maximize = maximize
        self.state = [{} for _ in params]

    def step(self, grads, lr=None):
        lr = self.lr if lr is None else lr
        for i, (p, grad) in enumerate(zip(self.params, grads)):
            if grad is None:
                continue
            g = -grad.double() if self.maximize else grad.double()
            s = self.state[i]
            buf = s.get("momentum_buffer", torch.zeros_like(p))
            p_norm, g_norm = p.norm(), g.norm()
            ratio = self.trust * p_norm / (g_norm + self.wd * p_norm + self.eps) if p_norm > 0 and g_norm > 0 else 1.0
            s["momentum_buffer"] = self.momentum * buf + ratio * (g + self.wd * p)
            self.params[i] = p - lr * s["momentum_buffer"]


# name: (float64 reference, defaults, a config, every option)
CASES = {
    "LAMB": (
        Lamb64, {}, {"lr": 0.01, "weight_decay": 0.1}, {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-4, "maximize": True}
    ),
    "LARS": (
        Lars64, {}, {"lr": 0.1, "weight_decay": 0.01},
        {"lr": 0.3, "momentum": 0.5, "trust_coefficient": 0.02, "eps": 1e-6, "maximize": True},
    ),
}  # fmt: skip
CONFIGS = [pytest.param(name, i, id=f"{name}-{i}") for name in CASES for i in range(1, 4)]


def _skips(step, i):
    return (step + i) % 4 == 0 or (i == 1 and step < 3)


def _compare(opt, params, ref, tol, where):
    for i, (p, q) in enumerate(zip(params, ref.params)):
        close(p.detach().double(), q, tol, f"param {i} {where}")
        mine, theirs = opt.state.get(p, {}), ref.state[i]
        assert set(mine) == set(theirs), (i, sorted(mine), sorted(theirs))
        for key, value in theirs.items():
            expected = torch.as_tensor(value, dtype=torch.float64)
            close(torch.as_tensor(mine[key]).double(), expected, tol, f"state {key!r} of param {i} {where}")


def _run(name, kwargs, device, steps=8, grad_none=_skips, dtype=torch.float32, **options):
    init = random_tensors(SHAPES, dtype, 0, device)
    params = leaves(init)
    opt = getattr(fused_optim, name)(params, **kwargs, **options)
    ref = CASES[name][0](init, **kwargs)
    for step in range(steps):
        grads = random_tensors(SHAPES, dtype, 100 + step, device)
        grads = [None if grad_none and grad_none(step, i) else g for i, g in enumerate(grads)]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref.step(grads)
        _compare(opt, params, ref, TOL[dtype][1], f"after step {step + 1}")
    return opt, params, ref


@pytest.mark.parametrize(("name", "config"), CONFIGS)
def test_matches_the_formulas_in_float64(name, config, device):
    _run(name, CASES[name][config], device)


@pytest.mark.parametrize("name", CASES)
def test_float64_params(name, device):
    _run(name, CASES[name][3], device, steps=4, dtype=torch.float64)


@pytest.mark.parametrize("name", CASES)
def test_param_groups_and_scheduler(name, device):
    """Two groups with their own options, an LR scheduler stepped after every step."""
    init = random_tensors(SHAPES, torch.float32, 0, device)
    params = leaves(init)
    a, b = CASES[name][2], CASES[name][3]
    opt = getattr(fused_optim, name)([{"params": params[:4], **a}, {"params": params[4:], **b}])
    refs = (CASES[name][0](init[:4], **a), CASES[name][0](init[4:], **b))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7)
    for step in range(4):
        grads = random_tensors(SHAPES, torch.float32, 200 + step, device)
        for p, g in zip(params, grads):
            p.grad = g
        lrs = [group["lr"] for group in opt.param_groups]
        opt.step()
        refs[0].step(grads[:4], lrs[0])
        refs[1].step(grads[4:], lrs[1])
        sched.step()
        _compare_groups(opt, params, refs, step)


def _compare_groups(opt, params, refs, step):
    class Both:
        params = refs[0].params + refs[1].params
        state = refs[0].state + refs[1].state

    _compare(opt, params, Both, RUN, f"after step {step + 1}")


@pytest.mark.parametrize("name", CASES)
def test_state_dict_round_trip(name, device, tmp_path):
    """Saved after some steps, loaded into a fresh optimizer: it goes on as the original does."""
    init = random_tensors(SHAPES, torch.float32, 0, device)
    params = leaves(init)
    opt = getattr(fused_optim, name)(params, **CASES[name][2])
    for step in range(3):
        for i, (p, g) in enumerate(zip(params, random_tensors(SHAPES, torch.float32, step, device))):
            p.grad = None if _skips(step, i) else g
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "optim.pt")
    twins = leaves([p.detach() for p in params])
    twin = getattr(fused_optim, name)(twins, **CASES[name][2])
    twin.load_state_dict(torch.load(tmp_path / "optim.pt"))
    for step in range(3):
        for p, q, g in zip(params, twins, random_tensors(SHAPES, torch.float32, 50 + step, device)):
            p.grad, q.grad = g, g.clone()
        opt.step()
        twin.step()
        for i, (p, q) in enumerate(zip(params, twins)):
            assert torch.equal(p, q), i
            for key, value in opt.state[p].items():
                assert torch.equal(torch.as_tensor(twin.state[q][key]), torch.as_tensor(value)), (i, key)


BAD = {
    "LAMB": [{"lr": -1e-3}, {"betas": (1.0, 0.9)}, {"betas": (0.9, -0.1)}, {"eps": -1.0}, {"weight_decay": -0.1}],
    "LARS": [{"lr": -1e-3}, {"momentum": -0.5}, {"weight_decay": -0.1}, {"trust_coefficient": 0.0}, {"eps": -1.0}],
}


@pytest.mark.parametrize("name", CASES)
def test_bad_arguments_raise_value_error(name):
    for kwargs in BAD[name]:
        with pytest.raises(ValueError, match="Invalid"):
            getattr(fused_optim, name)([torch.zeros(2, requires_grad=True)], **kwargs)
    with pytest.raises(ValueError, match="1-element"):
        getattr(fused_optim, name)([torch.zeros(2, requires_grad=True)], lr=torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("name", CASES)
def test_two_launches_per_segment_and_step(name, device):
    """The norms, then the update: two launches of the one update kernel per segment."""
    params = [torch.randn(5 + i, device=device, requires_grad=True) for i in range(20)]
    opt = getattr(fused_optim, name)(params, **CASES[name][2])
    for p in params:
        p.grad = torch.randn_like(p)
    with record_launches() as log:
        opt.step()
    math = f"_update_kernel[{name.lower()}_math]"
    assert [kernel for kernel, _ in log] == [math, math]


@pytest.mark.parametrize("name", CASES)
def test_training_features(name, device):
    """max_grad_norm is clip_grad_norm_ then the step; an AMP step with grad_scale unscales; one
    with found_inf set changes nothing."""
    kwargs = CASES[name][3]
    init = random_tensors(SHAPES, torch.float32, 0, device)
    params, clipped = leaves(init), leaves(init)
    opt = getattr(fused_optim, name)(params, max_grad_norm=0.5, **kwargs)
    ref = CASES[name][0](init, **kwargs)
    for step in range(3):
        grads = random_tensors(SHAPES, torch.float32, 300 + step, device)
        for p, q, g in zip(params, clipped, grads):
            p.grad, q.grad = g.clone(), g.clone()
        torch.nn.utils.clip_grad_norm_(clipped, 0.5)
        opt.step()
        ref.step([q.grad for q in clipped])
        _compare(opt, params, ref, RUN, f"clipped step {step + 1}")
    params = leaves(init)
    opt, ref = getattr(fused_optim, name)(params, **kwargs), CASES[name][0](init, **kwargs)
    scale = torch.tensor(1024.0, device=device)
    for step in range(3):
        grads = random_tensors(SHAPES, torch.float32, 400 + step, device)
        for p, g in zip(params, grads):
            p.grad = g * 1024.0
        found_inf = torch.tensor(float(step == 1), device=device)
        opt.step(grad_scale=scale, found_inf=found_inf)
        if step != 1:
            ref.step(grads)
        _compare(opt, params, ref, RUN, f"AMP step {step + 1}")


@pytest.mark.parametrize("name", CASES)
def test_master_weights_follow_the_formulas(name, device):
    """bf16 params with fp32 master copies: the masters follow the float64 formulas as fp32 params do."""
    init = [t.to(torch.bfloat16) for t in random_tensors(SHAPES, torch.float32, 0, device)]
    params = leaves(init)
    opt = getattr(fused_optim, name)(params, master_weights=True, **CASES[name][2])
    ref = CASES[name][0](init, **CASES[name][2])
    for step in range(4):
        grads = random_tensors(SHAPES, torch.bfloat16, 500 + step, device)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref.step(grads)
        for i, (p, q) in enumerate(zip(params, ref.params)):
            master = opt.state[p]["master_param"]
            close(master.double(), q, RUN, f"master {i} step {step + 1}")
            assert torch.equal(p, master.to(torch.bfloat16))


def test_lamb_capturable_takes_the_same_steps(device):
    """capturable=True: step counts and bias corrections on the device, the same updates."""
    init = random_tensors(SHAPES, torch.float32, 0, device)
    a, b = leaves(init), leaves(init)
    kwargs = CASES["LAMB"][3]
    opt, cap = fused_optim.LAMB(a, **kwargs), fused_optim.LAMB(b, capturable=True, **kwargs)
    for step in range(4):
        for i, (p, q, g) in enumerate(zip(a, b, random_tensors(SHAPES, torch.float32, 600 + step, device))):
            p.grad, q.grad = (None, None) if _skips(step, i) else (g, g.clone())
        opt.step()
        cap.step()
        for p, q in zip(a, b):
            close(q, p, TOL[torch.float32][0], "capturable")
            if p in opt.state:
                assert float(cap.state[q]["step"]) == float(opt.state[p]["step"])
                assert cap.state[q]["step"].device == q.device


@pytest.mark.parametrize("name", CASES)
def test_dtensor_params_take_the_same_steps(name, device, monkeypatch):
    """Element-wise math with per-tensor norms: on a one-rank mesh, DTensor params step as tensors.
    The function that combines the sums over ranks (its row masks are device tensors) is made
    once per launch, not at every step."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from fused_optim import _base

    made = []  # the norm classes of every launch a combining function was made for
    original = _base._sums_combiner
    monkeypatch.setattr(
        _base, "_sums_combiner", lambda classes, device: made.append(classes) or original(classes, device)
    )
    with one_rank_mesh(device) as mesh:
        init = random_tensors([(12, 7), (30,)], torch.float32, 3, device)
        params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in init]
        plain = leaves(init)
        kwargs = CASES[name][2]
        opt, ref = getattr(fused_optim, name)(params, **kwargs), getattr(fused_optim, name)(plain, **kwargs)
        for step in range(3):
            for p, q, g in zip(params, plain, random_tensors([(12, 7), (30,)], torch.float32, 40 + step, device)):
                p.grad, q.grad = distribute_tensor(g, mesh, [Shard(0)]), g.clone()
            opt.step()
            ref.step()
            for p, q in zip(params, plain):
                assert torch.equal(p.full_tensor(), q.detach())
        assert sum(any(made_for) for made_for in made) == 1  # the sharded params' one launch, for 3 steps


@pytest.mark.parametrize("name", CASES)
def test_stochastic_rounding_and_bf16_states(name, device):
    """bf16 params rounded stochastically stay within one bf16 spacing of the float64 step from the
    same start, and not always on the nearest value; bf16 states hold the float64 moments to bf16
    precision."""
    init = [t.to(torch.bfloat16) for t in random_tensors(SHAPES, torch.float32, 0, device)]
    params = leaves(init)
    kwargs = CASES[name][2]
    opt = getattr(fused_optim, name)(params, stochastic_rounding=True, state_dtype=torch.bfloat16, **kwargs)
    ref = CASES[name][0](init, **kwargs)
    grads = random_tensors(SHAPES, torch.bfloat16, 700, device)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    ref.step(grads)
    away = 0
    for i, (p, q) in enumerate(zip(params, ref.params)):
        spacing = q.abs() * 2**-7 + 1e-30
        assert ((p.double() - q).abs() <= spacing).all(), i
        away += int((p != q.to(torch.bfloat16)).sum())
        for key, value in ref.state[i].items():
            if key != "step":
                assert opt.state[p][key].dtype == torch.bfloat16
                close(opt.state[p][key].double(), value, {"rtol": 2**-8, "atol": 1e-30}, f"{key} of param {i}")
    assert away > 50


@pytest.mark.parametrize("name", CASES)
def test_complex_params_step_as_their_real_view(name, device):
    """As torch.optim does for complex params: the moments and the update of the real view (the
    norms are the complex tensors' norms)."""
    init = random_tensors([(5, 4), (9,)], torch.complex64, 0, device)
    params = leaves(init)
    opt = getattr(fused_optim, name)(params, **CASES[name][3])
    ref = CASES[name][0]([torch.view_as_real(t) for t in init], **CASES[name][3])
    for step in range(3):
        grads = random_tensors([(5, 4), (9,)], torch.complex64, 800 + step, device)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref.step([torch.view_as_real(g) for g in grads])
        for p, q in zip(params, ref.params):
            close(torch.view_as_real(p.detach()).double(), q, RUN, f"step {step + 1}")


def test_partial_placements_are_refused_before_anything_changes(device):
    """A Partial DTensor holds no values to take norms of: refused by the checks, not mid-step."""
    from torch.distributed.tensor import DTensor, Partial

    with one_rank_mesh(device) as mesh:
        plain = torch.nn.Parameter(torch.ones(3, device=device))
        partial = torch.nn.Parameter(DTensor.from_local(torch.ones(4, device=device), mesh, [Partial()]))
        plain.grad, partial.grad = (
            torch.ones(3, device=device),
            DTensor.from_local(torch.ones(4, device=device), mesh, [Partial()]),
        )
        opt = fused_optim.LAMB([plain, partial])
        with pytest.raises(NotImplementedError, match="Partial placement"):
            opt.step()
        assert torch.equal(plain, torch.ones(3, device=device)) and not opt.state
