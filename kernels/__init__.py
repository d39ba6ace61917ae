"""Triton kernels of fused_optim, installed as ``fused_optim.kernels``.

``_update`` holds the one update kernel every algorithm runs through, and the kernel that
advances device step counts; each algorithm module holds only its math (an ``Algorithm``);
``clip`` the global grad-norm reduction. ``_tables`` builds the launch tables and launches,
``_jit`` and ``_features`` hold the device helpers the kernels share.
"""

from ._jit import INTERPRETED
from ._update import Algorithm, advance, step_table, update_step
from .adadelta import ADADELTA
from .adagrad import ADAGRAD
from .adam import ADAM
from .adamax import ADAMAX
from .ademamix import ADEMAMIX, ADEMAMIX_WARMUP
from .asgd import ASGD
from .lamb import LAMB, LARS
from .lion import LION
from .nadam import NADAM
from .radam import RADAM
from .rmsprop import RMSPROP
from .rprop import RPROP
from .schedulefree import SCHEDULEFREE_ADAMW, SCHEDULEFREE_SWITCH
from .sgd import SGD
from .stableadamw import STABLEADAMW

ALGORITHMS = {
    "adadelta": ADADELTA,
    "adagrad": ADAGRAD,
    "adam": ADAM,
    "ademamix": ADEMAMIX,
    "ademamix_warmup": ADEMAMIX_WARMUP,
    "asgd": ASGD,
    "lamb": LAMB,
    "lars": LARS,
    "lion": LION,
    "adamax": ADAMAX,
    "nadam": NADAM,
    "radam": RADAM,
    "rmsprop": RMSPROP,
    "rprop": RPROP,
    "schedulefree_adamw": SCHEDULEFREE_ADAMW,
    "schedulefree_switch": SCHEDULEFREE_SWITCH,
    "sgd": SGD,
    "stableadamw": STABLEADAMW,
}

__all__ = ["ALGORITHMS", "INTERPRETED", "Algorithm", "advance", "step_table", "update_step"]
