"""Muon against torch.optim.Muon.

Newton-Schulz runs in bf16 in both, and batched matmuls may round otherwise than torch's
per-matrix ones (on CPU they agree bit for bit), so params are held to accuracy, not to torch's
bits: every run carries a third optimizer, torch's algorithm with Newton-Schulz in float64, and
our params must be as close to it as torch's are (``Trio.check``). Momentum buffers do not depend
on the params: they match torch to fp32 ulps."""

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

import fused_optim
import fused_optim.muon
from algorithms import EXTENSIONS
from fused_optim.kernels._tables import record_launches
from fused_optim.muon import newton_schulz
from parity import TOL, Config, close, leaves, one_rank_mesh, param_arg, random_tensors, set_grads

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")

# tall, wide, square (three: one batch), batched tall, odd, 1x1, empty, and one over a 1024-element block
SHAPES = [(24, 10), (10, 24), (16, 16), (16, 16), (16, 16), (7, 13), (24, 10), (1, 1), (0, 5), (40, 33)]
BUF_TOL = TOL[torch.float32][0]
LOW = {"rtol": 2**-8, "atol": 1e-12}  # a bf16 momentum buffer against torch's fp32 one


def _skips(step, i):
    return (step + i) % 4 == 0 or (i == 1 and step < 3)


def _ns64(update, coefficients, ns_steps, eps):
    """torch's Newton-Schulz in float64."""
    a, b, c = coefficients
    x = update.double()
    x = x.T if x.size(0) > x.size(1) else x
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if update.size(0) > update.size(1) else x


