"""The segment engine: launches per segment, table caching, specialization, state views."""

import copy
import pickle
from collections import defaultdict

import numpy as np
import pytest
import torch

import fused_optim
from fused_optim.kernels import INTERPRETED
from fused_optim.kernels._tables import build_tables, jit_cache_size, record_launches
from parity import SHAPES, assert_same, leaves, random_tensors, set_grads

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _pair(device, shapes=SHAPES, cls="Adam", seed=0, **kwargs):
    init = random_tensors(shapes, torch.float32, seed, device)
    params, ref_params = leaves(init), leaves(init)
    return (
        getattr(fused_optim, cls)(params, **kwargs),
        getattr(torch.optim, cls)(ref_params, foreach=False, **kwargs),
        params,
        ref_params,
    )


def test_kernels_run_not_the_fallback(device):
    opt, _, params, _ = _pair(device)
    for p in params:
        p.grad = torch.randn_like(p)
    with record_launches() as log:
        opt.step()
    assert [name for name, _ in log] == ["_update_kernel[adam_math]"]
    assert INTERPRETED == (device.type == "cpu")


def test_one_launch_per_segment(device):
    """One launch per (device, dtype) segment per step, whatever the number of tensors."""
    dtypes = [torch.float32, torch.bfloat16, torch.float64]
    params = [torch.randn(3 + i, device=device, dtype=dtypes[i % 3], requires_grad=True) for i in range(300)]
    opt = fused_optim.AdamW(params)
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        with record_launches() as log:
            opt.step()
        assert len(log) == 3, f"step {step}: {len(log)} launches"


def test_lr_every_step_compiles_nothing_new(device):
    """A scheduler changing lr (and OneCycleLR cycling beta1) every step never changes the
    specialization key; on CUDA the jit cache does not grow either."""
    from fused_optim.kernels._update import _update_kernel

    opt, _, params, _ = _pair(device, weight_decay=0.1, decoupled_weight_decay=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=30)
    keys = set()
    cache_sizes = []
    for _ in range(12):
        for p in params:
            p.grad = torch.randn_like(p)
        with record_launches() as log:
            opt.step()
        sched.step()
        keys.update(key for _, key in log)
        if not INTERPRETED:
            cache_sizes.append(jit_cache_size(_update_kernel))
    assert len({g["lr"] for g in opt.param_groups}) == 1 and opt.param_groups[0]["lr"] != 0.1
    assert len(keys) == 1, keys
    assert len(set(cache_sizes[1:])) <= 1, cache_sizes
    # lr = 0 makes float bits that fit in int32: still the same key.
    opt.param_groups[0]["lr"] = 0.0
    with record_launches() as log:
        opt.step()
    assert {key for _, key in log} == keys


def test_tables_are_cached_until_a_storage_changes(device):
    opt, ref, params, ref_params = _pair(device, lr=0.05)
    set_grads(params, ref_params, 0, 0)
    opt.step()
    ref.step()
    plan = opt._caches[0].plan
    assert plan is not None
    for _ in range(1, 4):  # grads rewritten in place: same storages, same plan
        for p, q in zip(params, ref_params):
            g = torch.randn_like(p)
            p.grad.copy_(g)
            q.grad.copy_(g)
        opt.step()
        ref.step()
        assert opt._caches[0].plan is plan
    with torch.no_grad():  # a param's storage replaced: the plan is rebuilt, results still match
        params[1].data = params[1].data.clone()
    opt.step()
    ref.step()
    assert opt._caches[0].plan is not plan
    assert_same(opt, ref, params, ref_params, TOL, "after a storage change")


def test_moved_grads_keep_the_plan_and_are_read_where_they_now_are(device):
    """New grad tensors every step (``zero_grad(set_to_none=True)`` then backward) keep the cached
    plan: only the grad addresses in the tensor table change, and the vector path follows the new
    grad's alignment. The old grads stay alive and are overwritten, so a table still pointing at
    them would give wrong params. A grad of another layout rebuilds the plan."""
    from fused_optim.kernels._tables import COL_GRAD, COL_VEC_END

    opt, ref, params, ref_params = _pair(device, lr=0.05, weight_decay=0.1)
    for step in range(2):  # the first step's plan (fresh state) holds for that step only
        set_grads(params, ref_params, step, 0)
        opt.step()
        ref.step()
    plan = opt._caches[0].plan
    tables = plan.launches[0].tables
    graveyard = []
    for step in range(2, 6):
        set_grads(params, ref_params, step, 0)
        if step % 2:  # every grad 4 bytes past a 16-byte boundary: no 128-bit path for any tensor
            for p in params:
                buf = torch.empty(p.numel() + 1, device=device)
                buf[1:].copy_(p.grad.reshape(-1))
                p.grad = buf[1:].view(p.shape)
        old = [p.grad.clone() for p in params]
        graveyard.append(old)
        opt.step()
        ref.step()
        for g in old:
            g.fill_(1e6)
        assert opt._caches[0].plan is plan and plan.launches[0].tables is tables, f"step {step}: plan rebuilt"
        rows = tables.rows
        assert sorted(rows[:, COL_GRAD].tolist()) == sorted(p.grad.data_ptr() for p in params)
        vec = rows[:, COL_VEC_END]
        assert (vec == 0).all() if step % 2 else (vec > 0).any()
        assert_same(opt, ref, params, ref_params, TOL, f"after moved grads at step {step}")
    set_grads(params, ref_params, 6, 0)
    two_d = [p for p in params if p.dim() == 2 and p.shape[0] > 1]
    for p in two_d:  # same values, column-major: the grad no longer walks the param's memory order
        p.grad = p.grad.t().contiguous().t()
    opt.step()
    ref.step()
    assert opt._caches[0].plan is not plan
    assert_same(opt, ref, params, ref_params, TOL, "after a grad changed layout")


