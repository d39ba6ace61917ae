"""What keeps ``step()`` cheap on the host (``benchmarks/host.py`` times it): grads and addresses
read in one native call (``fused_optim/_native.cpp``) that agrees with the Python reads; every
step checks the params' and grads' metadata against the plan's in one C++ call (a param reshaped
or a grad restrided at the same address is caught); a step whose grads moved keeps its plan; an
FSDP2 step reads the grads' local shards in bulk and checks nothing else again. Behaviour, not
timings."""

from __future__ import annotations

import copy
import sys
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch

import fused_optim
from fused_optim import _native, _plans
from parity import TOL, close, leaves, one_rank_mesh, random_tensors

SHAPES = [(7, 13), (300,), (3, 4, 5), (1,)]


def _refuse(name):
    def refused(*args, **kwargs):
        raise AssertionError(f"{name} ran on a step whose grads only moved")

    return refused


def _counted(check, seen: list):
    def counted(*grads):
        seen.append(len(grads))
        return check(*grads)

    return counted


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _key(grads):
    return np.array([g.data_ptr() for g in grads], np.int64)


def _built():
    native = _native.module()
    assert native is not None, _native.reason
    return native


@pytest.fixture(params=["native", "python"], ids=["native reads", "python reads"])
def reads(request, monkeypatch):
    """Each test below runs with the native reads, which must answer every step themselves (built
    here: CI has a C++ compiler), and with the Python reads alone."""
    if request.param == "python":
        monkeypatch.setattr(_native, "module", lambda: None)
        return request.param
    built = _built()

    def must_answer(*args):
        out = built.scan(*args)
        assert out is not None, "the native reads handed a plain or FSDP2 group to the Python path"
        return out

    answering = SimpleNamespace(scan=must_answer, describe=built.describe)
    monkeypatch.setattr(_native, "module", lambda: answering)
    return request.param


def test_torch_has_the_one_call_grad_check():
    """The installed torch offers the C++ check (``_plans._tensor_guards`` probed its answers):
    the fast path of the Python reads is the one CI exercises, not the one-grad-at-a-time one."""
    assert _plans._TensorGuards is not None