class Trio:
    """fused_optim's optimizer, torch's, and torch's algorithm with float64 Newton-Schulz (and
    float64 params), all from torch's current state; the exact one reads torch's grads and groups."""

    def __init__(self, opt, params, ref, ref_params, values=None):
        self.opt, self.params, self.ref, self.ref_params = opt, params, ref, ref_params
        self.values = values or (lambda: self.params)  # what is compared to the exact params
        self.exact = [q.detach().double() for q in ref_params]
        self.bufs = {i: s["momentum_buffer"].clone() for i, q in enumerate(ref_params) if (s := ref.state.get(q))}
        self.updates = [0.0] * len(params)  # summed |adjusted lr| of each param's steps

    def exact_step(self):
        index = {id(q): i for i, q in enumerate(self.ref_params)}
        for group in self.ref.param_groups:
            lr, m = float(group["lr"]), group["momentum"]
            for q in group["params"]:
                i, g = index[id(q)], q.grad
                if g is None:
                    continue
                buf = self.bufs.setdefault(i, torch.zeros_like(g))
                buf.lerp_(g, 1 - m)
                update = g.lerp(buf, m) if group["nesterov"] else buf
                ortho = _ns64(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                adjusted = _adjust_lr(lr, group["adjust_lr_fn"], q.shape)
                self.exact[i].mul_(1 - lr * group["weight_decay"]).add_(ortho, alpha=-adjusted)
                self.updates[i] += abs(adjusted)

    def step(self, ours=None, before=None):
        """One step of all three; ``before()`` runs first on torch's side (clipping), ``ours()``
        replaces ``opt.step()``."""
        if before:
            before()
        self.exact_step()
        (ours or self.opt.step)()
        self.ref.step()

    def check(self, where):
        for i, (p, q, v, e) in enumerate(zip(self.params, self.ref_params, self.values(), self.exact)):
            mine, theirs = self.opt.state.get(p, {}), self.ref.state.get(q, {})
            assert set(mine) - {"master_param"} == set(theirs), f"param {i} {where}: {sorted(mine)} vs {sorted(theirs)}"
            if theirs:
                close(mine["momentum_buffer"], theirs["momentum_buffer"], BUF_TOL, f"buffer {i} {where}")
            ours_err, torch_err = (v.double() - e).norm(), (q.double() - e).norm()
            tiny = 1e-6 * (e.norm() + 1)  # fp32 rounding of the params
            assert ours_err <= 1.5 * torch_err + tiny, f"param {i} {where}: {ours_err} vs torch {torch_err}"
            # the exact reference is torch's algorithm: torch within bf16 Newton-Schulz error of it
            torch_diff = (q.double() - e).abs()
            assert not torch_diff.numel() or torch_diff.max() <= 0.15 * self.updates[i] + 1e-6, (
                f"exact param {i} {where}"
            )


def run_trio(kwargs, device, *, shapes=SHAPES, steps=5, groups=None, scheduler=None, grad_none=_skips, seed=0):
    init = random_tensors(shapes, torch.float32, seed, device)
    params, ref_params = leaves(init), leaves(init)
    trio = Trio(
        fused_optim.Muon(param_arg(params, groups), **kwargs),
        params,
        torch.optim.Muon(param_arg(ref_params, groups), **kwargs),
        ref_params,
    )
    scheds = (scheduler(trio.opt), scheduler(trio.ref)) if scheduler else ()
    for step in range(steps):
        set_grads(params, ref_params, step, seed, grad_none)
        trio.step()
        for sched in scheds:
            sched.step()
        trio.check(f"after step {step + 1}")
    return trio


EVERYTHING = {
    "lr": 0.03,
    "weight_decay": 0.2,
    "momentum": 0.8,
    "nesterov": False,
    "ns_coefficients": (3.0, -3.2, 1.2),
    "ns_steps": 4,
    "eps": 1e-5,
    "adjust_lr_fn": "match_rms_adamw",
}
CONFIGS = [
    Config("defaults"),
    Config("lr", {"lr": 0.02}),
    Config("nesterov off", {"lr": 0.02, "nesterov": False}),
    Config("momentum", {"lr": 0.02, "momentum": 0.5}),
    Config("weight_decay", {"lr": 0.05, "weight_decay": 0.3}),
    Config("no weight_decay", {"lr": 0.05, "weight_decay": 0.0}),
    Config("original", {"lr": 0.02, "adjust_lr_fn": "original"}),
    Config("match_rms_adamw", {"lr": 0.02, "adjust_lr_fn": "match_rms_adamw"}),
    Config("ns_steps", {"lr": 0.02, "ns_steps": 2}),
    Config("ns_coefficients", {"lr": 0.02, "ns_coefficients": (2.0, -1.5, 0.5)}),
    Config("large eps", {"lr": 0.02, "eps": 2.0}),  # clamps the norm of small matrices
    Config("tensor lr", {"lr": torch.tensor(0.02)}),
    Config("everything", EVERYTHING),
]


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_parity(config, device):
    run_trio(config.kwargs, device)


def test_batched_newton_schulz_matches_per_matrix(device):
    gen = torch.Generator().manual_seed(5)
    for shape in ((24, 10), (10, 24), (16, 16)):
        x = torch.randn(6, *shape, generator=gen).to(device)
        args = ((3.4445, -4.7750, 2.0315), 5, 1e-7)
        batched = newton_schulz(x.bfloat16(), *args)
        single = torch.stack([_zeropower_via_newtonschulz(m, *args) for m in x])
        assert batched.dtype == single.dtype == torch.bfloat16 and batched.shape == x.shape
        torch.testing.assert_close(batched, single, rtol=2 * 2**-8, atol=1e-3)
        for b, s, m in zip(batched, single, x):
            exact = _ns64(m, *args)
            assert (b.double() - exact).norm() <= 1.5 * (s.double() - exact).norm() + 1e-6


def test_param_groups_and_scheduler(device):
    groups = [([0, 1, 2], {"lr": 0.05, "nesterov": False}), ([3, 4, 5, 6], {}), ([7, 8, 9], EVERYTHING)]
    scheduler = lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)  # noqa: E731
    run_trio({"lr": 0.02}, device, groups=groups, scheduler=scheduler)


