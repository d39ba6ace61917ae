"""How launches meet the device: every launch under its tables' device and stream, several blocks
per program, and the CUDA graph capture contract (a captured step allocates no table and copies
nothing from the host). Real captures and a second GPU need hardware; here the decisions are
checked through the same functions, with CUDA's answers simulated where needed."""

import types
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_optim
from fused_optim.kernels import _tables, _update, clip
from parity import leaves, random_tensors

KERNELS = (_update._update_kernel, _update._advance_kernel, clip._grad_norm_kernel)
SHAPES = [(1500,), (33, 65), (7,), (2048,)]


def _watch_kernels(monkeypatch, on_launch):
    """Call ``on_launch(kernel name)`` at the start of every Triton launch."""
    for kernel in KERNELS:
        run = kernel.run

        def watched(*args, _run=run, _name=kernel.fn.__name__, **kwargs):
            with on_launch(_name):
                return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", watched)


# --- device guard --------------------------------------------------------------------------------
def test_every_launch_runs_under_its_tables_device_guard(monkeypatch, device):
    """Update, step advance and clip partials: each launch happens inside ``device_guard`` of the
    tables it works on (Triton launches on the *current* device and stream, not the tensors')."""
    active = []
    real_guard = _tables.device_guard

    @contextmanager
    def recording_guard(tables):
        active.append(tables.tensor_table.device)
        try:
            with real_guard(tables):
                yield
        finally:
            active.pop()

    seen = []

    @contextmanager
    def on_launch(name):
        seen.append((name, list(active)))
        yield

    monkeypatch.setattr(_tables, "device_guard", recording_guard)
    _watch_kernels(monkeypatch, on_launch)
    params = leaves(random_tensors(SHAPES, torch.float32, 0, device))
    opt = fused_optim.AdamW(params, lr=0.01, capturable=True, max_grad_norm=1.0)
    for p, g in zip(params, random_tensors(SHAPES, torch.float32, 1, device)):
        p.grad = g
    opt.step()
    assert {name for name, _ in seen} == {"_update_kernel", "_advance_kernel", "_grad_norm_kernel"}
    assert all(guards == [params[0].device] for _, guards in seen), seen


class _Stream:
    def __init__(self, name):
        self.name, self.waited = name, []

    def wait_event(self, event):
        self.waited.append(event)

    def __eq__(self, other):
        return isinstance(other, _Stream) and other.name == self.name

    __hash__ = None


def _fake_cuda_tables(recorded):
    """Tables that look as if they lived on cuda:1 (CPU tensors cannot): each tensor records the
    streams it is marked as used by."""

    def tensor(name):
        mark = lambda s: recorded.append((name, s.name))  # noqa: E731
        return types.SimpleNamespace(device=torch.device("cuda", 1), record_stream=mark)

    return types.SimpleNamespace(
        tensor_table=tensor("tensor_table"), block_table=tensor("block_table"), step_table=tensor("step_table"),
        sums=tensor("sums"), stream=_Stream("upload"), uploaded="upload event",
    )  # fmt: skip


def test_device_guard_makes_the_tables_device_and_stream_current(monkeypatch):
    entered, recorded = [], []
    current = {"device": 0, "stream": _Stream("compute"), "capturing": False}

    @contextmanager
    def fake_device(d):
        entered.append(torch.device(d))
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["device"])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current["stream"])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: current["capturing"])
    tables = _fake_cuda_tables(recorded)
    with _tables.device_guard(tables):
        pass
    assert entered == [torch.device("cuda", 1)]  # current device 0, tables on cuda:1
    # another stream than the upload's: wait for the upload, mark every table as used by it
    assert current["stream"].waited == ["upload event"]
    assert sorted(recorded) == [
        ("block_table", "compute"), ("step_table", "compute"), ("sums", "compute"), ("tensor_table", "compute")
    ]  # fmt: skip
    assert tables.stream == current["stream"]
    with _tables.device_guard(tables):  # the same stream again: nothing more to do
        pass
    assert current["stream"].waited == ["upload event"] and len(recorded) == 4
    current["stream"], current["capturing"] = _Stream("graph"), True
    with _tables.device_guard(tables):  # inside a capture: no cross-stream wait, no marking
        pass
    assert current["stream"].waited == [] and len(recorded) == 4
    current["device"] = 1
    with _tables.device_guard(tables):  # already the current device: no switch
        pass
    assert entered == [torch.device("cuda", 1)] * 3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (runs on multi-GPU machines)")