def _groups(device, mesh):
    """Param lists the reads must agree on: (name, params, whether the native reads answer)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    flat = torch.randn(480, device=device)
    views = [torch.nn.Parameter(flat[i * 40 : i * 40 + 30]) for i in range(12)]  # storage offsets
    plain = leaves(random_tensors(SHAPES, torch.float32, 0, device)) + views
    plain.append(torch.nn.Parameter(torch.randn(6, 4, device=device).t()))  # not contiguous
    for p in plain:
        p.grad = torch.randn(p.shape, device=device)
    gaps = leaves(random_tensors(SHAPES, torch.float32, 1, device))
    gaps[0].grad = torch.randn(SHAPES[0], device=device)
    gaps[2].grad = torch.randn(SHAPES[2], device=device).to_sparse()

    # more than one batch of the native reads' lanes (16), the last one partial
    def shard(shape):
        return distribute_tensor(torch.randn(shape, device=device), mesh, [Shard(0)])

    sharded = [torch.nn.Parameter(shard(s)) for s in [*SHAPES * 5, (0, 3)]]  # an empty local shard too
    for p in sharded[1::3]:
        p.grad = shard(p.shape)
    empty = torch.nn.Parameter(torch.zeros(0, device=device))
    return [
        ("plain, views at offsets, not contiguous (two lane batches)", plain, True),
        ("missing and sparse grads", gaps, True),
        ("DTensor params, some without a grad", sharded, True),
        ("no params", [], True),
        ("DTensor and plain params (in the second lane batch)", [*sharded, *plain], False),
        ("an empty param (in the second lane batch)", [*plain, empty], False),
    ]


def test_native_and_python_reads_agree(monkeypatch, device):
    """``_shards`` returns the same keys and the very same grad objects with the native reads as
    with the Python reads; the native reads answer plain and FSDP2 groups themselves and hand the
    rest (a DTensor among plain params, a param without storage to address) to the Python path."""
    scan = _built().scan
    with one_rank_mesh(device) as mesh:
        for name, params, answers in _groups(device, mesh):
            local = bool(params) and _plans._dtensor.is_dtensor(params[0])
            pkey, gkey = np.zeros(len(params), np.int64), np.zeros(len(params), np.int64)
            grads = [p.grad for p in params if p.grad is not None]
            objects = [*params, *grads, *map(_plans._dtensor.local, grads)]
            counts = [sys.getrefcount(o) for o in objects]
            for _ in range(3):  # whatever it answers, it leaves no reference behind
                assert (scan(params, local, pkey, gkey) is not None) == answers, name
            assert [sys.getrefcount(o) for o in objects] == counts, name
            native = _plans._shards(params)
            with monkeypatch.context() as m:
                m.setattr(_native, "module", lambda: None)
                python = _plans._shards(params)
            assert python[0] is not None and np.array_equal(native[0], python[0]), name
            assert np.array_equal(native[1], python[1]), name
            assert len(native[2]) == len(python[2]) and all(a is b for a, b in zip(native[2], python[2])), name
            if answers:
                assert np.array_equal(native[0], pkey) and np.array_equal(native[1], gkey), name
    # an object that claims to be a tensor (isinstance says yes) is left to the Python path
    assert scan([mock.Mock(spec=torch.Tensor)], False, np.zeros(1, np.int64), np.zeros(1, np.int64)) is None
    with pytest.raises(ValueError, match="int64 arrays of the wrong size"):
        scan([torch.nn.Parameter(torch.ones(2))], False, np.zeros(1, np.int32), np.zeros(1, np.int64))


def test_native_reads_check_params_and_grads_against_the_plans(device):
    """Given the plan's grad addresses and metadata rows (params, then grads), the native reads say
    whether every param and grad still has the dtype, device, shape and strides of the plan's,
    moved or not: not for a grad that vanished or turned sparse, nor for a param or grad reshaped
    or restrided at the same address."""
    native = _built()
    params = leaves(random_tensors(SHAPES, torch.float32, 0, device))
    for p in params:
        p.grad = torch.randn(p.shape, device=device)
    n = len(params)
    keys = np.zeros(n, np.int64), np.zeros(n, np.int64)
    grads, same = native.scan(params, False, *keys)
    assert not same and all(g is p.grad for g, p in zip(grads, params))  # nothing to check against
    old = keys[1].copy()

    def plan_meta(plan_params, plan_grads):
        codes = np.zeros(2 * n, np.int64)
        return codes, np.frombuffer(native.describe([*plan_params, *plan_grads], codes), np.int64)

    meta = plan_meta(params, grads)
    assert len(meta[1]) == 4 * (1 + 2 * 6)  # one table row per distinct shape: params and grads share them
    assert len(plan_meta([grads[0]] * n, [grads[0]] * n)[1]) == 1 + 2 * 6
    lazy = torch.randn(3, dtype=torch.complex64, device=device)
    codes = np.zeros(4, np.int64)  # neither a lazy conjugate or negative view nor a mock is described
    native.describe([lazy.conj(), torch._neg_view(lazy), mock.Mock(spec=torch.Tensor), lazy], codes)
    assert list(codes[:3]) == [-1, -1, -1] and codes[3] >= 0
    with pytest.raises(ValueError, match="int64 arrays of the wrong size"):  # codes for the grads only
        native.scan(params, False, *keys, old, meta[0][:n], meta[1])

    def same_as_plan(grad, meta=meta):
        kept, params[0].grad = params[0].grad, grad
        try:
            return native.scan(params, False, *keys, old, *meta)[1]
        finally:
            params[0].grad = kept

    assert same_as_plan(params[0].grad)  # nothing moved
    assert same_as_plan(torch.randn(SHAPES[0], device=device))
    assert not same_as_plan(torch.randn(SHAPES[0][::-1], device=device).t())  # strides
    assert not same_as_plan(params[0].grad.view(SHAPES[0][::-1]).t())  # strides, at the same address
    # the plan's grad of param 0 was float64 (a DTensor's local grad can be)
    assert not same_as_plan(torch.randn(SHAPES[0], device=device), plan_meta(params, [grads[0].double(), *grads[1:]]))
    assert not same_as_plan(torch.randn(SHAPES[0], device=device).to_sparse())
    assert not same_as_plan(None)
    assert not same_as_plan(torch.randn(SHAPES[0], device=device), plan_meta(params, [None, *grads[1:]]))  # none
    assert not same_as_plan(params[0].grad, plan_meta([None, *params[1:]], grads))  # a param not described
    params[0].grad = None
    params[0].data = params[0].data.view(SHAPES[0][::-1])  # the param reshaped, at the same address
    assert not native.scan(params, False, *keys, old, *meta)[1]
    params[0].grad = grads[0].view(SHAPES[0][::-1])  # and its grad with it, also at the same address
    assert not native.scan(params, False, *keys, old, *meta)[1]
    assert np.array_equal(keys[1], old)


def test_a_grad_that_vanishes_while_others_move_rebuilds_the_plan(device, reads):
    """One param loses its grad at the step where every other grad moved: the plan is rebuilt and
    the step matches torch, which skips that param."""
    init = random_tensors(SHAPES, torch.float32, 0, device)
    params, ref_params = leaves(init), leaves(init)
    opt = fused_optim.AdamW(params, lr=0.05, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_params, lr=0.05, weight_decay=0.1, foreach=False)
    graveyard = []
    for step in range(4):
        grads = random_tensors(SHAPES, torch.float32, 10 + step, device)
        for i, (p, q, g) in enumerate(zip(params, ref_params, grads)):
            gone = step == 3 and i == 1
            p.grad, q.grad = (None, None) if gone else (g.clone(), g.clone())
        graveyard.append([p.grad for p in params])
        plan = opt._caches[0].plan if opt._caches else None
        opt.step()
        ref.step()
        if step == 3:
            assert opt._caches[0].plan is not plan
        for i, (p, q) in enumerate(zip(params, ref_params)):
            close(p.detach(), q.detach(), TOL[torch.float32][1], f"param {i} step {step}")
            for key, value in ref.state[q].items():
                close(opt.state[p][key], value, TOL[torch.float32][1], f"{key} of param {i} step {step}")


@pytest.mark.parametrize("name", ["AdamW", "Adafactor", "Muon"])
def test_a_param_reshaped_at_the_same_address_is_caught(device, reads, name):
    """A param reshaped in place (``p.data = p.data.view(...)``) with its grad, both at the same
    addresses: the cached plan is not used (its state, and Adafactor's factors and Muon's matrix,
    have the old shape); the step raises like torch's, and changes nothing."""
    params = leaves(random_tensors([(4, 6), (3, 5)], torch.float32, 0, device))
    opt = getattr(fused_optim, name)(params, lr=0.01)
    grads = random_tensors([(4, 6), (3, 5)], torch.float32, 1, device)
    for p, g in zip(params, grads):
        p.grad = g
    for _ in range(2):
        opt.step()
    params[0].data = params[0].data.view(6, 4)
    params[0].grad = grads[0].view(6, 4)
    before = copy.deepcopy([params, opt.state_dict()])
    ref = getattr(torch.optim, name)(copy.deepcopy(params), lr=0.01)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    with pytest.raises(RuntimeError, match="must match the size"):
        ref.step()
    with pytest.raises(ValueError, match=r"of parameter 0 .* but the parameter has shape \(6, 4\)"):
        opt.step()
    for a, b in zip(params, before[0]):
        assert torch.equal(a, b)
    for key, value in before[1]["state"][0].items():
        assert torch.equal(opt.state_dict()["state"][0][key], value), key