@pytest.mark.parametrize("direction", ["fused to torch", "torch to fused"])
def test_state_dict_interchange(direction, device, tmp_path):
    src_params = leaves(random_tensors(SHAPES, torch.float32, 0, device))
    src_cls, dst_cls = (fused_optim.Muon, torch.optim.Muon)[:: 1 if direction == "fused to torch" else -1]
    src = src_cls(src_params, **EVERYTHING)
    for step in range(3):
        for i, p in enumerate(src_params):
            p.grad = None if _skips(step, i) else torch.randn_like(p)
        src.step()
    torch.save(src.state_dict(), tmp_path / "optim.pt")
    dst_params = leaves([p.detach() for p in src_params])
    dst = dst_cls(dst_params)
    dst.load_state_dict(torch.load(tmp_path / "optim.pt"))
    assert dst.param_groups[0].keys() == src.param_groups[0].keys()
    for p, q in zip(dst_params, src_params):
        assert dst.state[p].keys() == src.state[q].keys()
        for key, value in src.state[q].items():
            assert torch.equal(dst.state[p][key], value)
    ours, theirs = (src, dst) if direction == "fused to torch" else (dst, src)
    params, ref_params = (src_params, dst_params) if direction == "fused to torch" else (dst_params, src_params)
    trio = Trio(ours, params, theirs, ref_params)
    for step in range(3):
        set_grads(params, ref_params, step, 3, _skips)
        trio.step()
        trio.check(f"{step + 1} steps after loading")


BAD_ARGS = [
    {"lr": -1.0},
    {"momentum": -0.5},
    {"weight_decay": -1.0},
    {"adjust_lr_fn": "spectral"},
    {"lr": torch.tensor([0.1, 0.2])},
]


@pytest.mark.parametrize("kwargs", BAD_ARGS, ids=str)
def test_bad_arguments_raise_like_torch(kwargs):
    _same_error(lambda cls: cls([torch.zeros(2, 3, requires_grad=True)], **kwargs))


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4), ()], ids=str)
def test_params_that_are_not_matrices_raise_like_torch(shape):
    _same_error(lambda cls: cls([torch.zeros(3, 3, requires_grad=True), torch.zeros(shape, requires_grad=True)]))


def _same_error(make):
    with pytest.raises(Exception) as theirs:
        make(torch.optim.Muon)
    with pytest.raises(Exception) as ours:
        make(fused_optim.Muon)
    assert (type(ours.value), str(ours.value)) == (type(theirs.value), str(theirs.value))


STEP_ERRORS = {
    "ns_steps": lambda p, q: ({"ns_steps": 100}, q),
    "ns_coefficients": lambda p, q: ({"ns_coefficients": (1.0, 2.0)}, q),
    "complex": lambda p, q: ({}, torch.zeros(3, 3, dtype=torch.complex64, requires_grad=True)),
    "sparse grad": lambda p, q: ({}, q),
    "1-D param added later": lambda p, q: ({}, torch.zeros(3, requires_grad=True)),
}


@pytest.mark.parametrize("case", STEP_ERRORS)
def test_errors_in_step_raise_like_torch_before_anything_changes(case, device):
    """torch raises these in step(), partway through; fused_optim raises the same before any change."""
    errors = []
    for cls in (torch.optim.Muon, fused_optim.Muon):
        first = torch.ones(4, 3, device=device, requires_grad=True)
        options, second = STEP_ERRORS[case](first, torch.ones(3, 5, device=device, requires_grad=True))
        opt = cls([first], lr=0.1, **options)
        opt.add_param_group({"params": [second]})
        first.grad = torch.ones_like(first)
        second.grad = torch.ones_like(second).to_sparse() if case == "sparse grad" else torch.ones_like(second)
        with pytest.raises(Exception) as err:
            opt.step()
        errors.append((type(err.value), str(err.value)))
        if cls is fused_optim.Muon:
            assert torch.equal(first, torch.ones_like(first)) and not opt.state
    assert errors[0] == errors[1]


def test_signature_and_defaults_match_torch():
    ours = [(p.name, p.kind, p.default) for p in inspect.signature(fused_optim.Muon.__init__).parameters.values()]
    theirs = [(p.name, p.kind, p.default) for p in inspect.signature(torch.optim.Muon.__init__).parameters.values()]
    assert ours[: len(theirs)] == theirs
    mine = [*EXTENSIONS, ("nd_params", None)]  # beyond torch: params with more than two dims
    assert ours[len(theirs) :] == [(n, inspect.Parameter.KEYWORD_ONLY, d) for n, d in mine]


