"""Adafactor against torch.optim.Adafactor(foreach=False): factored second moments (row_var,
col_var) for params with more than one dim, variance for vectors."""

import inspect

import pytest
import torch

import fused_optim
from algorithms import EXTENSIONS
from fused_optim.kernels._tables import record_launches
from parity import (
    TOL,
    assert_same,
    close,
    leaves,
    one_rank_mesh,
    random_tensors,
    run_interchange,
    run_parity,
    set_grads,
)

# Matrices spanning several tiles in both dims (tiles are 16 x 128), a batch of matrices, vectors
# spanning several tiles, 0-dim and size-1 params. (No empty param: torch's Adafactor divides by
# its numel ** 0.5 and raises ZeroDivisionError; see test_empty_param.)
SHAPES = [(7, 13), (2500,), (3, 4, 5), (), (1, 1), (33, 150), (1,), (2, 20, 3)]
CONFIGS = {
    "defaults": {},
    "lr": {"lr": 0.05},
    "beta2_decay": {"beta2_decay": -0.5},
    "eps": {"eps": (1e-3, 1e-2)},
    "clipping threshold d": {"d": 4.0},
    "weight_decay": {"weight_decay": 0.1},
    "maximize": {"maximize": True},
    "tensor lr": {"lr": torch.tensor(0.02)},
    "everything": {
        "lr": 0.03,
        "beta2_decay": -0.6,
        "eps": (1e-20, 2e-3),
        "d": 2.0,
        "weight_decay": 0.05,
        "maximize": True,
    },
}
EVERYTHING = CONFIGS["everything"]
BAD_ARGS = [
    {"lr": -1.0},
    {"beta2_decay": 0.5},
    {"eps": (-1.0, 1e-3)},
    {"eps": (None, -1.0)},
    {"d": 0.5},
    {"weight_decay": -1.0},
    {"lr": torch.tensor([0.1, 0.2])},
]


def _skips(step, i):
    """Params without a grad on some steps: tensors of one launch end up at different steps."""
    return (step + i) % 4 == 0 or (i == 1 and step < 3)


@pytest.mark.parametrize("kwargs", CONFIGS.values(), ids=CONFIGS)
def test_parity(kwargs, device):
    run_parity(fused_optim.Adafactor, torch.optim.Adafactor, kwargs, device=device, shapes=SHAPES, grad_none=_skips)


def test_float64(device):
    run_parity(
        fused_optim.Adafactor, torch.optim.Adafactor, EVERYTHING, device=device, shapes=SHAPES, dtype=torch.float64,
        steps=5, grad_none=_skips,
    )  # fmt: skip


def test_param_groups_and_scheduler(device):
    groups = [([0, 1, 2], {"lr": 0.05}), ([3, 4], {}), ([5, 6, 7], EVERYTHING)]
    run_parity(
        fused_optim.Adafactor, torch.optim.Adafactor, {}, device=device, shapes=SHAPES, groups=groups,
        scheduler=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8),
    )  # fmt: skip


def test_non_contiguous_params_are_staged(device):
    """The kernels walk rows: a transposed or channels_last param is staged through a contiguous copy."""
    init = random_tensors([(6, 40), (3, 5, 4, 4)], torch.float32, 1, device)
    views = [init[0].t().contiguous().t(), init[1].contiguous(memory_format=torch.channels_last)]
    params, ref = leaves(views), leaves(views)
    params = [p.detach().t().contiguous().t().requires_grad_() if i == 0 else p for i, p in enumerate(params)]
    assert not params[0].is_contiguous()
    opt, ref_opt = fused_optim.Adafactor(params, **EVERYTHING), torch.optim.Adafactor(ref, foreach=False, **EVERYTHING)
    for step in range(4):
        set_grads(params, ref, step, 1)
        opt.step()
        ref_opt.step()
        assert_same(opt, ref_opt, params, ref, TOL[torch.float32][1], f"after step {step + 1}")


