"""Side-by-side harness for optimizers whose reference is a package outside torch.optim (Lion:
lion_pytorch, AdEMAMix: pytorch_optimizer): fused_optim and the reference on identical inputs,
params and every state tensor the reference keeps compared after every step."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

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