def _trio(device, dtype=torch.float32, shapes=SHAPES, **options):
    init = random_tensors(shapes, dtype, 0, device)
    params, ref_params = leaves(init), leaves([t.float() for t in init])
    kwargs = {"lr": 0.02, "weight_decay": 0.2}
    return Trio(
        fused_optim.Muon(params, **kwargs, **options), params, torch.optim.Muon(ref_params, **kwargs), ref_params
    )


def test_max_grad_norm_is_clip_grad_norm_then_step(device):
    trio = _trio(device, max_grad_norm=3.0)
    for step in range(4):
        set_grads(trio.params, trio.ref_params, step, 0, _skips)
        trio.step(before=lambda: torch.nn.utils.clip_grad_norm_(trio.ref_params, 3.0))
        trio.check(f"after step {step + 1}")


def test_master_weights_on_bf16_params_follow_torch_in_fp32(device):
    trio = _trio(device, torch.bfloat16, master_weights=True)
    trio.values = lambda: [trio.opt.state[p].get("master_param", p) for p in trio.params]
    for step in range(4):
        grads = random_tensors(SHAPES, torch.bfloat16, 100 + step, device)
        for i, (p, q, g) in enumerate(zip(trio.params, trio.ref_params, grads)):
            p.grad, q.grad = (None, None) if _skips(step, i) else (g, g.float())
        trio.step()
        trio.check(f"after step {step + 1}")
        for p in trio.params:
            state = trio.opt.state[p]
            assert p.dtype == torch.bfloat16 and (not state or state["momentum_buffer"].dtype == torch.float32)
            if state:
                assert torch.equal(p, state["master_param"].bfloat16())  # one rounding


def test_found_inf_changes_nothing(device):
    """A step with found_inf set leaves params and momentum buffers as they were (the first step
    too: the buffers stay zeros); the steps around it unscale inside the kernels."""
    trio = _trio(device)
    scale = torch.tensor(2.0**10)
    for step in range(4):
        set_grads(trio.params, trio.ref_params, step, 0)
        for p in trio.params:
            p.grad.mul_(scale)
        if step in (0, 2):
            before = [p.detach().clone() for p in trio.params]
            buffers = [trio.opt.state[p].get("momentum_buffer", torch.zeros_like(p)).clone() for p in trio.params]
            trio.opt.step(grad_scale=scale, found_inf=torch.tensor(1.0))
            assert all(torch.equal(p, b) for p, b in zip(trio.params, before))
            assert all(torch.equal(trio.opt.state[p]["momentum_buffer"], b) for p, b in zip(trio.params, buffers))
            continue
        trio.step(ours=lambda: trio.opt.step(grad_scale=scale, found_inf=torch.tensor(0.0)))
        trio.check(f"after step {step + 1}")


def test_grad_scaler(device):
    """GradScaler hands its scale and inf flag to step(); torch's side unscales and skips on the host."""
    trio = _trio(device)
    scalers = [torch.amp.GradScaler(device.type, init_scale=2.0**12, growth_interval=3) for _ in range(2)]
    for step in range(5):
        weights = random_tensors(SHAPES, torch.float32, 50 + step, device)
        if step == 2:
            weights[3].view(-1)[7] = float("inf")
        for opt, ps, scaler in ((trio.opt, trio.params, scalers[0]), (trio.ref, trio.ref_params, scalers[1])):
            opt.zero_grad()
            scaler.scale(sum((p * w).sum() for p, w in zip(ps, weights))).backward()
        scalers[1].unscale_(trio.ref)
        if step != 2:
            trio.exact_step()
        for opt, scaler in ((trio.opt, scalers[0]), (trio.ref, scalers[1])):
            scaler.step(opt)
            scaler.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        trio.check(f"after step {step + 1}")