def test_empty_grad_and_no_grad_are_told_apart(device):
    """An empty grad's address is 0: a step where an empty param loses its grad must not reuse
    the plan that stepped it (torch leaves its step count alone)."""
    opt, ref, params, ref_params = _pair(device, shapes=[(0,), (5,)], lr=0.05)
    for step in range(4):
        set_grads(params, ref_params, step, 0, grad_none=lambda s, i: s == 3 and i == 0)
        opt.step()
        ref.step()
        assert_same(opt, ref, params, ref_params, TOL, f"step {step}")
    assert float(opt.state[params[0]]["step"]) == 3.0


def test_tables_use_int64_offsets():
    """Offsets past 2**31 elements survive the tables (no allocation needed to check)."""
    big = 2**31 + 5000
    numels = np.array([big, 3], dtype=np.int64)
    tables = build_tables(
        np.array([1 << 40, 2 << 40]),
        np.array([3 << 40, 4 << 40]),
        np.array([0, big + 11]),
        numels,
        np.zeros(2, dtype=np.int64),
        np.array([5, 9]),
        1024,
        torch.device("cpu"),
    )
    rows, blocks = tables.tensor_table.numpy(), tables.block_table.numpy()
    assert rows.dtype == np.int64 and blocks.dtype == np.int64
    assert rows[1, 2] == big + 11 and rows[0, 3] == big and rows[0, 4] == big // 1024 * 1024
    assert rows[0, 6] == 5 and rows[1, 6] == 9  # member index in the segment
    last_of_first = blocks[-(2)]
    assert (
        last_of_first >> 32 == 0
        and (last_of_first & 0xFFFFFFFF) * 1024 < big <= ((last_of_first & 0xFFFFFFFF) + 1) * 1024
    )
    assert blocks[-1] >> 32 == 1 and tables.n_blocks == -(-big // 1024) + 1


def test_state_is_views_into_flat_buffers(device):
    opt, _, params, _ = _pair(device, amsgrad=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    seg = next(iter(opt._caches[0].segments.values()))
    for p in params:
        state = opt.state[p]
        assert state["step"].untyped_storage().data_ptr() == seg.scalars["step"].untyped_storage().data_ptr()
        assert state["step"].device.type == "cpu" and state["step"].dim() == 0
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert state[key].untyped_storage().data_ptr() == seg.flat[key].untyped_storage().data_ptr()
            assert state[key].shape == p.shape and state[key].dtype == p.dtype


def test_replaced_state_entries_are_used(device):
    """Writing a new tensor into opt.state (as some libraries do) takes effect, as in torch."""
    opt, ref, params, ref_params = _pair(device, lr=0.05)
    for step in range(5):
        set_grads(params, ref_params, step, 0)
        if step == 2:
            for o, ps in ((opt, params), (ref, ref_params)):
                o.state[ps[0]]["exp_avg"] = torch.full_like(ps[0], 0.5)
                o.state[ps[6]]["step"] = torch.tensor(10.0)
                del o.state[ps[2]]  # fresh state on the next step
        if step == 3:
            for o, ps in ((opt, params), (ref, ref_params)):
                o.state[ps[1]]["exp_avg_sq"].mul_(2.0)  # in place on the view
        opt.step()
        ref.step()
        assert_same(opt, ref, params, ref_params, TOL, f"after step {step + 1}")
    for o in (opt, ref):  # the whole container replaced: fresh state everywhere
        o.state = defaultdict(dict)
    set_grads(params, ref_params, 9, 0)
    opt.step()
    ref.step()
    assert_same(opt, ref, params, ref_params, TOL, "after resetting the state")


def test_state_writes_leave_untouched_segments_live(device):
    """A write into the state that replaces none of a segment's entries (a key of the user's own;
    another group's entry replaced) keeps that segment's buffers: tensors fetched before stay the
    live ones, and after ``share_memory()`` stay shared. A replaced entry's segment is rebuilt."""
    groups = [{"params": leaves(random_tensors(SHAPES[:2], torch.float32, g, device))} for g in range(2)]
    ref_groups = [{"params": leaves([p.detach() for p in g["params"]])} for g in groups]
    opt = fused_optim.Adagrad(groups, lr=0.1)
    ref = torch.optim.Adagrad(ref_groups, lr=0.1, foreach=False)
    opt.share_memory()
    params = [p for g in groups for p in g["params"]]
    ref_params = [p for g in ref_groups for p in g["params"]]
    held = [opt.state[p]["sum"] for p in params]
    for step in range(4):
        set_grads(params, ref_params, step, 0)
        if step == 1:
            opt.state[params[0]]["mine"] = torch.tensor(7.0)
            ref.state[ref_params[0]]["mine"] = torch.tensor(7.0)
        if step == 2:  # the second group's segment is rebuilt around the new tensor
            for o, ps in ((opt, params), (ref, ref_params)):
                o.state[ps[3]]["sum"] = torch.full_like(ps[3], 0.5)
        opt.step()
        ref.step()
        assert_same(opt, ref, params, ref_params, TOL, f"after step {step + 1}")
    for i, p in enumerate(params[:2]):  # the first group's segment was never rebuilt
        assert opt.state[p]["sum"] is held[i] and held[i].is_shared(), i
    assert opt.state[params[0]]["mine"].item() == 7.0
    assert opt.state[params[2]]["sum"] is not held[2]


def test_bad_grad_in_a_later_group_changes_nothing(device):
    a = torch.randn(10, device=device, requires_grad=True)
    b = torch.randn(10, device=device, requires_grad=True)
    opt = fused_optim.Adam([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad = torch.randn(10, device=device)
    b.grad = torch.randn(10, device=device).to_sparse()
    before = a.detach().clone()
    with pytest.raises(RuntimeError, match="Adam does not support sparse gradients"):
        opt.step()
    assert torch.equal(a, before) and len(opt.state[a]) == 0


def test_deepcopy_and_pickle_continue_identically(device):
    opt, _, params, _ = _pair(device, lr=0.05, amsgrad=True)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    clone = copy.deepcopy(opt)
    clone_params = [p for g in clone.param_groups for p in g["params"]]
    reloaded = pickle.loads(pickle.dumps(opt))
    other_params = [p for g in reloaded.param_groups for p in g["params"]]
    for p, c, r in zip(params, clone_params, other_params):
        p.grad = torch.randn_like(p)
        c.grad = p.grad.clone()
        r.grad = p.grad.clone()
    for o in (opt, clone, reloaded):
        o.step()
    for ps, o in ((clone_params, clone), (other_params, reloaded)):
        assert_same(o, opt, ps, params, {"rtol": 0, "atol": 0}, "after copying")


def test_default_dtype_float64_keeps_steps_in_float64(device):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        opt, ref, params, ref_params = _pair(device, lr=0.05)
        for step in range(3):
            set_grads(params, ref_params, step, 0)
            opt.step()
            ref.step()
        assert opt.state[params[0]]["step"].dtype == ref.state[ref_params[0]]["step"].dtype == torch.float64
        assert_same(opt, ref, params, ref_params, TOL, "with float64 as the default dtype")
    finally:
        torch.set_default_dtype(previous)


def test_empty_param_group_and_no_grads(device):
    opt, ref, params, ref_params = _pair(device, lr=0.05)
    for o in (opt, ref):
        o.add_param_group({"params": []})
    opt.step()  # no grads at all: nothing happens
    ref.step()
    assert len(opt.state) == 0
    set_grads(params, ref_params, 0, 0)
    opt.step()
    ref.step()
    assert_same(opt, ref, params, ref_params, TOL, "with an empty group")


@pytest.mark.parametrize(
    ("cls", "kwargs", "per_param"),
    [
        ("SGD", {}, 12),
        ("SGD", {"momentum": 0.9}, 20),
        ("Adagrad", {}, 20),
        ("Adadelta", {}, 28),
        ("RMSprop", {"momentum": 0.9, "centered": True}, 36),
        ("Adam", {}, 28),
        ("AdamW", {"amsgrad": True}, 36),
        ("NAdam", {}, 28),
        ("RAdam", {}, 28),
        ("Adamax", {}, 28),
    ],
)
def test_bytes_per_step_counts_every_array(cls, kwargs, per_param, device):
    """fp32: 4 bytes per element of each array read (param, grad, states) and written (param, states)."""
    params = [torch.randn(n, device=device, requires_grad=True) for n in (17, 1000, 3)]
    params.append(torch.randn(5, device=device, dtype=torch.bfloat16, requires_grad=True))
    opt = getattr(fused_optim, cls)(params, **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.bytes_per_step() == per_param * 1020 + per_param // 2 * 5


def _side_by_side(cls, params, ref_params, grads_per_step, **kwargs):
    """``cls`` from fused_optim and torch.optim on the same params and grads (``grads_per_step``:
    a list per step, or a function of the step making them), params and state compared."""
    opt = getattr(fused_optim, cls)(params, **kwargs)
    ref = getattr(torch.optim, cls)(ref_params, foreach=False, **kwargs)
    for step, grads in enumerate(grads_per_step):
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g, g.clone()
        opt.step()
        ref.step()
        assert_same(opt, ref, params, ref_params, {"rtol": 1e-5, "atol": 1e-6}, f"{cls} after step {step + 1}")
    return opt


def test_lazy_negative_and_conjugate_views(device):
    """A grad or param with the lazy negative bit, and a complex grad with the lazy conjugate bit,
    hold other values in memory than they show: they are staged through resolved copies, and each
    step matches torch. A lazily conjugated param is refused, before anything changes."""
    torch.manual_seed(0)
    shapes = [(5, 3), (4,)]
    # dense grads with the negative bit (as the imaginary part of a conjugated complex tensor of
    # one element is)
    neg_grads = [[torch._neg_view(torch.randn(s, device=device)) for s in shapes] for _ in range(3)]
    assert all(g.is_neg() and g.is_contiguous() for grads in neg_grads for g in grads)
    init = random_tensors(shapes, torch.float32, 0, device)
    _side_by_side("AdamW", leaves(init), leaves(init), neg_grads, lr=0.1, weight_decay=0.1)
    # a param with the negative bit (SGD, whose update torch applies to the view itself)
    neg_param = torch._neg_view(torch.randn(6, device=device)).detach().requires_grad_()
    assert neg_param.is_neg()
    ref_param = neg_param.detach().clone().requires_grad_()
    grads = [[torch.randn(6, device=device)] for _ in range(3)]
    _side_by_side("SGD", [neg_param], [ref_param], grads, lr=0.1, momentum=0.9)
    # complex params, conjugated grads
    init = random_tensors(shapes, torch.complex64, 1, device)
    conj_grads = [[torch.randn(*s, dtype=torch.complex64, device=device).conj() for s in shapes] for _ in range(3)]
    _side_by_side("SGD", leaves(init), leaves(init), conj_grads, lr=0.1, momentum=0.9)
    # a conjugated param
    p = torch.randn(3, dtype=torch.complex64, device=device).conj().detach().requires_grad_()
    before = p.detach().clone()
    opt = fused_optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn(3, dtype=torch.complex64, device=device)
    with pytest.raises(NotImplementedError, match="lazily conjugated"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state


def test_a_stateless_param_resized_in_place_gets_a_new_layout(device):
    """SGD without momentum keeps no state that would show a param's new shape: a param that
    grows, shrinks (a view into a larger buffer) or gains rows with its strides unchanged is laid
    out again; every step matches torch and nothing past the param's memory is written."""
    params, refs = (
        [torch.zeros(4, device=device, requires_grad=True)],
        [torch.zeros(4, device=device, requires_grad=True)],
    )
    opt = fused_optim.SGD(params, lr=1.0)
    ref = torch.optim.SGD(refs, lr=1.0, foreach=False)
    big, ref_big = torch.zeros(10, device=device), torch.zeros(10, device=device)
    for step, (data, ref_data) in enumerate(
        [(None, None), (torch.zeros(6, device=device), torch.zeros(6, device=device)), (big[:3], ref_big[:3])]
    ):
        if data is not None:
            params[0].data, refs[0].data = data, ref_data
        g = torch.randn(params[0].shape, device=device)
        params[0].grad, refs[0].grad = g, g.clone()
        opt.step()
        ref.step()
        assert torch.equal(params[0], refs[0]), step
    assert torch.equal(big, ref_big) and not big[3:].any()
    p, q = torch.zeros(2, 3, device=device, requires_grad=True), torch.zeros(2, 3, device=device, requires_grad=True)
    grads = [[torch.randn(2, 3, device=device)]]
    opt = _side_by_side("SGD", [p], [q], grads, lr=1.0)
    p.data, q.data = torch.zeros(3, 3, device=device), torch.zeros(3, 3, device=device)  # strides stay (3, 1)
    g = torch.randn(3, 3, device=device)
    p.grad, q.grad = g, g.clone()
    opt.step()
    torch.optim.SGD([q], lr=1.0, foreach=False).step()
    assert torch.equal(p, q)
