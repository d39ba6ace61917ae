"""LAMB and LARS: layer-wise trust ratios for large-batch training (no torch.optim counterpart)."""

from __future__ import annotations

from typing import ClassVar

import torch

from ._base import FusedOptimizer
from ._segments import as_float
from .kernels.lamb import LAMB as _LAMB
from .kernels.lamb import LARS as _LARS

__all__ = ["LAMB", "LARS"]


def _check(name: str, value, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} ({what})")


def _check_lr(lr) -> None:
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    _check("learning rate", as_float(lr), as_float(lr) >= 0.0, "must be >= 0")


def _sums_pass_bytes(optimizer: FusedOptimizer, states: tuple[str, ...]) -> int:
    """Bytes the first launch (the per-tensor sums) reads, nothing written but the sums: the param
    (or, with ``master_weights``, its fp32 master copy), the grad and ``states``; the compiler drops
    its loads of the other states (the sm_90 PTX of that launch, fp32, Triton 3.9: 128-bit loads of
    4 arrays for LAMB, of 2 for LARS)."""
    total = 0
    for cache in optimizer._caches.values():
        for seg in cache.segments.values():
            n = int(seg.numels.sum())
            param = seg.flat["master_param"].dtype if seg.master else seg.dtype
            total += n * (param.itemsize + seg.dtype.itemsize)
            total += sum(seg.key_numel(k) * seg.flat[k].dtype.itemsize for k in states if k in seg.flat)
    return total


class LAMB(FusedOptimizer):
    r"""LAMB (You et al., 2019), as timm's ``Lamb`` with ``always_adapt=True``, in two Triton
    launches per parameter segment (the per-tensor norms, then the update).

    Per element, with :math:`g` the gradient (negated if ``maximize``), at step :math:`t`:

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g, \quad v \leftarrow \beta_2 v + (1-\beta_2) g^2, \quad
        u = \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon} + \lambda\theta, \\
        \theta \leftarrow \theta - \gamma\, r\, u, \qquad
        r = \frac{\lVert\theta\rVert}{\lVert u\rVert} \text{ per tensor (1 where either norm is 0)}

    Args:
        lr (float, Tensor): learning rate :math:`\gamma` (default: 1e-3).
        betas (tuple[float, float]): :math:`(\beta_1, \beta_2)` (default: (0.9, 0.999)).
        eps (float): term added to the denominator (default: 1e-6).
        weight_decay (float): :math:`\lambda`, added to the update before the trust ratio (default: 0).
        maximize (bool): maximize the objective (default: False).
        capturable (bool): step counts on the device (CUDA graphs), as for the torch.optim classes.
        params, and fused_optim's own options: see :class:`~fused_optim.FusedOptimizer`.
    """

    _torch_cls = None
    _algorithm = _LAMB

    def __init__(
        self, params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
        weight_decay: float = 0.0, *, maximize: bool = False, capturable: bool = False, **extensions,
    ) -> None:  # fmt: skip
        super().__init__(params, locals())

    def _check_arguments(self, defaults: dict) -> None:
        _check_lr(defaults["lr"])
        for i, beta in enumerate(defaults["betas"]):
            _check(f"beta parameter at index {i}", beta, 0.0 <= beta < 1.0, "must be in [0, 1)")
        _check("epsilon value", defaults["eps"], defaults["eps"] >= 0.0, "must be >= 0")
        _check("weight_decay value", defaults["weight_decay"], defaults["weight_decay"] >= 0.0, "must be >= 0")

    def _weight_decay(self, group) -> tuple[float, bool]:
        return 0.0, False  # added to the update inside the math, before the trust ratio

    def _hyper(self, group) -> tuple[float, ...]:
        beta1, beta2 = (as_float(b) for b in group["betas"])
        return (1.0 - beta1, beta2, 1.0 - beta2, as_float(group["eps"]), as_float(group["weight_decay"]))

    def _step_scalars(self, group, scalars: dict[str, float]) -> tuple[float, float]:
        step = scalars["step"]
        beta1, beta2 = (as_float(b) for b in group["betas"])
        return 1.0 - beta1**step, (1.0 - beta2**step) ** 0.5  # bias_correction1, sqrt(bias_correction2)

    def bytes_per_step(self) -> int:
        """As ``FusedOptimizer.bytes_per_step`` for the update launch, plus the sums launch, which
        reads the param, the grad, ``exp_avg`` and ``exp_avg_sq`` (the update and its norm need the
        new moments): 44 bytes per element for fp32 params (28 + 16)."""
        return super().bytes_per_step() + _sums_pass_bytes(self, ("exp_avg", "exp_avg_sq"))


class LARS(FusedOptimizer):
    r"""LARS (You et al., 2017) with momentum, in two Triton launches per parameter segment (the
    per-tensor norms, then the update).

    Per element, with :math:`g` the gradient (negated if ``maximize``):

    .. math::
        r = \frac{\eta\,\lVert\theta\rVert}{\lVert g\rVert + \lambda\lVert\theta\rVert + \epsilon}
            \text{ per tensor (1 where } \lVert\theta\rVert \text{ or } \lVert g\rVert \text{ is 0)}, \\
        b \leftarrow \mu b + r (g + \lambda\theta), \qquad \theta \leftarrow \theta - \gamma b

    Args:
        lr (float, Tensor): learning rate :math:`\gamma` (default: 1e-3).
        momentum (float): :math:`\mu` (default: 0.9).
        weight_decay (float): :math:`\lambda` (default: 0).
        trust_coefficient (float): :math:`\eta` (default: 1e-3).
        eps (float): term added to the denominator of the trust ratio (default: 1e-8).
        maximize (bool): maximize the objective (default: False).
        params, and fused_optim's own options: see :class:`~fused_optim.FusedOptimizer`.
    """

    _torch_cls = None
    _algorithm = _LARS
    _scalar_state: ClassVar[dict[str, float]] = {}  # no step count

    def __init__(
        self, params, lr: float | torch.Tensor = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3, eps: float = 1e-8, *, maximize: bool = False, **extensions,
    ) -> None:  # fmt: skip
        super().__init__(params, locals())

    def _check_arguments(self, defaults: dict) -> None:
        _check_lr(defaults["lr"])
        _check("momentum value", defaults["momentum"], defaults["momentum"] >= 0.0, "must be >= 0")
        _check("weight_decay value", defaults["weight_decay"], defaults["weight_decay"] >= 0.0, "must be >= 0")
        trust = defaults["trust_coefficient"]
        _check("trust_coefficient value", trust, trust > 0.0, "must be > 0")
        _check("epsilon value", defaults["eps"], defaults["eps"] >= 0.0, "must be >= 0")

    def _weight_decay(self, group) -> tuple[float, bool]:
        return 0.0, False  # inside the math: in the trust ratio and the scaled step

    def _hyper(self, group) -> tuple[float, ...]:
        keys = ("momentum", "weight_decay", "trust_coefficient", "eps")
        return tuple(as_float(group[k]) for k in keys)

    def bytes_per_step(self) -> int:
        """As ``FusedOptimizer.bytes_per_step`` for the update launch, plus the sums launch, which
        reads the param and the grad (their norms): 28 bytes per element for fp32 params (20 + 8)."""
        return super().bytes_per_step() + _sums_pass_bytes(self, ())