def test_params_on_another_gpu_than_the_current_one_on_a_side_stream():
    """Params on cuda:1 while cuda:0 is current, stepped on a side stream of cuda:1: the results
    equal torch's, and nothing faults."""
    init = random_tensors(SHAPES, torch.float32, 0, torch.device("cuda", 1))
    params, ref_params = leaves(init), leaves(init)
    opt = fused_optim.AdamW(params, lr=0.01, capturable=True, max_grad_norm=1.0)
    ref = torch.optim.AdamW(ref_params, lr=0.01, foreach=False)
    side = torch.cuda.Stream(device=1)
    for step in range(3):
        grads = random_tensors(SHAPES, torch.float32, 10 + step, torch.device("cuda", 1))
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
        ref.step()
        with torch.cuda.device(0):
            side.wait_stream(torch.cuda.current_stream(1))
            with torch.cuda.stream(side):
                opt.step()
            torch.cuda.current_stream(1).wait_stream(side)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# --- several blocks per program ----------------------------------------------------------------------
def _run(blocks, name, dtype, device, steps=2, **kwargs):
    init = random_tensors(SHAPES, dtype, 0, device)
    base = torch.zeros(sum(t.numel() for t in init) + 3, dtype=dtype, device=device)
    params, at = [], 1  # odd offsets: misaligned for 128-bit access, every block masked
    for t in init:
        view = base[at : at + t.numel()].view(t.shape)
        view.copy_(t)
        params.append(torch.nn.Parameter(view))
        at += t.numel()
    params += leaves(init)  # and aligned ones
    opt = getattr(fused_optim, name)(params, lr=0.01, **kwargs)
    opt._blocks_per_program = blocks
    for step in range(steps):
        for p, g in zip(params, random_tensors(SHAPES * 2, dtype, 10 + step, device)):
            p.grad = g
        opt.step()
    return opt, params