def test_stochastic_rounding_and_bf16_states(device):
    """bf16 params with stochastic rounding (each of the step's two roundings within one ulp);
    fp32 params with bf16 momentum buffers."""
    init = random_tensors([(24, 10), (16, 16)], torch.bfloat16, 0, device)
    sr, exact = leaves(init), leaves(init)
    opt = fused_optim.Muon(sr, lr=0.05, stochastic_rounding=True)
    ref = fused_optim.Muon(exact, lr=0.05, master_weights=True)
    for p, q in zip(sr, exact):
        p.grad = q.grad = torch.randn_like(p)
    opt.step()
    ref.step()
    for p, q, start in zip(sr, exact, init):
        master = ref.state[q]["master_param"]  # the step in fp32
        assert ((p.float() - master).abs() <= 2**-6 * (start.float().abs() + 0.05)).all()  # two roundings
    assert any(not torch.equal(p, q) for p, q in zip(sr, exact))
    trio = _trio(device, state_dtype=torch.bfloat16)
    set_grads(trio.params, trio.ref_params, 0, 0)
    trio.step()
    for p, q in zip(trio.params, trio.ref_params):
        close(trio.opt.state[p]["momentum_buffer"].float(), trio.ref.state[q]["momentum_buffer"], LOW, "bf16 buffer")


def test_two_launches_per_segment_and_step(device):
    params = [torch.randn(5, 3 + i % 3, device=device, requires_grad=True) for i in range(12)]
    params += [torch.randn(4, 4, device=device, dtype=torch.float64, requires_grad=True)]
    opt = fused_optim.Muon(params)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        with record_launches() as log:
            opt.step()
        assert [name for name, _ in log] == [
            "_update_kernel[muon_momentum_math]",
            "_update_kernel[muon_apply_math]",
        ] * 2
    # per element: param read and written twice, grad read, buffer read and written, scratch written and read
    n32, n64 = sum(p.numel() for p in params[:-1]), params[-1].numel()
    assert opt.bytes_per_step() == 9 * 4 * n32 + 9 * 8 * n64


def test_non_contiguous_params(device):
    """A transposed param (dense: its state and scratch regions follow its strides) and a strided
    slice (staged through a contiguous copy) take the same steps as torch's."""
    a, b, c = random_tensors([(10, 24), (24, 40), (16, 16)], torch.float32, 0, device)
    params = [a.t().detach().requires_grad_(), b[:, ::2].detach().requires_grad_(), leaves([c])[0]]
    ref_params = [a.t().detach().clone().requires_grad_(), b[:, ::2].clone().requires_grad_(), leaves([c])[0]]
    assert not params[0].is_contiguous() and not params[1].is_contiguous()
    kwargs = {"lr": 0.05, "weight_decay": 0.1}
    trio = Trio(fused_optim.Muon(params, **kwargs), params, torch.optim.Muon(ref_params, **kwargs), ref_params)
    for step in range(3):
        set_grads(params, ref_params, step, 0)
        trio.step()
        trio.check(f"after step {step + 1}")


def test_dtensor_params_are_gathered_orthogonalized_and_sharded_again(device):
    """A DTensor param (one rank here; two in test_distributed.py) takes the same steps as the
    plain tensor: its update is gathered whole, orthogonalized, and its shard kept."""
    from torch.distributed.tensor import Shard, distribute_tensor

    with one_rank_mesh(device) as mesh:
        init = random_tensors([(12, 7), (7, 12)], torch.float32, 3, device)
        params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in init]
        plain = leaves(init)
        opt, ref = fused_optim.Muon(params, lr=0.05), fused_optim.Muon(plain, lr=0.05)
        for step in range(3):
            for p, q, g in zip(params, plain, random_tensors([(12, 7), (7, 12)], torch.float32, 40 + step, device)):
                p.grad, q.grad = distribute_tensor(g, mesh, [Shard(0)]), g.clone()
            opt.step()
            ref.step()
            for p, q in zip(params, plain):
                assert torch.equal(p.full_tensor(), q.detach())
                assert torch.equal(opt.state[p]["momentum_buffer"].full_tensor(), ref.state[q]["momentum_buffer"])


