"""SGD, Adagrad, Adadelta, RMSprop, NAdam, RAdam and Adamax against torch.optim(foreach=False)."""

import copy
import inspect

import pytest
import torch

import fused_optim
from algorithms import ALGORITHMS, BAD_ARGS, EXTENSIONS, everything
from fused_optim.kernels._tables import record_launches
from parity import SHAPES, assert_same, leaves, random_tensors, run_interchange, run_parity, set_grads

CASES = [
    pytest.param(name, config, id=f"{name}-{config.desc}") for name, configs in ALGORITHMS.items() for config in configs
]
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _classes(name):
    return getattr(fused_optim, name), getattr(torch.optim, name)


def _skips(step, i):
    """Params without a grad on some steps: tensors of one launch end up at different steps."""
    return (step + i) % 4 == 0 or (i == 1 and step < 3)


@pytest.mark.parametrize(("name", "config"), CASES)
def test_parity(name, config, device):
    run_parity(*_classes(name), config.kwargs, device=device, grad_none=_skips)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_complex_and_float64(name, device):
    for dtype in (torch.complex64, torch.float64):
        run_parity(*_classes(name), everything(name), device=device, dtype=dtype, steps=6, grad_none=_skips)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_param_groups_and_scheduler(name, device):
    configs = ALGORITHMS[name]
    groups = [([0, 1, 2], configs[1].kwargs), ([3, 4], {}), ([5, 6, 7], everything(name))]
    run_parity(
        *_classes(name),
        {},
        device=device,
        groups=groups,
        scheduler=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8),
    )


@pytest.mark.parametrize("name", ALGORITHMS)
def test_one_launch_per_segment_and_per_step(name, device):
    params = [torch.randn(5 + i, device=device, requires_grad=True) for i in range(40)]
    params += [torch.randn(7, device=device, dtype=torch.float64, requires_grad=True)]
    opt = _classes(name)[0](params, **everything(name))
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        with record_launches() as log:
            opt.step()
        advance = ["_advance_kernel"] if opt._device_steps(opt.param_groups[0]) else []  # ASGD: as torch, on the device
        assert [kernel for kernel, _ in log] == [*advance, f"_update_kernel[{name.lower()}_math]"] * 2


@pytest.mark.parametrize("direction", ["fused to torch", "torch to fused"])
@pytest.mark.parametrize("name", ALGORITHMS)
def test_state_dict_interchange(name, direction, device, tmp_path):
    fused_cls, torch_cls = _classes(name)
    src_cls, dst_cls = (fused_cls, torch_cls) if direction == "fused to torch" else (torch_cls, fused_cls)
    run_interchange(src_cls, dst_cls, everything(name), device=device, path=tmp_path / "optim.pt", grad_none=_skips)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_bad_arguments_raise_like_torch(name):
    fused_cls, torch_cls = _classes(name)
    for kwargs in BAD_ARGS[name]:
        with pytest.raises(Exception) as theirs:
            torch_cls([torch.zeros(2, requires_grad=True)], **kwargs)
        with pytest.raises(Exception) as ours:
            fused_cls([torch.zeros(2, requires_grad=True)], **kwargs)
        assert (type(ours.value), str(ours.value)) == (type(theirs.value), str(theirs.value)), kwargs


@pytest.mark.parametrize("name", [*ALGORITHMS, "Adam", "AdamW"])
def test_signature_and_defaults_match_torch(name):
    """torch's parameters, kinds and defaults, then fused_optim's own options, keyword-only."""
    fused_cls, torch_cls = _classes(name)
    ours = [(p.name, p.kind, p.default) for p in inspect.signature(fused_cls.__init__).parameters.values()]
    theirs = [(p.name, p.kind, p.default) for p in inspect.signature(torch_cls.__init__).parameters.values()]
    assert ours[: len(theirs)] == theirs
    assert ours[len(theirs) :] == [(n, inspect.Parameter.KEYWORD_ONLY, d) for n, d in EXTENSIONS]