@pytest.mark.parametrize(
    ("name", "dtype", "kwargs"),
    [
        ("Adam", torch.float32, {"weight_decay": 0.1}),
        ("SGD", torch.float32, {"momentum": 0.9}),
        ("AdamW", torch.bfloat16, {"stochastic_rounding": True}),
        ("NAdam", torch.float32, {"capturable": True}),
    ],
    ids=["Adam", "SGD", "AdamW-bf16-stochastic", "NAdam-capturable"],
)
@pytest.mark.parametrize("blocks", [2, 4])
def test_several_blocks_per_program_give_identical_results(blocks, name, dtype, kwargs, device):
    """A program may cover ``_blocks_per_program`` consecutive blocks of one tensor (fewer programs,
    each paying its table loads once): the same elements get the same math and random bits."""
    opt, params = _run(blocks, name, dtype, device, **kwargs)
    ref, ref_params = _run(1, name, dtype, device, **kwargs)
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
        for key, value in ref.state[q].items():
            assert torch.equal(opt.state[p][key], value), key
    for launch in next(iter(opt._caches.values())).plan.launches:
        tables = launch.tables
        chunk = tables.block * blocks
        assert tables.blocks == blocks
        assert tables.n_blocks == sum(-(-int(n) // chunk) for n in tables.rows[:, _tables.COL_NUMEL])


def test_several_blocks_per_program_clip_the_same_norm(device):
    """The grad-norm partials cover the same blocks (each program sums its own, in order)."""
    norms = []
    for blocks in (1, 4):
        opt, params = _run(blocks, "SGD", torch.float32, device, steps=1)
        norms.append(opt.clip_grad_norm_(1.0))
    torch.testing.assert_close(norms[1], norms[0], rtol=1e-6, atol=0)
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    torch.testing.assert_close(norms[1], expected, rtol=1e-6, atol=0)


# --- CUDA graph capture contract ----------------------------------------------------------------------
ALLOWED_IN_CAPTURE = {
    "select.int",  # views of the table's rows
    "_foreach_zero_.default",  # the moved grads' table entries, rewritten from kernel arguments
    "_foreach_add_.ScalarList",
    "_record_function_enter_new.default",  # torch.optim's profiler annotation of step()
    "_record_function_exit._RecordFunction",
}


class _Ops(TorchDispatchMode):
    """Every aten op outside the kernels (the interpreter's own copies are not the engine's)."""

    def __init__(self):
        super().__init__()
        self.ops, self.paused = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops.append(f"{func.__name__}")
        return func(*args, **(kwargs or {}))


def _refuse(*args, **kwargs):
    raise AssertionError("host memory reached a captured step")


def _capturable_pair(device):
    init = random_tensors(SHAPES, torch.float32, 0, device)
    runs = []
    for _ in range(2):
        params = leaves(init)
        opt = fused_optim.Adam(params, lr=0.01, weight_decay=0.1, capturable=True, max_grad_norm=None)
        for step in range(2):  # warm-up
            for p, g in zip(params, random_tensors(SHAPES, torch.float32, 10 + step, device)):
                p.grad = g
            opt.step()
        runs.append((opt, params))
    return runs


def test_a_captured_step_allocates_nothing_and_copies_nothing_from_the_host(monkeypatch, device):
    """After warm-up, grads at new addresses (allocated inside the graph, as a captured backward
    does) are written into the device table through kernel arguments, never through host memory;
    the step allocates nothing, and it computes what an eager step computes."""
    (opt, params), (ref, ref_params) = _capturable_pair(device)
    grads = random_tensors(SHAPES, torch.float32, 20, device)
    for p, q, g in zip(params, ref_params, grads):
        p.grad, q.grad = g.clone(), g.clone()  # new storage: the tables must follow
    mode = _Ops()

    @contextmanager
    def paused(name):
        mode.paused += 1
        try:
            yield
        finally:
            mode.paused -= 1

    _watch_kernels(monkeypatch, paused)
    monkeypatch.setattr(_tables, "capturing", lambda: True)
    monkeypatch.setattr(_tables, "to_device", _refuse)
    monkeypatch.setattr(torch.Tensor, "pin_memory", _refuse)
    monkeypatch.setattr(_update, "step_table", _refuse)
    with mode:
        opt.step()
    monkeypatch.undo()
    assert set(mode.ops) <= ALLOWED_IN_CAPTURE, sorted(set(mode.ops) - ALLOWED_IN_CAPTURE)
    assert "_foreach_add_.ScalarList" in mode.ops  # the moved grads were written in the graph's way
    ref.step()
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
        for key, value in ref.state[q].items():
            assert torch.equal(opt.state[p][key], value), key
    launches = [launch for plan, *_ in opt._plans() for launch in plan.launches]
    assert all(opt._graph_launches[id(launch.tables)] is launch for launch in launches)  # kept alive
    assert all(launch.tables.graph_written for launch in launches)


def test_eager_steps_after_a_capture_upload_the_tables_again(monkeypatch, device):
    """A replay writes the graph's grad addresses into the device table: every eager step after a
    capture uploads the host rows again before its launches, whether or not its grads moved."""
    (opt, _), _ = _capturable_pair(device)
    uploads = []
    real_upload = _tables.upload
    monkeypatch.setattr(_tables, "upload", lambda tables: (uploads.append(tables), real_upload(tables)))
    opt.step()  # nothing moved, no capture yet: nothing to upload
    assert uploads == []
    monkeypatch.setattr(_tables, "capturing", lambda: True)
    opt.step()
    monkeypatch.setattr(_tables, "capturing", lambda: False)
    opt.step()
    assert uploads and all(t.graph_written for t in uploads)


def test_a_refused_capture_leaves_moved_grads_of_other_groups_alone(monkeypatch, device):
    """Group 0's grads moved, group 1 would need a rebuild: the capture raises before group 0's
    tables are repointed (its host rows would otherwise hold addresses the device table lacks)."""
    (opt, params), _ = _capturable_pair(device)
    extra = torch.nn.Parameter(torch.randn(5, device=device))
    opt.add_param_group({"params": [extra]})
    tables = opt._caches[0].plan.launches[0].tables
    rows = tables.rows.copy()
    for p in params:
        p.grad = p.grad.clone()  # moved
    extra.grad = torch.randn(5, device=device)
    monkeypatch.setattr(_tables, "capturing", lambda: True)
    with pytest.raises(RuntimeError, match="Warm up"):
        opt.step()
    assert (tables.rows == rows).all()


def test_capture_refuses_what_would_build_tables_before_changing_anything(monkeypatch, device):
    (opt, params), _ = _capturable_pair(device)
    extra = torch.nn.Parameter(torch.randn(5, device=device))
    opt.add_param_group({"params": [extra]})
    extra.grad = torch.randn(5, device=device)
    before = [p.detach().clone() for p in [*params, extra]]
    monkeypatch.setattr(_tables, "capturing", lambda: True)
    with pytest.raises(RuntimeError, match="Warm up with two eager steps"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip([*params, extra], before))
    assert float(opt.state[params[0]]["step"]) == 2


def test_capture_refuses_host_step_counts_as_torch_does(monkeypatch, device):
    params = leaves(random_tensors(SHAPES, torch.float32, 0, device))
    opt = fused_optim.Adam(params, lr=0.01)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    monkeypatch.setattr(_tables, "capturing", lambda: True)
    with pytest.raises(RuntimeError, match="capturable is False"):
        opt.step()


def test_captured_tables_rows_are_rewritten_from_kernel_arguments(device):
    """``write_in_graph``: the device table's grad columns get the host rows' values, every row."""
    init = random_tensors(SHAPES, torch.float32, 0, device)
    numels = np.asarray([t.numel() for t in init], dtype=np.int64)
    addrs = np.asarray([t.data_ptr() for t in init], dtype=np.int64)
    tables = _tables.build_tables(addrs, addrs, np.zeros_like(numels), numels, numels * 0, numels * 0, 1024, device)
    if device.type == "cpu":  # on CPU the host rows and the table share memory: detach them
        tables.tensor_table = tables.tensor_table.clone()
    moved = np.asarray([1, 3])
    new = np.asarray([4096 * 16 + 4, 8192 * 16], dtype=np.int64)  # the first is misaligned
    _tables.repoint_grads(tables, moved, new)
    assert (tables.tensor_table.cpu().numpy()[moved, _tables.COL_GRAD] != new).all()  # host rows only
    _tables.write_in_graph(tables)
    table = tables.tensor_table.cpu().numpy()
    assert (table[moved, _tables.COL_GRAD] == new).all()
    assert table[1, _tables.COL_VEC_END] == 0 and table[3, _tables.COL_VEC_END] == 2048
    assert (table == tables.rows).all() and tables.graph_written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU (runs on CUDA machines)")
def test_a_whole_training_step_captured_with_grads_allocated_in_the_graph():
    """torch's whole-network capture recipe: warm-up on a side stream, grads set to None, then
    forward, backward (which allocates the grads inside the graph) and step() captured together.
    Replays equal the same steps run eagerly."""
    import copy

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8)).to(device)
    twin = copy.deepcopy(model)
    opts = [
        fused_optim.AdamW(m.parameters(), lr=torch.tensor(1e-2, device=device), capturable=True) for m in (model, twin)
    ]
    x, y = torch.randn(16, 64, device=device), torch.randn(16, 8, device=device)

    def train_step(m, opt):
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for m, opt in zip((model, twin), opts):
                opt.zero_grad(set_to_none=True)
                train_step(m, opt)
    torch.cuda.current_stream().wait_stream(side)
    opts[0].zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(model, opts[0])
    for step in range(4):
        x.copy_(torch.randn_like(x))
        y.copy_(torch.randn_like(y))
        graph.replay()
        opts[1].zero_grad(set_to_none=True)
        train_step(twin, opts[1])
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"after replay {step + 1}")