def test_launches_per_step(device):
    """Three launches per segment and step (sums, norm, update), with or without matrices."""
    params = [torch.randn(5 + i, 3, device=device, requires_grad=True) for i in range(20)]
    vectors = [torch.randn(9, device=device, dtype=torch.float64, requires_grad=True)]
    opt = fused_optim.Adafactor(params + vectors)
    for p in params + vectors:
        p.grad = torch.randn_like(p)
    with record_launches() as log:
        opt.step()
    assert [name for name, _ in log] == ["_adafactor_kernel"] * 6
    # the reductions' scratch is kept with each launch's tables, allocated once, zeroed every step
    opt.step()
    scratch = [launch.tables.scratch for launch in opt._caches[0].plan.launches]
    opt.step()
    assert all(launch.tables.scratch is s for launch, s in zip(opt._caches[0].plan.launches, scratch, strict=True))


@pytest.mark.parametrize("direction", ["fused to torch", "torch to fused"])
def test_state_dict_interchange(direction, device, tmp_path):
    classes = (fused_optim.Adafactor, torch.optim.Adafactor)
    src_cls, dst_cls = classes if direction == "fused to torch" else classes[::-1]
    run_interchange(
        src_cls, dst_cls, EVERYTHING, device=device, path=tmp_path / "optim.pt", shapes=SHAPES, grad_none=_skips
    )


def test_bad_arguments_raise_like_torch():
    for kwargs in BAD_ARGS:
        with pytest.raises(Exception) as theirs:
            torch.optim.Adafactor([torch.zeros(2, requires_grad=True)], **kwargs)
        with pytest.raises(Exception) as ours:
            fused_optim.Adafactor([torch.zeros(2, requires_grad=True)], **kwargs)
        assert (type(ours.value), str(ours.value)) == (type(theirs.value), str(theirs.value)), kwargs


def test_signature_and_defaults_match_torch():
    ours = [(p.name, p.kind, p.default) for p in inspect.signature(fused_optim.Adafactor.__init__).parameters.values()]
    theirs = [
        (p.name, p.kind, p.default) for p in inspect.signature(torch.optim.Adafactor.__init__).parameters.values()
    ]
    assert ours[: len(theirs)] == theirs
    assert ours[len(theirs) :] == [(n, inspect.Parameter.KEYWORD_ONLY, d) for n, d in EXTENSIONS]


@pytest.mark.parametrize("case", ["complex", "sparse"])
def test_bad_params_raise_like_torch_and_change_nothing(case, device):
    def make(cls):
        good = torch.ones(3, 4, device=device, requires_grad=True)
        good.grad = torch.ones_like(good)
        if case == "complex":
            bad = torch.ones(3, dtype=torch.complex64, device=device, requires_grad=True)
            bad.grad = torch.ones_like(bad)
        else:
            bad = torch.ones(3, device=device, requires_grad=True)
            bad.grad = torch.eye(3, device=device)[0].to_sparse()
        return cls([good, bad]), good

    with pytest.raises(RuntimeError) as theirs:
        make(torch.optim.Adafactor)[0].step()
    opt, good = make(fused_optim.Adafactor)
    with pytest.raises(RuntimeError) as ours:
        opt.step()
    assert str(ours.value) == str(theirs.value)
    assert torch.equal(good, torch.ones_like(good)) and not opt.state


def test_amp_scale_in_step_raises(device):
    p = torch.ones(3, device=device, requires_grad=True)
    p.grad = torch.ones_like(p)
    opt = fused_optim.Adafactor([p])
    with pytest.raises(NotImplementedError, match="GradScaler"):
        opt.step(grad_scale=torch.tensor(2.0, device=device))
    assert torch.equal(p, torch.ones_like(p)) and not opt.state


