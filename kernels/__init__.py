"""Triton kernels of fused_optim, installed as ``fused_optim.kernels``.

Each algorithm module holds one ``_<algo>_kernel`` and its ``<algo>_step`` launcher; the tables,
jit helpers and launch wrapper they share live in ``_tables``.
"""

from ._tables import INTERPRETED
from .adam import adam_step

__all__ = ["INTERPRETED", "adam_step"]