def test_same_shape_matrices_are_orthogonalized_in_one_batched_call(device, monkeypatch):
    calls = []

    def spy(x, *args):
        calls.append(tuple(x.shape))
        return newton_schulz(x, *args)

    monkeypatch.setattr(fused_optim.muon, "newton_schulz", spy)
    shapes = [(6, 4), (5, 5), (6, 4), (5, 5), (6, 4), (4, 6)]
    params = leaves(random_tensors(shapes, torch.float32, 0, device))
    for p in params:
        p.grad = torch.randn_like(p)
    fused_optim.Muon(params).step()
    assert sorted(calls) == sorted([(3, 6, 4), (2, 5, 5), (1, 4, 6)])


@pytest.mark.parametrize("mode", ["batch", "flatten"])
def test_params_with_more_than_two_dims(mode, device):
    """nd_params="batch": a [E, R, C] stack steps as E separate R x C matrices; "flatten": an
    [O, I, k, k] filter as its O x I*k*k matrix: each against torch's Muon on those 2-D params."""
    shape = (3, 6, 4) if mode == "batch" else (5, 2, 3, 3)
    params = leaves(random_tensors([shape, (6, 4)], torch.float32, 1, device))
    if mode == "batch":
        ref_params = leaves([*params[0].detach().unbind(0), params[1].detach()])
        as_ref = lambda grads: [*grads[0].unbind(0), grads[1]]  # noqa: E731
    else:
        ref_params = leaves([params[0].detach().reshape(5, 18), params[1].detach()])
        as_ref = lambda grads: [grads[0].reshape(5, 18), grads[1]]  # noqa: E731
    with pytest.raises(ValueError, match="only supports 2D"):
        fused_optim.Muon(params)
    opt, ref = fused_optim.Muon(params, lr=0.05, nd_params=mode), torch.optim.Muon(ref_params, lr=0.05)
    for step in range(3):
        grads = random_tensors([shape, (6, 4)], torch.float32, 20 + step, device)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        for q, g in zip(ref_params, as_ref(grads)):
            q.grad = g.clone()
        opt.step()
        ref.step()
        # on CPU batched and per-matrix Newton-Schulz agree bit for bit (test_batched_newton_schulz...)
        flat = lambda ps: torch.cat([p.detach().reshape(-1) for p in ps])  # noqa: E731
        close(flat(params), flat(ref_params), BUF_TOL, f"step {step + 1}")


def test_nd_params_checked():
    with pytest.raises(ValueError, match="nd_params"):
        fused_optim.Muon([torch.zeros(2, 2, requires_grad=True)], nd_params="rows")
    with pytest.raises(ValueError, match="only supports 2D"):  # vectors stay refused, as torch does
        fused_optim.Muon([torch.zeros(4, requires_grad=True)], nd_params="batch")


SCRIPT = textwrap.dedent(
    """
    import sys
    import torch, fused_optim
    from fused_optim.kernels import INTERPRETED
    assert INTERPRETED == (sys.argv[1] == "interpreter")
    torch.manual_seed(0)


    def same(a, b):
        if INTERPRETED:  # Triton 3.3's interpreter rounds the product of tl.fma: last-bit differences
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7 * float(b.abs().max()))
        else:
            assert torch.equal(a, b)


    # the fallback is torch's code on every dtype; the kernels' bf16 math is fp32 (not torch's)
    for dtype in (torch.float32,) if INTERPRETED else (torch.float32, torch.bfloat16):
        for kwargs in ({}, {"lr": 0.02, "nesterov": False, "adjust_lr_fn": "match_rms_adamw"}):
            init = [torch.randn(s, dtype=dtype) for s in ((6, 4), (4, 6), (5, 5), (40, 30))]
            ps, qs = [t.clone().requires_grad_() for t in init], [t.clone().requires_grad_() for t in init]
            opt, ref = fused_optim.Muon(ps, **kwargs), torch.optim.Muon(qs, **kwargs)
            for step in range(3):
                for i, (p, q) in enumerate(zip(ps, qs)):
                    g = None if (i + step) % 3 == 0 else torch.randn_like(p)
                    p.grad, q.grad = g, None if g is None else g.clone()
                opt.step()
                ref.step()
            for p, q in zip(ps, qs):
                assert opt.state[p].keys() == ref.state[q].keys()
                same(p.detach(), q.detach())
                same(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])
    print("OK")
    """
)


