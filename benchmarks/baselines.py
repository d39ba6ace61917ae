"""What the optimizers beyond torch.optim are timed against: each one's reference implementation,
in every variant it offers, built with the same arguments as fused_optim's class, and the one that
torch.compile compiles (the ``torch.compile`` row's note names it):

- LAMB, LARS: ``EagerLAMB``, ``EagerLARS`` below, ``eager for-loop (ours)`` (no installed package
  has them); torch.compile of its step.
- Lion: ``lion_pytorch.Lion`` (for-loop), ``lion_pytorch.foreach.Lion``, and ``use_triton=True``
  (its Triton kernel, CUDA only); torch.compile of the for-loop's step.
- AdEMAMix: ``pytorch_optimizer.AdEMAMix`` with ``foreach=False`` and ``foreach=True``;
  torch.compile as ``pytorch_optimizer.create_optimizer(compile=True)`` applies it
  (``_compile_foreach``: the foreach update compiled, its changing scalars as device tensors).
- StableAdamW: ``optimi.StableAdamW`` with ``foreach=False``, ``foreach=True`` and ``triton=True``
  (CUDA only); torch.compile of the for-loop's step.
- ScheduleFreeAdamW: ``schedulefree.AdamWScheduleFree`` with ``foreach=True`` (its default) and
  ``foreach=False``; torch.compile of the foreach step.

A variant that cannot run here (a package not installed, a CUDA-only path on CPU) raises, and the
runner records why in the row's note; so does a compiled step that torch.compile compiles again at
its third call, when the state exists: a step count, or a number derived from it, kept as a Python
number (schedulefree's ``k`` and ``weight_sum``; optimi's ``.item()`` calls, which also split its
step into frames compiled again) is a guard that fails at every step, and such a row would time
compiles, or dynamo's fallback once its recompile limit is reached, not a compiled step. Optimizers
with ``train()``/``eval()`` (Schedule-Free) are put in train mode before their first step, ours and
the reference alike.
"""

from __future__ import annotations

import importlib
import re
import warnings

import torch

TRAIN_MODE = {"ScheduleFreeAdamW"}  # step() raises until train() is called, in fused_optim and the reference


