"""Side-by-side harness for optimizers whose reference is a package outside torch.optim (Lion:
lion_pytorch, AdEMAMix: pytorch_optimizer): fused_optim and the reference on identical inputs,
params and every state tensor the reference keeps compared after every step."""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
from torch.overrides import TorchFunctionMode

from parity import SHAPES, TOL, close, leaves, param_arg, random_tensors, set_grads

RUN = TOL[torch.float32][1]


@triton.jit
def _fma_kernel(x_ptr, out_ptr):
    x = tl.load(x_ptr + tl.arange(0, 2))
    tl.store(out_ptr + tl.arange(0, 2), tl.fma(x, x, x * 0.0 - 1.0))


def fma_is_fused() -> bool:
    """Whether ``tl.fma`` rounds once where the kernels run: always on a GPU; through the
    interpreter from some Triton after 3.3 (3.3's multiplies, then adds). (1 + 2^-12)^2 - 1 tells."""
    if torch.cuda.is_available():
        return True
    x, out = torch.full((2,), 1.0 + 2.0**-12), torch.empty(2)
    _fma_kernel[(1,)](x, out)
    return out[0].item() == 2.0**-11 + 2.0**-24


# Bit for bit where the kernels' fused multiply-adds are fused (a GPU, Triton 3.9's interpreter);
# within the fp32 tolerance under an interpreter that rounds them twice (Triton 3.3's).
FUSED_FMA = fma_is_fused()
EXACT = {"rtol": 0.0, "atol": 0.0} if FUSED_FMA else RUN
BF16_STATES = "bf16 states equal the reference's rounded ones only with the same fp32 values: fused fma"


def compare(opt, ref, params, ref_params, tol, where: str, ours_only=()) -> None:
    """Params and every state tensor ``ref`` keeps equal ours; ours keeps exactly those keys plus
    ``ours_only`` (AdEMAMix's per-param ``step``)."""
    for i, (p, q) in enumerate(zip(params, ref_params)):
        close(p, q, tol, f"param {i} {where}")
        mine, theirs = opt.state.get(p, {}), ref.state.get(q, {})
        expected = set(theirs) | (set(ours_only) if theirs else set())
        assert set(mine) == expected, f"param {i} {where}: state keys {sorted(mine)} vs {sorted(expected)}"
        for key, value in theirs.items():
            close(mine[key].to(value.dtype), value, tol, f"state {key!r} of param {i} {where}")


def side_by_side(
    ours_cls,
    ref_cls,
    kwargs: dict,
    *,
    device,
    ref_kwargs: dict | None = None,
    tol=EXACT,
    first_tol=None,
    shapes=SHAPES,
    dtype=torch.float32,
    steps: int = 6,
    grad_none=None,
    groups=None,
    scheduler=None,
    ours_only=(),
    check=None,
    seed: int = 0,
):
    """Train both on the same grads for ``steps`` steps, comparing after each (``first_tol`` after
    the first, ``tol`` later); ``check(opt, ref, params, ref_params, step)`` adds checks."""
    init = random_tensors(shapes, dtype, seed, device)
    params, ref_params = leaves(init), leaves(init)
    opt = ours_cls(param_arg(params, groups), **kwargs)
    ref = ref_cls(param_arg(ref_params, groups), **(kwargs if ref_kwargs is None else ref_kwargs))
    scheds = (scheduler(opt), scheduler(ref)) if scheduler else ()
    for step in range(steps):
        set_grads(params, ref_params, step, seed, grad_none)
        opt.step()
        ref.step()
        for sched in scheds:
            sched.step()
        where = f"after step {step + 1}"
        compare(opt, ref, params, ref_params, (first_tol or tol) if step == 0 else tol, where, ours_only)
        if check is not None:
            check(opt, ref, params, ref_params, step)
    return opt, ref, params, ref_params


def grad_scaler_side_by_side(opt, ref, params, ref_params, shapes, device, check, steps: int = 6) -> None:
    """Both optimizers stepped through their own ``GradScaler`` on the same scaled losses, with an
    inf (step 2) and a NaN (step 5) in one grad: the scales must agree, and ``check(where)`` runs
    after every step."""
    scalers = [torch.amp.GradScaler(device.type, init_scale=2.0**12, growth_interval=3) for _ in range(2)]
    for step in range(steps):
        weights = random_tensors(shapes, torch.float32, 50 + step, device)
        if step in (1, 4):
            weights[1 if len(weights) > 1 else 0].view(-1)[7] = float("inf") if step == 1 else float("nan")
        for o, ps, scaler in ((opt, params, scalers[0]), (ref, ref_params, scalers[1])):
            scaler.scale(sum((p * w).sum() for p, w in zip(ps, weights))).backward()
            scaler.step(o)
            scaler.update()
            o.zero_grad()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        check(f"after step {step + 1}")


def grad_scale_arguments_side_by_side(opt, ref, params, ref_params, device, check, steps: int = 3) -> None:
    """``step(grad_scale=, found_inf=)`` on grads scaled by 1024, the second step flagged as inf,
    against the reference stepped on the unscaled grads and not at all on that step; ``check(where)``
    after every step."""
    scale = torch.tensor(1024.0, device=device)
    for step in range(steps):
        set_grads(params, ref_params, step, 0)
        for p in params:
            p.grad.mul_(scale)
        skip = step == 1
        opt.step(grad_scale=scale, found_inf=torch.tensor(float(skip), device=device))
        if not skip:
            ref.step()
        check(f"after step {step + 1}")


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


@contextlib.contextmanager
def correctly_rounded_sqrt():
    """``Tensor.sqrt`` correctly rounded (through float64) while it lasts. torch's CPU sqrt may be
    one ulp off; the kernels' is IEEE. With it, the reference's single-tensor arithmetic is ours."""
    original = torch.Tensor.sqrt
    torch.Tensor.sqrt = lambda x: original(x.double()).to(x.dtype) if x.dtype == torch.float32 else original(x)
    try:
        yield
    finally:
        torch.Tensor.sqrt = original


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
