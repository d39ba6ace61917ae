"""Schedule-Free AdamW: the update in one launch per segment, ``train()``/``eval()`` one launch each."""

from __future__ import annotations

import math
import numbers
from typing import ClassVar

import numpy as np
import torch

from . import _dtensor
from ._base import FusedOptimizer
from ._fallback import uses_triton
from ._segments import COMPLEX_DTYPES, as_float
from ._state import TrackedState
from .kernels import update_step
from .kernels._features import Features
from .kernels._tables import block_size, build_tables
from .kernels.schedulefree import SCHEDULEFREE_ADAMW, SCHEDULEFREE_SWITCH

__all__ = ["ScheduleFreeAdamW"]

# the reference's message (it raises a bare Exception; RuntimeError is one)
_NOT_IN_TRAIN_MODE = (
    "Optimizer was not in train mode when step is called. Please insert .train() and .eval() calls on the "
    "optimizer. See documentation for details."
)


def _real(value) -> float | None:
    """``value`` as a float when it is a real number (or a 1-element real tensor), else None."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or not value.is_floating_point():
            return None
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


class ScheduleFreeAdamW(FusedOptimizer):
    r"""Schedule-Free AdamW (Defazio et al., 2024), with the whole update in one Triton launch per
    parameter segment.

    Drop-in for ``schedulefree.AdamWScheduleFree`` (same arguments, defaults, per-group entries
    ``k``, ``train_mode``, ``weight_sum``, ``lr_max``, ``scheduled_lr``, state ``z`` and
    ``exp_avg_sq``, and ``state_dict``). The param holds :math:`y` in train mode and :math:`x` in
    eval mode; :math:`z` is the base sequence. Per step :math:`t = k + 1` of a group, on the host
    as the reference computes them: :math:`\gamma_t = \gamma \min(1, t / \text{warmup})`,
    :math:`\gamma_{\max} = \max_{s \le t} \gamma_s`, :math:`w_t = t^r \gamma_{\max}^{p}`,
    :math:`c_t = w_t / \sum_{s \le t} w_s`; then per element, with :math:`g` the gradient:

    .. math::
        v &\leftarrow \beta_2 v + (1-\beta_2) g^2, \qquad
            u = \frac{g}{\sqrt{v / (1 - \beta_2^t)} + \epsilon} + \lambda y \\
        y &\leftarrow (1 - c_t) y + c_t z + \gamma_t (\beta_1 (1 - c_t) - 1) u, \qquad
            z \leftarrow z - \gamma_t u

    ``eval()`` sets each param to :math:`x = y + (1 - 1/\beta_1)(z - y)`, ``train()`` back to
    :math:`y = x + (1 - \beta_1)(z - x)` (each one launch per segment; with ``master_weights`` the
    fp32 master copy switches too). ``step()`` raises in eval mode, as the reference does; call
    ``train()`` before training and ``eval()`` before evaluating or saving.

    Args:
        lr (float, Tensor): learning rate :math:`\gamma` (default: 0.0025).
        betas (tuple[float, float]): :math:`(\beta_1, \beta_2)` (default: (0.9, 0.999));
            :math:`0 < \beta_1 < 1` (``eval()`` divides by it), :math:`0 \le \beta_2 < 1`.
        eps (float): :math:`\epsilon` (default: 1e-8).
        weight_decay (float): :math:`\lambda`, added to the normalized grad at :math:`y` (default: 0).
        warmup_steps (int): linear warmup of the lr over this many steps (default: 0).
        r (float): polynomial weighting power :math:`r` of the average (default: 0).
        weight_lr_power (float): :math:`p`, the average weights :math:`\gamma_{\max}^p` (default: 2).
        foreach (bool): accepted for compatibility; the update is always fused.
        params, and fused_optim's own options: see :class:`~fused_optim.FusedOptimizer`.
    """

    _torch_cls = None  # beyond torch.optim: checks its own arguments
    _algorithm = SCHEDULEFREE_ADAMW
    _scalar_state: ClassVar[dict[str, float]] = {}  # per-group counters only (``k``), as the reference

    def __init__(
        self, params, lr: float | torch.Tensor = 0.0025, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 0, warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0,
        foreach: bool | None = hasattr(torch, "_foreach_mul_"), **extensions,
    ) -> None:  # fmt: skip
        if extensions.pop("capturable", False):
            raise NotImplementedError(
                "fused_optim.ScheduleFreeAdamW does not implement capturable=True: its per-group scalars "
                "(k, weight_sum, lr_max and the average weight they give) are host values, as in the reference"
            )
        super().__init__(params, locals())

    # --- arguments and group entries ------------------------------------------------------------
    def _normalize(self, defaults: dict) -> dict:
        # the reference's defaults, in its order: the per-group counters start here
        keys = ("lr", "betas", "eps", "r", "k", "warmup_steps", "train_mode", "weight_sum", "lr_max", "scheduled_lr")
        initial = {"k": 0, "train_mode": False, "weight_sum": 0.0, "lr_max": -1.0, "scheduled_lr": 0.0}
        ordered = {key: initial[key] if key in initial else defaults[key] for key in keys}
        return {**ordered, "weight_lr_power": defaults["weight_lr_power"], **defaults}

    def _check_arguments(self, defaults: dict) -> None:
        lr, eps = _real(defaults["lr"]), _real(defaults["eps"])
        if isinstance(defaults["lr"], torch.Tensor) and defaults["lr"].numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr is None or not 0.0 <= lr < math.inf:
            raise ValueError(f"Invalid learning rate: {defaults['lr']} (a finite number >= 0)")
        if eps is None or not 0.0 <= eps < math.inf:
            raise ValueError(f"Invalid epsilon value: {defaults['eps']} (a finite number >= 0)")
        betas = defaults["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (a pair (beta1, beta2))")
        beta1, beta2 = (_real(b) for b in betas)
        if beta1 is None or not 0.0 < beta1 < 1.0:
            raise ValueError(
                f"Invalid beta parameter at index 0: {betas[0]} (schedule-free needs 0 < beta1 < 1: eval() "
                "moves the params by 1 - 1/beta1)"
            )
        if beta2 is None or not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]} (0 <= beta2 < 1)")
        weight_decay = _real(defaults["weight_decay"])
        if weight_decay is None or not 0.0 <= weight_decay < math.inf:
            raise ValueError(f"Invalid weight_decay value: {defaults['weight_decay']} (a finite number >= 0)")
        warmup = defaults["warmup_steps"]
        if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup < 0:
            raise ValueError(f"Invalid warmup_steps value: {warmup!r} (an int >= 0)")
        for key in ("r", "weight_lr_power"):
            value = _real(defaults[key])
            if value is None or not 0.0 <= value < math.inf:
                raise ValueError(f"Invalid {key} value: {defaults[key]!r} (a finite number >= 0)")

    def add_param_group(self, param_group: dict) -> None:
        # the reference checks nothing; here every group's own values are checked like the constructor's
        self._check_arguments({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)

    def _validate(self, index: int, group, grads) -> None:
        for i, p in enumerate(group["params"]):
            if p.dtype in COMPLEX_DTYPES:
                raise NotImplementedError(
                    f"fused_optim.ScheduleFreeAdamW: parameter {i} of param group {index} is {p.dtype}; complex "
                    "params are not supported (the reference's arithmetic on them is complex, not per real part)"
                )
        super()._validate(index, group, grads)

    # --- the kernels' inputs ----------------------------------------------------------------------
    def _tensor_state_keys(self, group) -> tuple[str, ...]:
        return ("z", "exp_avg_sq")

    def _init_region(self, group, key: str, region: torch.Tensor, param: torch.Tensor) -> None:
        if key == "z":
            region.copy_(_dtensor.real(param))  # torch.clone(p): z starts at the param
        else:
            region.zero_()

    def _hyper(self, group) -> tuple[float, ...]:
        beta2 = group["betas"][1]
        return (as_float(beta2), as_float(1 - beta2), as_float(group["eps"]), as_float(group["weight_decay"]))

    def _options(self, group) -> tuple[bool, ...]:
        return (bool(group["weight_decay"] != 0),)  # the reference adds the decay only when nonzero

    def _weight_decay(self, group) -> tuple[float, bool]:
        return 0.0, False  # added by the math to the normalized grad, not to the grad by the skeleton

    def _host_step_scalars(self, group, launch, lr: float, weight_decay: float, decoupled: bool):
        return self._group_scalars[id(group)]  # computed once per group and step, in step()

    @staticmethod
    def _advance_group(group) -> tuple[tuple[float, ...], dict]:
        """The step scalars of this step and the group's new entries, computed as the reference
        does (Python floats, or tensors where ``lr`` is one); nothing is written yet."""
        beta1, beta2 = group["betas"]
        k, warmup_steps = group["k"], group["warmup_steps"]
        sched = (k + 1) / warmup_steps if k < warmup_steps else 1.0
        bias_correction2 = 1 - beta2 ** (k + 1)
        lr = group["lr"] * sched
        lr_max = max(lr, group["lr_max"])
        weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
        weight_sum = group["weight_sum"] + weight
        try:
            ckp1 = weight / weight_sum
        except ZeroDivisionError:
            ckp1 = 0
        scalars = (bias_correction2, ckp1, lr * (beta1 * (1 - ckp1) - 1))
        entries = {"scheduled_lr": lr, "lr_max": lr_max, "weight_sum": weight_sum, "k": k + 1}
        return (*map(as_float, scalars), -as_float(lr)), entries

    # --- step, train, eval --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None):
        """Perform a single optimization step (in train mode; raises ``RuntimeError`` in eval mode).

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
            grad_scale (Tensor, optional): AMP loss scale: grads are divided by it inside the kernels.
            found_inf (Tensor, optional): AMP: when nonzero the step is skipped, group counters included
                (read on the host: the counters are host values).
        """
        if not self.param_groups[0]["train_mode"]:
            raise RuntimeError(_NOT_IN_TRAIN_MODE)
        # k advances with or without grads
        return self._step_with_group_counters(closure, grad_scale, found_inf, self._advance_group, dict.update)

    @torch.no_grad()
    def eval(self) -> None:
        """Set every param of the groups in train mode to x (``p.lerp_(z, 1 - 1/beta1)``)."""
        self._switch(train=False)

    @torch.no_grad()
    def train(self) -> None:
        """Set every param of the groups in eval mode to y (``p.lerp_(z, 1 - beta1)``)."""
        self._switch(train=True)

    def _switch(self, train: bool) -> None:
        self._lay_out()
        for index, group in enumerate(self.param_groups):
            if bool(group["train_mode"]) == train:
                continue
            beta1 = group["betas"][0]
            weight = as_float(1 - beta1 if train else 1 - 1 / beta1)
            cache = self._caches.get(index)
            if cache is not None and cache.group is group:  # the params with state ('z'), by segment
                for seg in cache.segments.values():
                    self._switch_segment(seg, weight)
            group["train_mode"] = train
        self._switches = getattr(self, "_switches", 0) + 1

    def _lay_out(self) -> None:
        """Segments over the state as it stands (after a load, a deepcopy, a replaced state entry)."""
        if not isinstance(self.state, TrackedState) or self.state._tracker is not self._tracker:
            self._reset_engine()
        if self._tracker.dirty:
            for index, group in enumerate(self.param_groups):  # checked before anything changes
                for i, p in enumerate(group["params"]):
                    if self.state.get(p):
                        self._check_state(self.state[p], p, group, f"parameter {i} of param group {index}")
            for index, group in enumerate(self.param_groups):
                self._layout(index, group, None)
            self._tracker.dirty = False

    def _switch_segment(self, seg, weight: float) -> None:
        """``p.lerp_(z, weight)`` for every member of a segment: one launch (its master copy too)."""
        if not uses_triton(seg.device):  # torch's lerp where the kernels do not run
            for i, p in enumerate(seg.members):
                z, target = seg.region(i, "z"), seg.region(i, "master_param") if seg.master else _dtensor.real(p)
                target.lerp_(z.to(target.dtype), weight)
                if seg.master:
                    _dtensor.real(p).copy_(target)
            return
        n = len(seg.members)
        addrs, staged = np.empty(n, dtype=np.int64), []
        for i, p in enumerate(seg.members):
            real = _dtensor.real(p)
            if tuple(real.stride()) == seg.strides[i]:
                addrs[i] = real.data_ptr()
            else:  # not laid out like its state region: through a copy that is
                buf = torch.empty_strided(seg.shapes[i], seg.strides[i], dtype=seg.dtype, device=seg.device)
                staged.append((real, buf.copy_(real)))
                addrs[i] = buf.data_ptr()
        # no grad to read: the grad column points at the param, which the math never reads as one
        tables = build_tables(
            addrs, addrs, seg.offsets, seg.numels, np.zeros(n, dtype=np.int64), np.arange(n, dtype=np.int64),
            block_size(self._num_warps, seg.flat_itemsize), seg.device, self._blocks_per_program,
        )  # fmt: skip
        seed = seg.seed + 7919 * self._step_count + ((getattr(self, "_switches", 0) + 1) << 32)  # other bits than steps
        features = Features(master=seg.flat.get("master_param"), stochastic=seg.stochastic, seed=seed)
        update_step(
            SCHEDULEFREE_SWITCH, tables, {"z": seg.flat["z"]}, param_dtype=seg.dtype, lr=0.0, hyper=(),
            step_scalars=(weight,), features=features, num_warps=self._num_warps,
        )  # fmt: skip
        for real, buf in staged:
            real.copy_(buf)
