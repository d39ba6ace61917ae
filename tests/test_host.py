"""What keeps ``step()`` cheap on the host (``benchmarks/host.py`` times it): a step whose grads
moved keeps its plan and checks the grads in one C++ call; an FSDP2 step reads the grads' local
shards in bulk and checks nothing else again. Behaviour, not timings."""

from __future__ import annotations

import copy

import pytest
import torch

import fused_optim
from fused_optim import _plans
from parity import TOL, close, leaves, one_rank_mesh, random_tensors

SHAPES = [(7, 13), (300,), (3, 4, 5), (1,)]


def _refuse(name):
    def refused(*args, **kwargs):
        raise AssertionError(f"{name} ran on a step whose grads only moved")

    return refused


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def test_torch_has_the_one_call_grad_check():
    """The installed torch offers the C++ check (``_plans._tensor_guards`` probed its answers):
    the fast path below is the one CI exercises, not the one-grad-at-a-time fallback."""
    assert _plans._TensorGuards is not None


@pytest.mark.parametrize("one_call", [True, False], ids=["one C++ call", "one grad at a time"])
def test_moved_grads_rebuild_nothing_and_are_checked(monkeypatch, device, one_call):
    """New grad tensors at every step: no validation, no layout, no new tables; each step matches
    torch. The C++ check passes them (the per-grad check is never reached), or, without it, the
    per-grad check does. A grad of another shape, dtype or layout is caught by either."""
    if not one_call:
        monkeypatch.setattr(_plans, "_TensorGuards", None)
    init = random_tensors(SHAPES, torch.float32, 0, device)
    params, ref_params = leaves(init), leaves(init)
    opt = fused_optim.AdamW(params, lr=0.05, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_params, lr=0.05, weight_decay=0.1, foreach=False)
    graveyard = []  # old grads stay alive, so new ones land at new addresses
    for step in range(5):
        grads = random_tensors(SHAPES, torch.float32, 10 + step, device)
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        graveyard.append([p.grad for p in params])
        if step == 2:  # the first step's plan (fresh state) held for that step only
            plan = opt._caches[0].plan
            assert (plan.guards is not None) == one_call
            for name in ("_validate", "_layout", "_plan"):
                monkeypatch.setattr(opt, name, _refuse(name))
            if one_call:
                monkeypatch.setattr(_plans, "_same_grads", _refuse("the per-grad check"))
        opt.step()
        ref.step()
        if step >= 2:
            assert opt._caches[0].plan is plan
        for i, (p, q) in enumerate(zip(params, ref_params)):
            close(p.detach(), q.detach(), TOL[torch.float32][1], f"param {i} step {step}")
            for key, value in ref.state[q].items():
                close(opt.state[p][key], value, TOL[torch.float32][1], f"{key} of param {i} step {step}")
    plan = opt._caches[0].plan
    monkeypatch.undo()
    if not one_call:
        monkeypatch.setattr(_plans, "_TensorGuards", None)
    same = [p.grad.clone() for p in params]
    assert _plans._grad_moves(plan, same, tuple(g.data_ptr() for g in same)) is not None
    changes = {
        "shape": lambda g: g.reshape(-1),
        "strides": lambda g: torch.zeros(*g.shape[:-1], g.shape[-1] + 1, device=device)[..., :-1],
        "layout": lambda g: g.t().contiguous().t(),
        "dtype": lambda g: g.double(),  # (torch's grad setter refuses it; a DTensor's local grad could not)
    }
    for what, change in changes.items():
        moved = [p.grad.clone() for p in params]
        moved[0] = change(moved[0])
        assert _plans._grad_moves(plan, moved, tuple(g.data_ptr() for g in moved)) is None, what


def test_fsdp2_steps_read_local_grads_in_bulk_and_check_nothing_again(monkeypatch, device):
    """An FSDP2 model (one rank), real backward: every step's grads are FSDP2's new reduce-scatter
    outputs. After the first steps no step validates, lays out or plans again, the grads pass the
    C++ check, and params and state match torch.optim on an identical FSDP2 model."""
    from torch.distributed.fsdp import fully_shard

    with one_rank_mesh(device) as mesh:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)]).to(device)
        ref_model = copy.deepcopy(model)
        for m in (model, ref_model):
            for layer in m:
                fully_shard(layer, mesh=mesh)
            fully_shard(m, mesh=mesh)
        opt = fused_optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
        ref = torch.optim.AdamW(ref_model.parameters(), lr=0.05, weight_decay=0.1, foreach=False)
        x = torch.randn(5, 8, device=device)
        graveyard = []
        for step in range(5):
            for m, o in ((model, opt), (ref_model, ref)):
                o.zero_grad()
                torch.tanh(m(x)).square().mean().backward()
            graveyard.append([p.grad for p in model.parameters()])
            if step == 2:
                plan = opt._caches[0].plan
                assert plan.guards is not None
                for name in ("_validate", "_layout", "_plan"):
                    monkeypatch.setattr(opt, name, _refuse(name))
                monkeypatch.setattr(_plans, "_same_grads", _refuse("the per-grad check"))
                monkeypatch.setattr(_plans._dtensor, "local", _refuse("reading DTensors one by one"))
                addresses = plan.gkey
            opt.step()
            ref.step()
            if step >= 2:
                assert opt._caches[0].plan is plan
            for name, (p, q) in enumerate(zip(model.parameters(), ref_model.parameters())):
                close(p.full_tensor(), q.full_tensor(), TOL[torch.float32][1], f"param {name} step {step}")
                for key, value in ref.state[q].items():
                    close(_full(opt.state[p][key]), _full(value), TOL[torch.float32][1], f"{key} of {name} step {step}")
        assert opt._caches[0].plan.gkey != addresses  # the grads did move: the plan followed them


def test_moved_grads_of_two_launches_and_a_staged_grad(monkeypatch, device):
    """A group of fp32 and fp64 params (two launches) with a transposed param whose grads come
    contiguous (staged: copied into the param's layout before the launch): grads that move are
    repointed launch by launch, the staged one is read where it now is, and nothing is rebuilt."""
    shapes = [(7, 13), (300,), (9, 6)]
    init = [*random_tensors(shapes, torch.float32, 0, device), *random_tensors(shapes[:2], torch.float64, 1, device)]
    init[2] = init[2].t()  # column-major, dense: its contiguous grads do not walk its memory order
    params, ref_params = leaves(init), leaves(init)
    assert not params[2].is_contiguous()
    opt = fused_optim.AdamW(params, lr=0.05, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_params, lr=0.05, weight_decay=0.1, foreach=False)
    graveyard = []
    for step in range(5):
        grads = [torch.randn(p.shape, dtype=p.dtype, device=device) for p in params]  # contiguous
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        graveyard.append([p.grad for p in params])
        if step == 2:
            plan = opt._caches[0].plan
            assert len(plan.launches) == 2 and not plan.direct and (plan.row_of == -1).sum() == 1
            for name in ("_validate", "_layout", "_plan"):
                monkeypatch.setattr(opt, name, _refuse(name))
        opt.step()
        ref.step()
        if step >= 2:
            assert opt._caches[0].plan is plan
        for i, (p, q) in enumerate(zip(params, ref_params)):
            tol = TOL[p.dtype][1]
            close(p.detach(), q.detach(), tol, f"param {i} step {step}")
            for key, value in ref.state[q].items():
                close(opt.state[p][key], value, tol, f"{key} of param {i} step {step}")
