"""Adam / AdamW / AMSGrad parity with torch.optim(foreach=False)."""

import pytest
import torch

import fused_optim
from parity import SHAPES, Config, run_parity

# Each hyperparameter path, and their combinations.
CONFIGS = [
    Config("defaults"),
    Config("large lr", {"lr": 0.1}),
    Config("L2 weight_decay", {"lr": 0.05, "weight_decay": 0.1}),
    Config("decoupled weight_decay", {"lr": 0.05, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    Config("amsgrad", {"lr": 0.05, "amsgrad": True}),
    Config("maximize", {"lr": 0.05, "maximize": True}),
    Config("beta1 0.6: lerp weight below 0.5", {"lr": 0.05, "betas": (0.6, 0.9)}),
    Config("beta1 0.3: lerp weight above 0.5", {"lr": 0.05, "betas": (0.3, 0.8)}),
    Config("beta1 0: no momentum", {"lr": 0.05, "betas": (0.0, 0.99)}),
    Config("large eps", {"lr": 0.05, "eps": 1e-2}),
    Config("tensor lr", {"lr": torch.tensor(0.05)}),
    Config("tensor betas", {"lr": 0.05, "betas": (torch.tensor(0.8), torch.tensor(0.95))}),
    Config(
        "everything, L2",
        {"lr": 0.03, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05, "amsgrad": True, "maximize": True},
    ),
    Config(
        "everything, decoupled",
        {
            "lr": 0.03,
            "betas": (0.8, 0.99),
            "eps": 1e-6,
            "weight_decay": 0.05,
            "amsgrad": True,
            "maximize": True,
            "decoupled_weight_decay": True,
        },
    ),
]

ADAMW_CONFIGS = [
    Config("defaults"),
    Config("amsgrad", {"lr": 0.05, "amsgrad": True}),
    Config("no decay", {"lr": 0.05, "weight_decay": 0.0}),
    Config("everything", {"lr": 0.03, "betas": (0.7, 0.9), "weight_decay": 0.3, "amsgrad": True, "maximize": True}),
]


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_adam_parity(config, device):
    run_parity(fused_optim.Adam, torch.optim.Adam, config.kwargs, device=device)


@pytest.mark.parametrize("config", ADAMW_CONFIGS, ids=repr)
def test_adamw_parity(config, device):
    run_parity(fused_optim.AdamW, torch.optim.AdamW, config.kwargs, device=device)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64, torch.complex128], ids=str)
@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_other_dtypes_parity(cls, dtype, device):
    kwargs = {"lr": 0.05, "weight_decay": 0.1, "amsgrad": True}
    run_parity(getattr(fused_optim, cls), getattr(torch.optim, cls), kwargs, device=device, dtype=dtype)


def test_grads_none_on_some_steps(device):
    """Params without a grad are skipped and their step does not advance; launches then mix
    tensors at different steps (per-tensor bias corrections)."""
    opt, _, params, _ = run_parity(
        fused_optim.Adam,
        torch.optim.Adam,
        {"lr": 0.05, "amsgrad": True},
        device=device,
        steps=12,
        grad_none=lambda step, i: (step + i) % 3 == 0 or (i == 1 and step < 5),
    )
    steps = {float(opt.state[p]["step"]) for p in params}
    assert len(steps) > 1, "the schedule was meant to leave params at different steps"


def test_param_never_stepped_has_no_state(device):
    opt, _, params, _ = run_parity(
        fused_optim.AdamW, torch.optim.AdamW, {}, device=device, steps=3, grad_none=lambda step, i: i == 0
    )
    assert len(opt.state[params[0]]) == 0


def test_many_tiny_tensors_one_group(device):
    shapes = [(1 + i % 11,) for i in range(200)]
    run_parity(fused_optim.Adam, torch.optim.Adam, {"lr": 0.05, "weight_decay": 0.01}, device=device, shapes=shapes)


def test_several_param_groups(device):
    groups = [
        ([0, 1], {"lr": 0.1, "betas": (0.8, 0.9)}),
        ([2, 3, 4], {"weight_decay": 0.2, "amsgrad": True}),
        ([5, 6, 7], {"lr": 0.02, "maximize": True, "eps": 1e-4}),
    ]
    run_parity(fused_optim.Adam, torch.optim.Adam, {"lr": 0.01}, device=device, groups=groups)


