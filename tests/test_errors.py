"""Bad input: the same errors as torch.optim where torch rejects it, NotImplementedError naming
what fused_optim does not implement, and nothing modified when a step or a load is refused."""

import pytest
import torch

import fused_optim

BAD_ARGS = [
    {"lr": -1.0},
    {"lr": torch.tensor([0.1, 0.2])},
    {"lr": torch.tensor(0.1), "foreach": True},
    {"eps": -1e-8},
    {"betas": (1.0, 0.999)},
    {"betas": (-0.1, 0.999)},
    {"betas": (0.9, 1.0)},
    {"weight_decay": -0.1},
    {"betas": (0.9, torch.tensor(0.99))},
    {"betas": (torch.tensor(0.9), torch.tensor(0.99)), "foreach": True},
    {"betas": (torch.tensor([0.9]), torch.tensor([0.99, 0.9]))},
    {"fused": True, "foreach": True},
    {"fused": True, "differentiable": True},
]


@pytest.mark.parametrize("kwargs", BAD_ARGS, ids=repr)
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_bad_arguments_raise_like_torch(name, kwargs):
    with pytest.raises(Exception) as theirs:
        getattr(torch.optim, name)([torch.zeros(2, requires_grad=True)], **kwargs)
    with pytest.raises(Exception) as ours:
        getattr(fused_optim, name)([torch.zeros(2, requires_grad=True)], **kwargs)
    assert (type(ours.value), str(ours.value)) == (type(theirs.value), str(theirs.value))


def test_bad_params_raise_like_torch():
    for params in ([], [torch.zeros(2, requires_grad=True) * 2], torch.zeros(2)):
        with pytest.raises(Exception) as theirs:
            torch.optim.Adam(params)
        with pytest.raises(Exception) as ours:
            fused_optim.Adam(params)
        assert (type(ours.value), str(ours.value)) == (type(theirs.value), str(theirs.value))


def test_differentiable_raises(device):
    p = torch.randn(4, device=device, requires_grad=True)
    with pytest.raises(NotImplementedError, match="differentiable=True"):
        fused_optim.Adam([p], differentiable=True)
    opt = fused_optim.AdamW([p], lr=0.1)  # set on a group after construction: refused at step
    opt.param_groups[0]["differentiable"] = True
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    with pytest.raises(NotImplementedError, match="differentiable=True"):
        opt.step()
    assert torch.equal(p, before)


def test_loading_a_differentiable_torch_checkpoint_is_refused(device):
    p = torch.randn(4, device=device, requires_grad=True)
    state_dict = torch.optim.Adam([p.detach().clone().requires_grad_()]).state_dict()
    state_dict["param_groups"][0]["differentiable"] = True
    opt = fused_optim.Adam([p])
    with pytest.raises(NotImplementedError, match="differentiable=True"):
        opt.load_state_dict(state_dict)
    assert opt.param_groups[0]["differentiable"] is False


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_sparse_grad_raises_like_torch(name, device):
    def step(cls):
        p = torch.randn(5, 3, device=device, requires_grad=True)
        before = p.detach().clone()
        p.grad = torch.randn(5, 3, device=device).to_sparse()
        with pytest.raises(RuntimeError) as err:
            cls([p]).step()
        assert torch.equal(p, before)
        return str(err.value)

    assert step(getattr(fused_optim, name)) == step(getattr(torch.optim, name))


def test_unsupported_dtype_raises(device):
    p = torch.zeros(3, dtype=torch.float8_e4m3fn, device=device, requires_grad=True)
    p.grad = torch.zeros(3, dtype=torch.float8_e4m3fn, device=device)
    with pytest.raises(NotImplementedError, match="float8_e4m3fn"):
        fused_optim.Adam([p]).step()


def test_duplicate_params_raise(device):
    p = torch.randn(3, device=device, requires_grad=True)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = fused_optim.Adam([p, p])
    p.grad = torch.randn_like(p)
    with pytest.raises(NotImplementedError, match="same parameter twice"):
        opt.step()


@pytest.mark.parametrize("name", ["Adam", "StableAdamW"])
def test_a_tensor_hyperparameter_of_several_elements_in_a_later_group_changes_nothing(name, device):
    """torch refuses a tensor lr or beta of more than one element at construction; set on a group
    afterwards, step() raises torch's error for it before any group's params or counters move."""
    a, b = (torch.ones(4, device=device, requires_grad=True) for _ in range(2))
    opt = getattr(fused_optim, name)([{"params": [a]}, {"params": [b]}], lr=0.1)
    for p in (a, b):
        p.grad = torch.ones(4, device=device)
    opt.step()

    def first_group():
        return {k: v for k, v in opt.param_groups[0].items() if k != "params"}

    before = [a.detach().clone(), first_group()]
    for key, value, message in (
        ("lr", torch.tensor([0.1, 0.2]), "Tensor lr must be 1-element"),
        ("betas", (torch.tensor([0.9, 0.8]), 0.99), r"Tensor betas\[0\] must be 1-element")
        if name == "Adam"
        else ("beta1", torch.tensor([0.9, 0.8]), "Tensor beta1 must be 1-element"),
    ):
        kept, opt.param_groups[1][key] = opt.param_groups[1][key], value
        with pytest.raises(ValueError, match=message):
            opt.step()
        opt.param_groups[1][key] = kept
        assert (
            torch.equal(a, before[0]) and {k: v for k, v in opt.param_groups[0].items() if k != "params"} == before[1]
        )
    if name == "Adam":
        with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
            torch.optim.Adam([a], lr=torch.tensor([0.1, 0.2]))


def test_complex_params_with_bf16_states_are_refused(device):
    p = torch.randn(4, dtype=torch.complex64, device=device, requires_grad=True)
    opt = fused_optim.Adam([p], lr=0.1, state_dtype=torch.bfloat16)
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    with pytest.raises(NotImplementedError, match=r"state_dtype=torch\.bfloat16 for complex params"):
        opt.step()
    assert torch.equal(p, before) and not opt.state