def test_grad_scaler_unscales_before_the_step(device):
    """As for torch's Adafactor, GradScaler unscales the grads itself and skips steps with infs."""
    params, ref = leaves(random_tensors(SHAPES[:3], torch.float32, 2, device)), None
    ref = leaves([p.detach() for p in params])
    opt, ref_opt = fused_optim.Adafactor(params), torch.optim.Adafactor(ref, foreach=False)
    scaler = torch.amp.GradScaler(device.type, init_scale=1024.0)
    scaler.scale(torch.ones((), device=device))  # the scale exists from the first scaled loss on
    for step in range(3):
        set_grads(params, ref, step, 2)
        for p in params:
            p.grad *= 1024.0
            if step == 1:
                p.grad[0] = float("inf")
        scaler.step(opt)
        scaler.update(1024.0)
        if step != 1:
            ref_opt.step()
        assert_same(opt, ref_opt, params, ref, TOL[torch.float32][1], f"after step {step + 1}")


def test_max_grad_norm_matches_clip_then_step(device):
    params = leaves(random_tensors(SHAPES, torch.float32, 4, device))
    ref = leaves([p.detach() for p in params])
    opt = fused_optim.Adafactor(params, max_grad_norm=0.5, **EVERYTHING)
    ref_opt = torch.optim.Adafactor(ref, foreach=False, **EVERYTHING)
    for step in range(3):
        set_grads(params, ref, step, 4)
        torch.nn.utils.clip_grad_norm_(ref, 0.5)
        opt.step()
        ref_opt.step()
        assert_same(opt, ref_opt, params, ref, TOL[torch.float32][1], f"after step {step + 1}")


def test_master_weights_follow_torch_on_fp32_copies(device):
    """bf16 params with an fp32 master copy: the master follows torch's fp32 Adafactor (eps1 is
    fp32's epsilon, the master's dtype), the params are the master rounded to bf16."""
    init = random_tensors(SHAPES, torch.float32, 5, device)
    params = [t.to(torch.bfloat16).requires_grad_() for t in init]
    ref = leaves([p.detach().float() for p in params])
    opt = fused_optim.Adafactor(params, master_weights=True, **EVERYTHING)
    ref_opt = torch.optim.Adafactor(ref, foreach=False, **EVERYTHING)
    for step in range(4):
        grads = random_tensors(SHAPES, torch.float32, 50 + step, device)
        for p, q, g in zip(params, ref, grads):
            p.grad, q.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
        opt.step()
        ref_opt.step()
        for i, (p, q) in enumerate(zip(params, ref)):
            state = opt.state[p]
            close(state["master_param"], q, TOL[torch.float32][1], f"master {i}")
            assert torch.equal(p, state["master_param"].to(torch.bfloat16))
            for key, value in ref_opt.state[q].items():
                close(state[key], value, TOL[torch.float32][1], f"state {key!r} of param {i}")


def test_stochastic_rounding_lands_on_a_neighbour_of_the_fp32_result(device):
    """bf16 params rounded stochastically: each lands on one of the two bf16 values around the
    fp32 update of the same bf16 start (torch's Adafactor on fp32 copies, bf16's epsilon), and
    not always on the nearest one."""
    init = random_tensors(SHAPES, torch.float32, 6, device)
    params = [t.to(torch.bfloat16).requires_grad_() for t in init]
    ref = leaves([p.detach().float() for p in params])
    eps = (torch.finfo(torch.bfloat16).eps, 1e-3)
    # fp32 states: only the param's rounding differs from the fp32 reference
    opt = fused_optim.Adafactor(params, eps=eps, stochastic_rounding=True, state_dtype=torch.float32, lr=0.1)
    ref_opt = torch.optim.Adafactor(ref, foreach=False, eps=eps, lr=0.1)
    grads = random_tensors(SHAPES, torch.bfloat16, 60, device)
    for p, q, g in zip(params, ref, grads):
        p.grad, q.grad = g, g.float()
    opt.step()
    ref_opt.step()
    rounded_away = 0
    for p, q_leaf in zip(params, ref):
        q = q_leaf.detach()
        nearest = q.to(torch.bfloat16)
        toward = torch.where(nearest.float() < q, float("inf"), -float("inf")).to(torch.bfloat16)
        other = torch.nextafter(nearest, toward).float()  # the bf16 neighbour on q's other side
        nearest = nearest.float()
        assert ((p.float() == nearest) | (p.float() == other) | (nearest == q)).all()
        rounded_away += int((p.float() != nearest).sum())
    assert rounded_away > 100


