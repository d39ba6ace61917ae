"""fused_optim: drop-in torch.optim optimizers whose whole update is one Triton launch per segment."""

from ._base import FusedOptimizer
from .adam import Adam, AdamW

__version__ = "0.1.0"

__all__ = ["Adam", "AdamW", "FusedOptimizer", "__version__"]
