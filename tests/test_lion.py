"""fused_optim.Lion against lion_pytorch.Lion itself: the kernel follows its arithmetic (fp32
products and fused multiply-adds as torch's CPU kernels form them), so params and ``exp_avg`` are
equal bit for bit, sign flips near zero included; then its arguments, checkpoints both ways, and
the training features."""

import pytest
import torch

import fused_optim
from parity import (
    SHAPES,
    Config,
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
    grad_scale_arguments_side_by_side,
    grad_scaler_side_by_side,
    side_by_side,
)

# the reference (a test dependency; absent where only the package is installed, as on the GPU machine)
lion_pytorch = pytest.importorskip("lion_pytorch")

Reference = lion_pytorch.Lion

CONFIGS = [
    Config("defaults"),
    Config("lr", {"lr": 0.01}),
    Config("betas", {"lr": 0.01, "betas": (0.8, 0.95)}),
    Config("beta1 0.3: weight above 0.5", {"lr": 0.01, "betas": (0.3, 0.6)}),
    Config("betas 0 and 1", {"lr": 0.01, "betas": (0.0, 1.0)}),
    Config("weight_decay", {"lr": 0.01, "weight_decay": 0.5}),
    Config("decoupled_weight_decay", {"lr": 0.01, "weight_decay": 1e-3, "decoupled_weight_decay": True}),
    Config("use_triton accepted", {"lr": 0.01, "use_triton": False}),
]


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_equals_lion_pytorch(config, device):
    side_by_side(fused_optim.Lion, Reference, config.kwargs, device=device)