def test_empty_param(device):
    """An empty param takes no update (torch's Adafactor raises ZeroDivisionError on it) but
    counts its steps; the others are unaffected."""
    empty, p = torch.zeros(0, device=device, requires_grad=True), torch.ones(4, 3, device=device, requires_grad=True)
    opt = fused_optim.Adafactor([empty, p])
    empty.grad, p.grad = torch.zeros(0, device=device), torch.full_like(p, 0.5)
    opt.step()
    assert float(opt.state[empty]["step"]) == 1 and opt.state[empty]["variance"].shape == (0,)
    assert (p < 1).all()


def test_dtensor_params_raise(device):
    """Factored moments of a sharded param need reductions across ranks: refused, nothing changes."""
    from torch.distributed.tensor import Shard, distribute_tensor

    with one_rank_mesh(device) as mesh:
        p = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3, device=device), mesh, [Shard(0)]))
        p.grad = distribute_tensor(torch.ones(4, 3, device=device), mesh, [Shard(0)])
        opt = fused_optim.Adafactor([p])
        with pytest.raises(NotImplementedError, match="DTensor"):
            opt.step()
        assert torch.equal(p.full_tensor(), torch.ones(4, 3, device=device)) and not opt.state


def test_bf16_states_round_the_fp32_states(device):
    """state_dtype=torch.bfloat16: after one step the factors and variance are torch's fp32 values
    rounded to bf16 (within one bf16 ulp: the sums' order differs), and each param's step is
    torch's up to the relative error those roundings allow (the update reads the stored factors)."""
    params = leaves(random_tensors(SHAPES, torch.float32, 7, device))
    ref = leaves([p.detach() for p in params])
    before = [p.detach().clone() for p in params]
    opt = fused_optim.Adafactor(params, state_dtype=torch.bfloat16, **EVERYTHING)
    ref_opt = torch.optim.Adafactor(ref, foreach=False, **EVERYTHING)
    set_grads(params, ref, 0, 7)
    opt.step()
    ref_opt.step()
    for p, q, p0 in zip(params, ref, before):
        for key, value in ref_opt.state[q].items():
            if key != "step":
                mine = opt.state[p][key]
                assert mine.dtype == torch.bfloat16
                torch.testing.assert_close(mine.float(), value, rtol=2**-7, atol=0)
        step = (q.detach() - p0).abs().max().item()
        torch.testing.assert_close(p, q, rtol=0, atol=2**-6 * step)


def test_distributed_checkpoint_round_trip(device, tmp_path):
    """torch.distributed.checkpoint (one process): save, load into a fresh model and optimizer, and
    both go on alike; the factored states keep their shapes."""
    import copy

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    torch.manual_seed(8)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).to(device)
    fresh = copy.deepcopy(model)
    x = torch.randn(4, 6, device=device)

    def train(m, opt, steps):
        for _ in range(steps):
            m(x).square().sum().backward()
            opt.step()
            opt.zero_grad()

    opt = fused_optim.Adafactor(model.parameters(), **EVERYTHING)
    train(model, opt, 2)
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=tmp_path)
    fresh.load_state_dict(model.state_dict())
    opt2 = fused_optim.Adafactor(fresh.parameters(), **EVERYTHING)
    state = {"optim": get_optimizer_state_dict(fresh, opt2)}
    dcp.load(state, checkpoint_id=tmp_path)
    set_optimizer_state_dict(fresh, opt2, state["optim"])
    assert opt2.state[fresh[0].weight]["row_var"].shape == (5, 1)
    assert_same(opt2, opt, list(fresh.parameters()), list(model.parameters()), {"rtol": 0, "atol": 0}, "loaded")
    train(model, opt, 2)
    train(fresh, opt2, 2)
    assert_same(opt2, opt, list(fresh.parameters()), list(model.parameters()), TOL[torch.float32][1], "2 steps on")