def test_add_param_group_mid_training(device):
    from parity import assert_same, leaves, random_tensors, set_grads

    init = random_tensors(SHAPES, torch.float32, 3, device)
    params, ref_params = leaves(init), leaves(init)
    opt = fused_optim.AdamW(params[:4], lr=0.05)
    ref = torch.optim.AdamW(ref_params[:4], lr=0.05, foreach=False)
    for step in range(6):
        if step == 3:
            opt.add_param_group({"params": params[4:], "lr": 0.1, "amsgrad": True})
            ref.add_param_group({"params": ref_params[4:], "lr": 0.1, "amsgrad": True})
        set_grads(params, ref_params, step, 3, grad_none=lambda s, i: s < 3 and i >= 4)
        opt.step()
        ref.step()
        assert_same(opt, ref, params, ref_params, {"rtol": 1e-5, "atol": 1e-6}, f"after step {step + 1}")


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none, device):
    from parity import assert_same, leaves, random_tensors, set_grads

    init = random_tensors(SHAPES, torch.float32, 4, device)
    params, ref_params = leaves(init), leaves(init)
    opt = fused_optim.Adam(params, lr=0.05)
    ref = torch.optim.Adam(ref_params, lr=0.05, foreach=False)
    for step in range(4):
        set_grads(params, ref_params, step, 4)
        opt.step()
        ref.step()
        opt.zero_grad(set_to_none=set_to_none)
        ref.zero_grad(set_to_none=set_to_none)
        assert all((p.grad is None) == set_to_none for p in params)
        opt.step()  # zero grads still move Adam params (momentum); None grads skip them
        ref.step()
        assert_same(opt, ref, params, ref_params, {"rtol": 1e-5, "atol": 1e-6}, f"after step {step + 1}")


def test_closure_and_hooks(device):
    w = torch.randn(5, 3, device=device, requires_grad=True)
    x = torch.randn(8, 5, device=device)
    opt = fused_optim.AdamW([w], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o is opt)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o is opt)))

    def closure():
        opt.zero_grad()
        loss = (x @ w).square().mean()
        loss.backward()
        calls.append("closure")
        return loss

    losses = [opt.step(closure).item() for _ in range(5)]
    assert calls == [("pre", True), "closure", ("post", True)] * 5
    assert losses[-1] < losses[0]


def test_noncontiguous_and_unaligned_params(device):
    """Transposed, channels_last and sliced (not dense) params; a param whose address is not
    16-byte aligned takes the masked path; grads whose layout differs from their param's, square
    ones too (whose dims' strides are a permutation of the param's)."""
    base = torch.randn(4101, device=device)

    def make():
        return [
            torch.randn(40, 30, device=device).t(),  # transposed, dense
            torch.randn(2, 3, 9, 9, device=device).to(memory_format=torch.channels_last),
            torch.randn(50, 40, device=device)[:, ::3],  # not dense: staged
            base[1:].view(41, 100),  # address 4 bytes past a 16-byte boundary
            torch.randn(6, 7, device=device),  # will get a transposed grad
            torch.randn(8, 8, device=device),  # square: its transposed grad has its very shape and strides reversed
            torch.randn(8, 8, device=device).t(),  # square and transposed: its grads come contiguous
        ]

    init = make()
    params = [t.detach().clone(memory_format=torch.preserve_format) for t in init]
    params[2], params[3] = init[2].detach(), torch.randn(4101, device=device)[1:].view(41, 100)
    params[3].copy_(init[3])
    ref_params = [t.detach().clone() for t in params]
    params = [p.requires_grad_() for p in params]
    ref_params = [p.requires_grad_() for p in ref_params]
    assert not params[0].is_contiguous() and params[3].data_ptr() % 16 != 0
    opt = fused_optim.Adam(params, lr=0.05, weight_decay=0.1)
    ref = torch.optim.Adam(ref_params, lr=0.05, weight_decay=0.1, foreach=False)
    from parity import assert_same

    for step in range(5):
        for i, (p, q) in enumerate(zip(params, ref_params)):
            g = torch.randn(p.shape, device=device)
            if i in (4, 5):
                g = torch.randn(p.shape[::-1], device=device).t()  # layout differs from the param's
            p.grad, q.grad = g.clone(memory_format=torch.preserve_format), g.clone()
        opt.step()
        ref.step()
        assert_same(opt, ref, params, ref_params, {"rtol": 1e-5, "atol": 1e-6}, f"after step {step + 1}")
    assert opt.state[params[1]]["exp_avg"].stride() == params[1].stride()


def test_grad_scaler_with_inf_steps(device):
    """torch.amp.GradScaler unscales, skips steps with inf/nan grads and adjusts its scale, as it
    does for torch.optim."""
    from parity import assert_same, leaves, random_tensors

    init = random_tensors(SHAPES, torch.float32, 5, device)
    runs = []
    for params, cls in ((leaves(init), fused_optim.AdamW), (leaves(init), torch.optim.AdamW)):
        kwargs = {} if cls is fused_optim.AdamW else {"foreach": False}
        runs.append((params, cls(params, lr=0.05, **kwargs), torch.amp.GradScaler(device.type, init_scale=256.0)))
    for step in range(8):
        weights = random_tensors(SHAPES, torch.float32, 50 + step, device)
        if step in (2, 5):
            weights[1].view(-1)[7] = float("inf") if step == 2 else float("nan")
        for params, opt, scaler in runs:
            loss = sum((p * w).sum() for p, w in zip(params, weights))
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        (ours, opt, scaler), (theirs, ref, ref_scaler) = runs
        assert scaler.get_scale() == ref_scaler.get_scale()
        assert_same(opt, ref, ours, theirs, {"rtol": 1e-5, "atol": 1e-6}, f"after step {step + 1}")
    assert float(opt.state[ours[0]]["step"]) == 6  # two skipped steps
