"""Triton kernels of fused_optim, installed as ``fused_optim.kernels``.

Each algorithm module holds one ``_<algo>_kernel`` and its ``<algo>_step`` launcher; the tables,
jit helpers and launch wrapper they share live in ``_tables``.
"""

from ._tables import INTERPRETED
from .adadelta import adadelta_step
from .adagrad import adagrad_step
from .adam import adam_step
from .adamax import adamax_step
from .nadam import nadam_step
from .radam import radam_step
from .rmsprop import rmsprop_step
from .sgd import sgd_step

__all__ = [
    "INTERPRETED",
    "adadelta_step",
    "adagrad_step",
    "adam_step",
    "adamax_step",
    "nadam_step",
    "radam_step",
    "rmsprop_step",
    "sgd_step",
]
