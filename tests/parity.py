"""Parity harness shared by every algorithm's tests: fused_optim against torch.optim(foreach=False)
on identical random inputs, comparing params and every state key after every step."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

# Shapes: odd sizes, a tensor spanning several 1024-element blocks, 0-dim, empty and size-1.
SHAPES = [(7, 13), (2500,), (3, 4, 5), (), (0,), (1, 1), (33, 65), (1,)]

# (after the first step, over the run). fp32 from DESIGN.md; fp64 is the same ulp budget at
# fp64's epsilon. atol counts per unit of the compared tensor's magnitude (see `close`).
TOL = {
    torch.float32: ({"rtol": 1e-6, "atol": 1e-7}, {"rtol": 1e-5, "atol": 1e-6}),
    torch.complex64: ({"rtol": 1e-6, "atol": 1e-7}, {"rtol": 1e-5, "atol": 1e-6}),
    torch.float64: ({"rtol": 1e-14, "atol": 1e-15}, {"rtol": 1e-13, "atol": 1e-14}),
    torch.complex128: ({"rtol": 1e-14, "atol": 1e-15}, {"rtol": 1e-13, "atol": 1e-14}),
}


@dataclass
class Config:
    desc: str
    kwargs: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return self.desc


def random_tensors(shapes, dtype, seed: int, device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        x = torch.randn(shape, generator=gen, dtype=torch.float64 if not dtype.is_complex else torch.complex128)
        out.append(x.to(dtype).to(device))
    return out


def leaves(tensors) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def param_arg(params, groups):
    """The ``params`` argument of an optimizer: a flat list, or groups given as (indices, options)."""
    if groups is None:
        return list(params)
    return [{"params": [params[i] for i in idx], **opts} for idx, opts in groups]


def close(actual, expected, tol, what: str) -> None:
    """``assert_close`` with ``atol`` scaled by the magnitude of ``expected`` when that exceeds 1.
    An element that cancellation brings near zero carries the rounding error of the larger values
    it came from, so absolute error is measured in units of the tensor's scale; for tensors of
    scale <= 1 this is plain atol. (Introduced when RMSprop's momentum buffer, of magnitude ~100,
    crossed zero 1.4e-6 away from torch, whose CPU sqrt is up to 1 ulp off: a fixed atol of 1e-6
    asks for sub-ulp accuracy at that scale. Params of magnitude up to ~4 get up to 4x the
    absolute slack they had; no other test needed it.)"""
    scale = expected.abs().max().item() if expected.numel() and expected.dtype != torch.bool else 0.0
    atol = tol["atol"] * max(1.0, scale)
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=atol, msg=lambda m: f"{what}: {m}")


def assert_same(opt, ref_opt, params, ref_params, tol, where: str) -> None:
    """Params and every state key of ``opt`` equal those of ``ref_opt``."""
    for i, (p, q) in enumerate(zip(params, ref_params)):
        close(p, q, tol, f"param {i} {where}")
        mine, theirs = opt.state.get(p, {}), ref_opt.state.get(q, {})
        assert set(mine) == set(theirs), f"param {i} {where}: state keys {sorted(mine)} vs torch {sorted(theirs)}"
        for key, expected in theirs.items():
            close(mine[key], expected, tol, f"state {key!r} of param {i} {where}")


def set_grads(params, ref_params, step: int, seed: int, grad_none=None) -> None:
    grads = random_tensors([p.shape for p in params], params[0].dtype, seed * 1000 + step, params[0].device)
    for i, (p, q, g) in enumerate(zip(params, ref_params, grads)):
        if grad_none is not None and grad_none(step, i):
            p.grad = q.grad = None
        else:
            p.grad, q.grad = g.clone(), g.clone()


def run_parity(
    fused_cls,
    torch_cls,
    kwargs: dict,
    *,
    device,
    shapes=SHAPES,
    dtype=torch.float32,
    steps: int = 10,
    grad_none=None,
    groups=None,
    scheduler=None,
    seed: int = 0,
):
    """Train fused and torch optimizers side by side, checking parity after every step.

    ``grad_none(step, i)`` leaves param ``i`` without a grad at ``step``; ``scheduler(opt)`` builds
    an LR scheduler stepped after every optimizer step. Returns both optimizers and param lists.
    """
    init = random_tensors(shapes, dtype, seed, device)
    params, ref_params = leaves(init), leaves(init)
    opt = fused_cls(param_arg(params, groups), **kwargs)
    ref_opt = torch_cls(param_arg(ref_params, groups), foreach=False, **kwargs)
    scheds = (scheduler(opt), scheduler(ref_opt)) if scheduler else ()
    first, run = TOL[dtype]
    for step in range(steps):
        set_grads(params, ref_params, step, seed, grad_none)
        opt.step()
        ref_opt.step()
        for sched in scheds:
            sched.step()
        assert_same(opt, ref_opt, params, ref_params, first if step == 0 else run, f"after step {step + 1}")
    return opt, ref_opt, params, ref_params


def run_interchange(src_cls, dst_cls, kwargs: dict, *, device, path, shapes=SHAPES, steps: int = 4, grad_none=None):
    """Train ``src_cls`` a few steps, save its ``state_dict`` to ``path``, load it into a fresh
    ``dst_cls`` (one of them torch's, the other ours): equal right after loading, and both go on
    alike."""
    src_params = leaves(random_tensors(shapes, torch.float32, 0, device))
    src = src_cls(src_params, **kwargs)
    for step in range(steps):
        for i, p in enumerate(src_params):
            p.grad = None if grad_none is not None and grad_none(step, i) else torch.randn_like(p)
        src.step()
    torch.save(src.state_dict(), path)
    dst_params = leaves([p.detach() for p in src_params])
    dst = dst_cls(dst_params)
    dst.load_state_dict(torch.load(path))
    assert_same(dst, src, dst_params, src_params, {"rtol": 0, "atol": 0}, "right after loading")
    for step in range(steps):
        set_grads(dst_params, src_params, step, 3)
        dst.step()
        src.step()
        assert_same(dst, src, dst_params, src_params, TOL[torch.float32][1], f"{step + 1} steps after loading")


@contextlib.contextmanager
def one_rank_mesh(device: torch.device):
    """A one-process group (gloo on CPU, NCCL with CUDA) and a device mesh over it: DTensor params
    without spawning processes."""
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield DeviceMesh(device.type, [0])
    finally:
        dist.destroy_process_group()


def clip_side_by_side(opt, ref, params, ref_params, check, max_norm: float = 0.7, steps: int = 3) -> None:
    """``opt`` (made with ``max_grad_norm=max_norm``) against the reference stepped on grads
    clipped by ``torch.nn.utils.clip_grad_norm_``; ``check(where)`` after every step."""
    for step in range(steps):
        set_grads(params, ref_params, step, 1)
        torch.nn.utils.clip_grad_norm_([q for q in ref_params if q.grad is not None], max_norm)
        opt.step()
        ref.step()
        check(f"after step {step + 1}")


def bf16_states_side_by_side(opt, ref, params, ref_params, check, steps: int = 4) -> None:
    """``opt`` with bf16 states against the reference in fp32 with every state tensor rounded to
    bf16 after every step (what storing it in bf16 does); ``check(where)`` after every step."""
    for step in range(steps):
        set_grads(params, ref_params, step, 0)
        opt.step()
        ref.step()
        with torch.no_grad():
            for q in ref_params:
                for value in ref.state[q].values():
                    value.copy_(value.bfloat16().float())
        check(f"after step {step + 1}")


class NoHostReads(TorchFunctionMode):
    """Fails on anything that reads a tensor's value on the host (a sync on a GPU)."""

    BLOCKED = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.BLOCKED:
            raise AssertionError(f"host read of a tensor value: {func.__name__}")
        return func(*args, **(kwargs or {}))


def bf16_neighbours(exact: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and just above each element of ``exact`` (equal when exact is one)."""
    nearest = exact.bfloat16()
    down = torch.nextafter(nearest, torch.full_like(nearest, -math.inf))
    up = torch.nextafter(nearest, torch.full_like(nearest, math.inf))
    lo = torch.where(nearest.double() <= exact, nearest, down).double()
    hi = torch.where(nearest.double() >= exact, nearest, up).double()
    return lo, hi


def assert_rounded_stochastically(mine: torch.Tensor, fp32: torch.Tensor, what: str = "") -> None:
    """Every element of the bf16 ``mine`` is one of the two bf16 neighbours of ``fp32``, not always
    the nearest one (round-to-nearest would pass the rest), and on average (in ulps) neither is
    favoured: within five standard errors of zero."""
    fp32, mine = fp32.double(), mine.double()
    lo, hi = bf16_neighbours(fp32)
    assert torch.all((mine == lo) | (mine == hi)), what
    assert (mine != fp32.bfloat16().double()).any(), f"{what}: every element rounded to nearest"
    bias = ((mine - fp32) / (hi - lo).clamp_min(1e-30)).mean().item()  # in ulps; unbiased around 0
    assert abs(bias) < 5 * 0.5 / math.sqrt(mine.numel()), (what, bias)


def stochastic_rounding_side_by_side(make, make_ref, device, n: int = 4096) -> None:
    """One step of ``make(params)`` (stochastic rounding on bf16 params) against ``make_ref`` on
    fp32 copies of the same params and grads: ``assert_rounded_stochastically``."""
    init = random_tensors([(n,)], torch.bfloat16, 5, device)
    params, exact = leaves(init), leaves([t.float() for t in init])
    opt, ref = make(params), make_ref(exact)
    grads = random_tensors([(n,)], torch.bfloat16, 6, device)
    params[0].grad, exact[0].grad = grads[0], grads[0].float()
    opt.step()
    ref.step()
    assert_rounded_stochastically(params[0].detach(), exact[0].detach())