@pytest.mark.parametrize("name", ALGORITHMS)
def test_differentiable_raises(name):
    with pytest.raises(NotImplementedError, match="differentiable=True"):
        _classes(name)[0]([torch.zeros(2, requires_grad=True)], differentiable=True)


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_capturable_set_on_a_group_of_an_optimizer_without_it_raises(name):
    """torch.optim.SGD and Adagrad have no capturable option; setting it on a group is refused."""
    p = torch.zeros(2, requires_grad=True)
    opt = _classes(name)[0]([p])
    opt.param_groups[0]["capturable"] = True
    p.grad = torch.ones(2)
    with pytest.raises(NotImplementedError, match="capturable=True"):
        opt.step()


@pytest.mark.parametrize("name", [n for n in ALGORITHMS if n not in ("SGD", "Adagrad")])
def test_sparse_grads_raise_like_torch(name, device):
    messages = []
    for cls in _classes(name):
        p = torch.randn(4, 3, device=device, requires_grad=True)
        p.grad = torch.randn(4, 3, device=device).to_sparse()
        before = p.detach().clone()
        with pytest.raises(RuntimeError) as err:
            cls([p]).step()
        assert torch.equal(p, before)
        messages.append(str(err.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("SGD", {"lr": 0.1}),
        ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.1}),
        ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
        ("Adagrad", {"lr": 0.1, "lr_decay": 0.01}),
    ],
)
def test_sparse_grads_match_torch(name, kwargs, device):
    """Sparse grads take torch's own code; dense params of the same group stay fused. Param 2's
    grads turn sparse after a dense step: its dense state is then a view into a flat buffer past
    its start, which torch's in-place add of a coalesced sparse grad would write outside of
    (not with Nesterov momentum, where torch refuses a sparse grad with a dense buffer)."""
    init = random_tensors([(6, 4), (7,), (5, 3)], torch.float32, 1, device)
    ours, theirs = leaves(init), leaves(init)
    opt, ref = _classes(name)[0](ours, **kwargs), _classes(name)[1](theirs, **kwargs)
    gen = torch.Generator().manual_seed(2)
    for step in range(6):
        for i, (p, q) in enumerate(zip(ours, theirs)):
            g = torch.randn(p.shape, generator=gen).to(device)
            switched = i == 2 and step > 0 and not kwargs.get("nesterov")
            if i == 0 or switched:  # an embedding-like grad: a few rows, different ones each step
                rows = torch.zeros(p.shape[0], dtype=torch.bool, device=device)
                rows[[1, 4] if step % 2 else [0, 2, 3]] = True
                g = (g * rows[:, None]).to_sparse()
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for i, (p, q) in enumerate(zip(ours, theirs)):
            torch.testing.assert_close(p, q, **TOL, msg=lambda m, i=i, s=step: f"param {i} step {s + 1}: {m}")
            assert opt.state[p].keys() == ref.state[q].keys()
            for key, value in ref.state[q].items():
                mine = opt.state[p][key]
                assert mine.layout == value.layout, (key, mine.layout, value.layout)
                torch.testing.assert_close(mine.to_dense(), value.to_dense(), **TOL)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("SGD", {"weight_decay": 0.1}), ("Adagrad", {"weight_decay": 0.1}), ("SGD", {"momentum": 0.9, "nesterov": True})],
)
def test_sparse_grads_torch_refuses_raise_like_torch(name, kwargs, device):
    """With weight decay, or (SGD) Nesterov momentum on a sparse grad whose buffer is dense (its
    earlier grads were): torch raises partway through the step; fused_optim raises the same error
    before any change."""
    messages = []
    for cls in _classes(name):
        a = torch.randn(3, device=device, requires_grad=True)
        b = torch.randn(4, 2, device=device, requires_grad=True)
        opt = cls([a, b], lr=0.1, **kwargs)
        if "nesterov" in kwargs:  # a dense step first: dense momentum buffers
            a.grad, b.grad = torch.randn(3, device=device), torch.randn(4, 2, device=device)
            opt.step()
        a.grad = torch.randn(3, device=device)
        b.grad = torch.randn(4, 2, device=device).to_sparse()
        before = [a.detach().clone(), copy.deepcopy(opt.state_dict())]
        with pytest.raises(RuntimeError) as err:
            opt.step()
        messages.append(str(err.value))
        if cls.__module__.startswith("fused_optim"):
            assert torch.equal(a, before[0])
            for key, value in before[1]["state"].get(0, {}).items():
                assert torch.equal(opt.state_dict()["state"][0][key], value), key
    assert messages[0] == messages[1]