def test_a_grad_restrided_at_the_same_address_matches_torch(device, reads):
    """A square param's grad replaced by its transpose, a view at the same address: the plan made
    for the old strides is not used, and the step matches torch. A param of more than six dims
    (which the native reads do not describe; the Python check passes it) keeps its plan."""
    shapes = [(5, 5), (7,), (2, 1, 2, 1, 2, 1, 3)]
    init = random_tensors(shapes, torch.float32, 0, device)
    params, ref_params = leaves(init), leaves(init)
    opt = fused_optim.AdamW(params, lr=0.05, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_params, lr=0.05, weight_decay=0.1, foreach=False)
    held = random_tensors(shapes, torch.float32, 1, device)  # each step's grads, written in place
    for p, q, g in zip(params, ref_params, held):
        p.grad, q.grad = g, g.clone()
    plans = []
    for step in range(4):
        for g, value in zip(held, random_tensors(shapes, torch.float32, 10 + step, device)):
            g.copy_(value)
        if step == 3:
            params[0].grad = held[0].t()
            assert params[0].grad.data_ptr() == held[0].data_ptr()
        for p, q in zip(params, ref_params):
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        plans.append(opt._caches[0].plan)
        for i, (p, q) in enumerate(zip(params, ref_params)):
            close(p.detach(), q.detach(), TOL[torch.float32][1], f"param {i} step {step}")
            for key, value in ref.state[q].items():
                close(opt.state[p][key], value, TOL[torch.float32][1], f"{key} of param {i} step {step}")
    assert plans[2] is plans[1] and plans[3] is not plans[2]


