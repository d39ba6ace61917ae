"""The ``features`` workload: one AdamW step with a large-model training feature switched on, in
fused_optim (inside its kernel) and in the recipe a torch user would write for the same thing.

Every recipe keeps its data steady across repeated steps, so timing many calls measures the same
work: the loss scale is 1 and the clip threshold is never reached (torch still multiplies every
grad by the clamped coefficient, and fused_optim still applies it in the kernel).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

import fused_optim

ADAMW = {"lr": 1e-3, "weight_decay": 0.01}
HUGE_NORM = 1e30  # a clip threshold no grad norm reaches: the data stays the same step after step


@dataclass(frozen=True)
class Recipe:
    dtype: torch.dtype  # param dtype
    fused_kwargs: dict = field(default_factory=dict)  # fused_optim's extra arguments
    torch_note: str = ""  # how torch's recipe differs in what it computes, when it does
    extra_grad_reads: int = 0  # grad passes of fused_optim beyond the update (the clip's norm)
    others: tuple[str, ...] = ()  # other libraries' optimizers for the same thing, side by side


RECIPES = {
    "AMP": Recipe(torch.float32),
    "clip": Recipe(torch.float32, {}, "", 1),
    "master bf16": Recipe(torch.bfloat16, {"master_weights": True}),
    "bf16 states": Recipe(torch.float32, {"state_dtype": torch.bfloat16}, "torch keeps fp32 states"),
    "stochastic bf16": Recipe(torch.bfloat16, {"stochastic_rounding": True}, "torch rounds to nearest"),
    "capturable": Recipe(torch.float32, {"capturable": True}),
    # params as rows of whole 256-element blocks (``workloads.block_rows``), so every one has 8-bit states
    "int8 states": Recipe(torch.float32, {"state_dtype": torch.int8}, "torch keeps fp32 states", 0,
                          ("torchao AdamW8bit", "bitsandbytes AdamW8bit")),
    "fp8 states": Recipe(torch.float32, {"state_dtype": torch.float8_e4m3fn}, "torch keeps fp32 states", 0,
                         ("torchao AdamWFp8",)),
}  # fmt: skip
OTHERS = {  # (module, class, what it is)
    "torchao AdamW8bit": ("torchao.optim", "AdamW8bit", "torchao: blocks of 256, dynamic map of v, per param"),
    "torchao AdamWFp8": ("torchao.optim", "AdamWFp8", "torchao: blocks of 256, e4m3 of v, per param"),
    "bitsandbytes AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes: blockwise dynamic map, per param"),
}
PROVIDERS = ("fused_optim", "torch fused", "torch foreach")


def step_fn(recipe_name: str, provider: str, params: list[torch.Tensor]):
    """A callable that runs one step of the recipe with ``provider`` on ``params`` (grads set)."""
    recipe = RECIPES[recipe_name]
    device = params[0].device
    if provider in recipe.others:
        module, name, _ = OTHERS[provider]
        return getattr(importlib.import_module(module), name)(params, **ADAMW).step
    if provider == "fused_optim":
        opt = fused_optim.AdamW(params, **ADAMW, **recipe.fused_kwargs)
        if recipe_name == "AMP":
            scale, found = torch.ones((), device=device), torch.zeros((), device=device)
            return lambda: opt.step(grad_scale=scale, found_inf=found)
        if recipe_name == "clip":
            return lambda: (opt.clip_grad_norm_(HUGE_NORM), opt.step())
        return opt.step

    flavour = {"torch fused": {"fused": True}, "torch foreach": {"foreach": True}}[provider]
    if recipe_name == "master bf16":
        # the usual hand-written recipe: fp32 copies of the params, grads copied in, params copied out
        masters = [p.detach().float().requires_grad_() for p in params]
        for m in masters:
            m.grad = torch.empty_like(m)
        opt = torch.optim.AdamW(masters, **ADAMW, **flavour)
        grads, master_grads = [p.grad for p in params], [m.grad for m in masters]
        targets, sources = [p.detach() for p in params], [m.detach() for m in masters]

        def master_step():
            torch._foreach_copy_(master_grads, grads)
            opt.step()
            torch._foreach_copy_(targets, sources)

        return master_step
    capturable = {"capturable": True} if recipe_name == "capturable" else {}
    opt = torch.optim.AdamW(params, **ADAMW, **flavour, **capturable)
    if recipe_name == "AMP":
        found = torch.zeros((), device=device)
        inv_scale = torch.ones((), device=device)
        grads = [p.grad for p in params]
        if provider == "torch fused":  # torch's fused kernels take the scale as GradScaler hands it
            opt.grad_scale, opt.found_inf = inv_scale, found
            return opt.step

        def amp_step():  # GradScaler.unscale_ then its host check of found_inf, as scaler.step does
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv_scale)
            if not found.item():
                opt.step()

        return amp_step
    if recipe_name == "clip":
        return lambda: (torch.nn.utils.clip_grad_norm_(params, HUGE_NORM, foreach=True), opt.step())
    return opt.step


def note(recipe_name: str, provider: str) -> str:
    """How ``provider``'s row differs from fused_optim's in what it computes, or what it is."""
    if provider in OTHERS:
        return OTHERS[provider][2]
    return "" if provider == "fused_optim" else RECIPES[recipe_name].torch_note


def bytes_per_step(recipe_name: str, probe: fused_optim.FusedOptimizer) -> int:
    """What the recipe must move at least: fused_optim's update plus its extra grad passes."""
    recipe = RECIPES[recipe_name]
    grad_bytes = sum(p.numel() * p.element_size() for g in probe.param_groups for p in g["params"])
    return probe.bytes_per_step() + recipe.extra_grad_reads * grad_bytes


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of ``opt.state``'s tensors, a tensor subclass (torchao's 8-bit states) counted by the
    tensors it is made of."""
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                inner = value.__tensor_flatten__()[0] if hasattr(value, "__tensor_flatten__") else None
                parts = [getattr(value, name) for name in inner] if inner else [value]
                total += sum(t.numel() * t.element_size() for t in parts)
    return total