def _run(python, mode):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    if mode == "interpreter":
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run(
        [python, "-W", "ignore", "-c", SCRIPT, mode], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-3000:]


def test_cpu_without_interpreter_is_torch_exactly():
    """Without the interpreter, CPU params take torch's own functional (fused_optim's _reference)."""
    _run(sys.executable, "fallback")


def test_the_lowest_supported_triton_runs_muon(floor_python):
    _run(floor_python, "interpreter")


CODEGEN = textwrap.dedent(
    """
    import json, re
    import triton.language as tl
    from fused_optim.kernels._inspect import compile_for, fp64_arithmetic, ptxas_report, vector_accesses
    from fused_optim.kernels._update import READ_ONLY, _no_reduce, _update_kernel
    from fused_optim.kernels.muon import MUON_APPLY, MUON_MOMENTUM

    out = {}
    for name, algo in (("momentum", MUON_MOMENTUM), ("apply", MUON_APPLY)):
        for dt, block in (("fp32", 1024), ("bf16", 2048)):
            d = getattr(tl, {"fp32": "float32", "bf16": "bfloat16"}[dt])
            ro = sum(1 << i for i, k in enumerate(algo.state_keys) if k in algo.read_only)
            live = (1 << len(algo.state_keys)) - 1
            constexprs = dict(
                MATH=algo.math, LIVE=live | ro << READ_ONLY, N_H=algo.n_hyper, N_K=algo.n_step, USES_FRESH=False,
                REDUCE=_no_reduce, N_SUMS=0, PHASE=0,
                O0=True, O1=d, O2=False, P_DTYPE=d, S_DTYPE=d, C_DTYPE=tl.float32, WEIGHT_DECAY=name == "momentum",
                DECOUPLED=True, MAXIMIZE=False, PER_TENSOR_STEP=name == "apply", HAS_GRAD_SCALE=True,
                HAS_FOUND_INF=True, HAS_CLIP=True, MASTER=False, STOCHASTIC=False, BLOCK=block, BLOCKS=1,
                QUANT=0, Q_SQRT=0, Q_FP8=False, Q_STOCHASTIC=False, QB_=256, PARTS=4,
            )
            types = {"tensor_table": "*i64", "block_table": "*i64", "step_table": "*fp64", "grad_scale": "*fp32",
                     "found_inf": "*fp32", "clip_coef": "*fp32", "master": "*fp32", "sum_table": "*fp32",
                     "states": tuple("*" + dt for _ in algo.state_keys),
                     "scales": tuple("*fp32" for _ in algo.state_keys), "qmap": "*fp32"}
            ptx = compile_for(_update_kernel, types, constexprs, num_warps=8).asm["ptx"]
            approx = len(re.findall(r"\\.approx(?:\\.ftz)?\\.f32|div\\.full\\.f32", ptx))
            out[f"{name}-{dt}"] = dict(vector_accesses(ptx), **ptxas_report(ptx), fp64=fp64_arithmetic(ptx))
            out[f"{name}-{dt}"]["approx"] = approx
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("triton_version", ["installed Triton", "lowest supported Triton"])
def test_kernel_codegen_for_sm90(triton_version, request):
    """128-bit accesses only to what each launch needs: the momentum launch reads param, grad and
    buffer (not the scratch it overwrites) and writes param, buffer and scratch; the apply launch
    reads param and scratch (not the grad) and writes only the param (the scratch is read-only).
    No spills, no float64 or approximate arithmetic, 32 and 24 registers (Triton 3.9) + 8."""
    python = sys.executable if triton_version == "installed Triton" else request.getfixturevalue("floor_python")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([python, "-c", CODEGEN], check=False, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for dt in ("fp32", "bf16"):
        momentum, apply = report[f"momentum-{dt}"], report[f"apply-{dt}"]
        assert (momentum["ld128"], momentum["st128"], apply["ld128"], apply["st128"]) == (3, 3, 2, 1), report
        for r, budget in ((momentum, 40), (apply, 32)):
            assert r["spill_stores"] == r["spill_loads"] == r["stack_frame"] == 0 and r["registers"] <= budget, report
            assert r["fp64"] == 0 and r["approx"] == 0, report