def test_groups_grads_none_and_a_scheduler(device):
    """Groups with their own options, params without grads on some steps, an LR scheduler: the
    decoupled decay divides by the constructor's lr, as lion_pytorch's does."""
    groups = [([0, 1, 2, 7], {"lr": 0.02}), ([3, 4, 5, 6], {"weight_decay": 0.2, "betas": (0.5, 0.9)})]
    side_by_side(
        fused_optim.Lion, Reference, {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
        device=device, groups=groups, grad_none=lambda s, i: (s + i) % 3 == 0,
        scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    )  # fmt: skip


def test_fp64_params(device):
    side_by_side(fused_optim.Lion, Reference, {"lr": 0.01, "weight_decay": 0.3}, device=device, dtype=torch.float64)


# --- checkpoints ---------------------------------------------------------------------------------
def _train(opt, params, steps, seed):
    for step in range(steps):
        for p, g in zip(params, random_tensors(SHAPES, torch.float32, seed * 100 + step, params[0].device)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("direction", ["ours to ours", "ours to lion_pytorch", "lion_pytorch to ours"])
def test_state_dict_round_trip(direction, device, tmp_path):
    """Train, save, load into a fresh optimizer (ours or lion_pytorch's), and both go on equal."""
    kwargs = {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}
    src_cls, dst_cls = {
        "ours to ours": (fused_optim.Lion, fused_optim.Lion),
        "ours to lion_pytorch": (fused_optim.Lion, Reference),
        "lion_pytorch to ours": (Reference, fused_optim.Lion),
    }[direction]
    src_params = leaves(random_tensors(SHAPES, torch.float32, 0, device))
    src = src_cls(src_params, **kwargs)
    _train(src, src_params, 3, 1)
    torch.save(src.state_dict(), tmp_path / "optim.pt")
    dst_params = leaves([p.detach() for p in src_params])
    dst = dst_cls(dst_params, **kwargs)
    dst.load_state_dict(torch.load(tmp_path / "optim.pt"))
    if dst_cls is fused_optim.Lion:  # lion_pytorch keeps decoupled_weight_decay outside its groups
        assert dst.param_groups[0]["decoupled_weight_decay"] is True
    compare(dst, src, dst_params, src_params, EXACT, "right after loading")
    for step in range(3):
        set_grads(dst_params, src_params, step, 2)
        dst.step()
        src.step()
        compare(dst, src, dst_params, src_params, EXACT, f"{step + 1} steps after loading")


# --- arguments -----------------------------------------------------------------------------------
BAD = [
    {"lr": 0.0},
    {"lr": -1e-3},
    {"lr": float("nan")},
    {"lr": torch.tensor([0.1, 0.2])},
    {"betas": (1.5, 0.9)},
    {"betas": (0.9, -0.1)},
    {"betas": (0.9,)},
    {"weight_decay": -0.1},
]


@pytest.mark.parametrize("kwargs", BAD, ids=str)
def test_bad_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError, match=r"Invalid|1-element"):
        fused_optim.Lion([torch.zeros(2, requires_grad=True)], **kwargs)


def test_signature_and_what_does_not_apply():
    import inspect

    ours = inspect.signature(fused_optim.Lion.__init__).parameters
    theirs = inspect.signature(Reference.__init__).parameters
    assert [(n, p.default) for n, p in theirs.items()] == [(n, ours[n].default) for n in theirs]
    with pytest.raises(TypeError, match="capturable"):  # no step count to keep on the device
        fused_optim.Lion([torch.zeros(2, requires_grad=True)], capturable=True)
    p = torch.zeros(3, requires_grad=True)
    opt = fused_optim.Lion([torch.zeros(2, requires_grad=True)])
    opt.add_param_group({"params": [p], "capturable": True})
    p.grad = torch.ones_like(p)
    with pytest.raises(NotImplementedError, match="capturable"):
        opt.step()


def test_complex_params_raise_before_anything_changes(device):
    p = torch.randn(4, dtype=torch.complex64, device=device, requires_grad=True)
    q = torch.randn(3, device=device, requires_grad=True)
    opt = fused_optim.Lion([q, p], lr=0.1)
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    before = q.detach().clone()
    with pytest.raises(NotImplementedError, match="complex"):
        opt.step()
    assert torch.equal(q.detach(), before) and not opt.state


# --- training features ---------------------------------------------------------------------------
def _pair(device, dtype=torch.float32, **options):
    init = random_tensors(SHAPES, dtype, 0, device)
    params, ref_params = leaves(init), leaves(init)
    kwargs = {"lr": 0.01, "betas": (0.8, 0.95), "weight_decay": 0.1}
    return fused_optim.Lion(params, **kwargs, **options), Reference(ref_params, **kwargs), params, ref_params


def test_grad_scaler_unscales_and_skips_inf_steps_in_the_kernel(device):
    opt, ref, params, ref_params = _pair(device)
    grad_scaler_side_by_side(
        opt, ref, params, ref_params, SHAPES, device, lambda where: compare(opt, ref, params, ref_params, EXACT, where)
    )


def test_grad_scale_and_found_inf_as_arguments(device):
    opt, ref, params, ref_params = _pair(device)
    check = lambda where: compare(opt, ref, params, ref_params, EXACT, where)  # noqa: E731
    grad_scale_arguments_side_by_side(opt, ref, params, ref_params, device, check)


def test_max_grad_norm_clips_inside_step(device):
    opt, ref, params, ref_params = _pair(device, max_grad_norm=0.7)
    clip_side_by_side(opt, ref, params, ref_params, lambda where: compare(opt, ref, params, ref_params, RUN, where))


def test_master_weights_follow_lion_pytorch_on_fp32_copies(device):
    init = random_tensors(SHAPES, torch.bfloat16, 0, device)
    params, ref_params = leaves(init), leaves([t.float() for t in init])
    opt = fused_optim.Lion(params, lr=0.01, weight_decay=0.1, master_weights=True)
    ref = Reference(ref_params, lr=0.01, weight_decay=0.1)
    for step in range(4):
        for p, q, g in zip(params, ref_params, random_tensors(SHAPES, torch.bfloat16, 10 + step, device)):
            p.grad, q.grad = g, g.float()
        opt.step()
        ref.step()
        for i, (p, q) in enumerate(zip(params, ref_params)):
            state = opt.state[p]
            assert state["master_param"].dtype == state["exp_avg"].dtype == torch.float32
            close(state["master_param"], q.detach(), EXACT, f"master {i} step {step + 1}")
            close(state["exp_avg"], ref.state[q]["exp_avg"], EXACT, f"exp_avg {i} step {step + 1}")
            assert torch.equal(p.detach(), state["master_param"].bfloat16()), f"param {i} step {step + 1}"


@pytest.mark.skipif(not FUSED_FMA, reason=BF16_STATES)
def test_bf16_states_equal_lion_pytorch_with_its_state_rounded(device):
    """state_dtype=bf16: fp32 math on the stored bf16 momentum, rounded once when stored; the
    reference is lion_pytorch in fp32 with exp_avg rounded to bf16 after every step."""
    opt, ref, params, ref_params = _pair(device, state_dtype=torch.bfloat16)

    def check(where):
        assert all(opt.state[p]["exp_avg"].dtype == torch.bfloat16 for p in params)
        assert all(list(ref.state[q]) == ["exp_avg"] for q in ref_params)  # the one state, rounded
        compare(opt, ref, params, ref_params, EXACT, where)

    bf16_states_side_by_side(opt, ref, params, ref_params, check)


def test_stochastic_rounding_lands_on_a_neighbour_of_the_fp32_result(device):
    stochastic_rounding_side_by_side(
        lambda params: fused_optim.Lion(params, lr=1e-3, stochastic_rounding=True),
        lambda exact: Reference(exact, lr=1e-3),
        device,
    )


def test_dtensor_params_step_like_plain_tensors(device):
    from torch.distributed.tensor import Shard, distribute_tensor

    with one_rank_mesh(device) as mesh:
        init = random_tensors([(12, 7), (30,)], torch.float32, 3, device)
        params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in init]
        plain = leaves(init)
        opt = fused_optim.Lion(params, lr=0.01, weight_decay=0.1)
        ref = Reference(plain, lr=0.01, weight_decay=0.1)
        for step in range(3):
            for p, q, g in zip(params, plain, random_tensors([(12, 7), (30,)], torch.float32, 40 + step, device)):
                p.grad, q.grad = distribute_tensor(g, mesh, [Shard(0)]), g.clone()
            opt.step()
            ref.step()
            for p, q in zip(params, plain):
                close(p.full_tensor(), q.detach(), EXACT, f"param after step {step + 1}")
                close(opt.state[p]["exp_avg"].full_tensor(), ref.state[q]["exp_avg"], EXACT, f"step {step + 1}")