def test_adagrad_state_exists_from_construction(device):
    init = random_tensors(SHAPES, torch.float32, 0, device)
    ours = fused_optim.Adagrad(leaves(init), initial_accumulator_value=0.3)
    theirs = torch.optim.Adagrad(leaves(init), initial_accumulator_value=0.3)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for pid, state in b["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(a["state"][pid][key], value, rtol=0, atol=0)


def test_adagrad_share_memory(device):
    opt = fused_optim.Adagrad([torch.randn(5, requires_grad=True), torch.randn(3, requires_grad=True)])
    opt.share_memory()
    assert all(opt.state[p]["sum"].is_shared() for p in opt.param_groups[0]["params"])


def test_sgd_without_momentum_keeps_no_state(device):
    opt, ref, _, _ = run_parity(fused_optim.SGD, torch.optim.SGD, {"lr": 0.1}, device=device, steps=3)
    assert len(ref.state) == 0 and len(opt.state) == 0
    assert opt.state_dict()["state"] == {}


def test_sgd_momentum_buffer_starts_as_the_grad(device):
    """torch creates the buffer from the first (decayed) grad; a param that joins later too."""
    opt, ref, params, ref_params = run_parity(
        fused_optim.SGD,
        torch.optim.SGD,
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.5, "weight_decay": 0.1},
        device=device,
        steps=1,
        grad_none=lambda step, i: i == 2,
    )
    assert "momentum_buffer" not in opt.state[params[2]]
    for step in range(1, 4):  # param 2 gets its first grad now
        set_grads(params, ref_params, step, 0)
        opt.step()
        ref.step()
        assert_same(opt, ref, params, ref_params, TOL, f"after step {step + 1}")


def test_nadam_mu_product_per_param(device):
    opt, _, params, _ = run_parity(
        fused_optim.NAdam, torch.optim.NAdam, {"lr": 0.01}, device=device, steps=8, grad_none=_skips
    )
    values = {float(opt.state[p]["mu_product"]) for p in params if opt.state[p]}
    assert len(values) > 1  # params at different steps carry different products, as in torch


def test_deepcopy_of_every_optimizer_continues_identically(device):
    for name in ALGORITHMS:
        params = leaves(random_tensors(SHAPES[:3], torch.float32, 4, device))
        opt = _classes(name)[0](params, **everything(name))
        for _ in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        clone = copy.deepcopy(opt)
        clone_params = [p for g in clone.param_groups for p in g["params"]]
        for p, c in zip(params, clone_params):
            p.grad = torch.randn_like(p)
            c.grad = p.grad.clone()
        opt.step()
        clone.step()
        assert_same(clone, opt, clone_params, params, {"rtol": 0, "atol": 0}, f"{name} after deepcopy")


def test_hyperparameters_as_cpu_tensors_match_torch(device):
    """NAdam with every float hyperparameter a 0-dim CPU tensor (momentum_decay included, which
    feeds the host's step scalars): each step matches torch's with the same tensors."""
    kwargs = {
        "lr": torch.tensor(0.01), "betas": (torch.tensor(0.8), torch.tensor(0.99)), "eps": torch.tensor(1e-6),
        "weight_decay": torch.tensor(0.1), "momentum_decay": torch.tensor(5e-3),
    }  # fmt: skip
    init = random_tensors(SHAPES, torch.float32, 0, device)
    params, ref_params = leaves(init), leaves(init)
    opt, ref = fused_optim.NAdam(params, **kwargs), torch.optim.NAdam(ref_params, foreach=False, **kwargs)
    for step in range(3):
        set_grads(params, ref_params, step, 0)
        opt.step()
        ref.step()
        assert_same(opt, ref, params, ref_params, TOL, f"after step {step + 1}")