class EagerLAMB(torch.optim.Optimizer):
    """LAMB (timm's ``Lamb`` with ``always_adapt=True``, as ``fused_optim.LAMB``'s docstring writes it):
    a for-loop of torch ops in the params' dtype, written for these benchmarks (ours, not a package's).
    The step count is a float64 tensor on the params' device (the bias corrections in float64, as
    fused_optim's), so that torch.compile does not recompile at every step; the trust ratio stays on
    the device (no sync)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if "step" not in group:
                group["step"] = torch.zeros((), dtype=torch.float64, device=group["params"][0].device)
            t = group["step"].add_(1)
            beta1, beta2 = group["betas"]
            bias_correction1, bias_correction2_sqrt = 1 - beta1**t, (1 - beta2**t).sqrt()
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(p.grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
                update = (exp_avg / bias_correction1).div_(denom).add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
                p.add_(update.mul_(ratio), alpha=-group["lr"])


class EagerLARS(torch.optim.Optimizer):
    """LARS with momentum, as ``fused_optim.LARS``'s docstring writes it: a for-loop of torch ops in
    the params' dtype, written for these benchmarks (ours, not a package's)."""

    def __init__(self, params, lr=1e-3, momentum=0.9, weight_decay=0.0, trust_coefficient=1e-3, eps=1e-8):
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, {**defaults, "trust_coefficient": trust_coefficient, "eps": eps})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            wd = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                p_norm, g_norm = p.norm(), p.grad.norm()
                ratio = group["trust_coefficient"] * p_norm / (g_norm + wd * p_norm + group["eps"])
                ratio = torch.where((p_norm > 0) & (g_norm > 0), ratio, 1.0)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad.add(p, alpha=wd).mul_(ratio))
                p.add_(buf, alpha=-group["lr"])


def _cuda_only(params, what: str) -> None:
    if params[0].device.type != "cuda":
        raise NotImplementedError(f"{what} runs on CUDA only")


def _package(module: str, pip: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise NotImplementedError(f"{module} is not installed (pip install {pip})") from err


def _lion(params, kwargs, variant):
    if variant == "foreach":
        return _package("lion_pytorch.foreach", "lion-pytorch").Lion(params, **kwargs)
    if variant == "triton":
        _cuda_only(params, "lion_pytorch's Triton kernel")
    return _package("lion_pytorch", "lion-pytorch").Lion(params, use_triton=variant == "triton", **kwargs)


def _ademamix(params, kwargs, variant):
    return _package("pytorch_optimizer", "pytorch_optimizer").AdEMAMix(params, foreach=variant == "foreach", **kwargs)


def _stableadamw(params, kwargs, variant):
    if variant == "triton":
        _cuda_only(params, "optimi's Triton path")
    optimi = _package("optimi", "torch-optimi")
    with warnings.catch_warnings():  # optimi deprecates foreach in favour of its Triton path
        warnings.filterwarnings("ignore", message="Parameter `foreach` is deprecated")
        return optimi.StableAdamW(params, foreach=variant == "foreach", triton=variant == "triton", **kwargs)


def _schedulefree(params, kwargs, variant):
    return _package("schedulefree", "schedulefree").AdamWScheduleFree(params, foreach=variant == "foreach", **kwargs)


# algorithm -> (its reference's variants as (provider label, variant), the variant torch.compile compiles)
REFERENCES: dict[str, tuple[list[tuple[str, str]], str]] = {
    "LAMB": ([("eager for-loop (ours)", "for-loop")], "for-loop"),
    "LARS": ([("eager for-loop (ours)", "for-loop")], "for-loop"),
    "Lion": (
        [("lion_pytorch", "for-loop"), ("lion_pytorch foreach", "foreach"), ("lion_pytorch triton", "triton")],
        "for-loop",
    ),
    "AdEMAMix": ([("pytorch_optimizer for-loop", "for-loop"), ("pytorch_optimizer foreach", "foreach")], "foreach"),
    "StableAdamW": (
        [("optimi for-loop", "for-loop"), ("optimi foreach", "foreach"), ("optimi triton", "triton")],
        "for-loop",
    ),
    "ScheduleFreeAdamW": ([("schedulefree foreach", "foreach"), ("schedulefree for-loop", "for-loop")], "foreach"),
}
_BUILDERS = {
    "LAMB": lambda params, kwargs, variant: EagerLAMB(params, **kwargs),
    "LARS": lambda params, kwargs, variant: EagerLARS(params, **kwargs),
    "Lion": _lion,
    "AdEMAMix": _ademamix,
    "StableAdamW": _stableadamw,
    "ScheduleFreeAdamW": _schedulefree,
}


def providers(name: str) -> list[str]:
    """The provider labels of ``name``'s reference variants, in table order."""
    return [label for label, _ in REFERENCES[name][0]]


def for_loop(name: str) -> str:
    """The provider label of ``name``'s reference for-loop (the parity table's yardstick)."""
    return next(label for label, variant in REFERENCES[name][0] if variant == "for-loop")


def ready(name: str, opt):
    """``opt`` ready to step: Schedule-Free optimizers in train mode."""
    if name in TRAIN_MODE:
        opt.train()
    return opt


def build(name: str, params, kwargs: dict, provider: str | None = None):
    """The reference optimizer of ``name`` for ``provider`` (a label of ``providers(name)``; None:
    the variant torch.compile compiles), ready to step, or raise ``NotImplementedError`` saying why
    it cannot run here."""
    variants, compiled = REFERENCES[name]
    variant = compiled if provider is None else dict(variants)[provider]
    return ready(name, _BUILDERS[name](params, dict(kwargs), variant))


def compiled_label(name: str) -> str:
    """The provider label of the variant torch.compile compiles."""
    variants, compiled = REFERENCES[name]
    label = next(label for label, variant in variants if variant == compiled)
    return label + ", its _compile_foreach()" if name == "AdEMAMix" else label


def compiled(name: str, params, kwargs: dict):
    """The step of ``name``'s reference under torch.compile (see the module docstring), not yet called."""
    opt = build(name, params, kwargs)
    if name == "AdEMAMix":  # pytorch_optimizer's own way: the foreach update compiled, its scalars as tensors
        opt._compile_foreach()
        return opt.step

    @torch.compile(fullgraph=False)
    def compiled_step():
        opt.step()

    return compiled_step


def recompiles(step) -> str | None:
    """None if one more call of a compiled ``step`` runs without compiling again, else the guard that
    failed (the call then does not run: torch.compile raises first)."""
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            step()
    except RuntimeError as err:
        if "fail_on_recompile" not in str(err):
            raise
        guard = re.search(r"- \d+/\d+: (.*?)\s+#", str(err))
        return guard.group(1).replace("G['opt'].", "").replace("L['opt'].", "") if guard else "a guard failed"
    return None