@pytest.mark.parametrize("one_call", [True, False], ids=["one C++ call", "one grad at a time"])
def test_moved_grads_rebuild_nothing_and_are_checked(monkeypatch, device, one_call, reads):
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
                monkeypatch.setattr(_plans, "_meta", _refuse("the per-tensor check"))
            if reads == "native":  # the native reads checked every moved grad against the plan's
                assert plan.native_meta is not None
                monkeypatch.setattr(plan, "guards", _refuse("the one-call check"))
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
    assert _plans._same_meta(plan, params, params, same, _key(same))
    changes = {
        "shape": lambda g: g.reshape(-1),
        "strides": lambda g: torch.zeros(*g.shape[:-1], g.shape[-1] + 1, device=device)[..., :-1],
        "layout": lambda g: g.t().contiguous().t(),
        "dtype": lambda g: g.double(),  # (torch's grad setter refuses it; a DTensor's local grad could not)
    }
    for what, change in changes.items():
        moved = [p.grad.clone() for p in params]
        moved[0] = change(moved[0])
        assert not _plans._same_meta(plan, params, params, moved, _key(moved)), what
    # a param reshaped, and its grad with it, both at the same address
    reshaped = [params[0].detach().view(SHAPES[0][::-1]), *params[1:]]
    grads = [p.grad for p in params]
    assert not _plans._same_meta(plan, params, reshaped, grads, _key(grads))
    grads[0] = grads[0].view(SHAPES[0][::-1])
    assert not _plans._same_meta(plan, params, reshaped, grads, _key(grads))


def test_fsdp2_steps_read_local_grads_in_bulk_and_check_nothing_again(monkeypatch, device, reads):
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
                assert plan.guards is not None and (plan.native_meta is not None) == (reads == "native")
                for name in ("_validate", "_layout", "_plan"):
                    monkeypatch.setattr(opt, name, _refuse(name))
                monkeypatch.setattr(_plans, "_meta", _refuse("the per-tensor check"))
                if reads == "native":
                    monkeypatch.setattr(plan, "guards", _refuse("the one-call check"))
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
        assert not np.array_equal(opt._caches[0].plan.gkey, addresses)  # the grads moved: the plan followed


def test_moved_grads_of_two_launches_and_a_staged_grad(monkeypatch, device, reads):
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
    graveyard, seen = [], []  # seen: how many grads each one-call check was handed
    for step in range(5):
        grads = [torch.randn(p.shape, dtype=p.dtype, device=device) for p in params]  # contiguous
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        graveyard.append([p.grad for p in params])
        if step == 2:
            plan = opt._caches[0].plan
            assert len(plan.launches) == 2 and not plan.direct and (plan.row_of == -1).sum() == 1
            # the native reads check every param and grad themselves, the staged one too; without
            # them the one-call check sees every param and grad
            monkeypatch.setattr(plan, "guards", _counted(plan.guards, seen))
            for name in ("_validate", "_layout", "_plan"):
                monkeypatch.setattr(opt, name, _refuse(name))
        opt.step()
        ref.step()
        if step >= 2:
            assert opt._caches[0].plan is plan and seen == ([] if reads == "native" else [10] * (step - 1))
        for i, (p, q) in enumerate(zip(params, ref_params)):
            tol = TOL[p.dtype][1]
            close(p.detach(), q.detach(), tol, f"param {i} step {step}")
            for key, value in ref.state[q].items():
                close(opt.state[p][key], value, tol, f"{key} of param {i} step {step}")
