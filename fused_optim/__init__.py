"""fused_optim: drop-in torch.optim optimizers whose whole update is one Triton launch per segment."""

import torch as _torch

from ._base import FusedOptimizer
from .adadelta import Adadelta
from .adafactor import Adafactor
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .adamax import Adamax
from .ademamix import AdEMAMix
from .asgd import ASGD
from .lamb import LAMB, LARS
from .lion import Lion
from .nadam import NAdam
from .radam import RAdam
from .rmsprop import RMSprop
from .rprop import Rprop
from .schedulefree import ScheduleFreeAdamW
from .sgd import SGD
from .stableadamw import StableAdamW

__version__ = "0.1.0"

__all__ = [
    "ASGD",
    "LAMB",
    "LARS",
    "SGD",
    "AdEMAMix",
    "Adadelta",
    "Adafactor",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "FusedOptimizer",
    "Lion",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Rprop",
    "ScheduleFreeAdamW",
    "StableAdamW",
    "__version__",
]
if hasattr(_torch.optim, "Muon"):  # torch >= 2.9
    from .muon import Muon

    __all__ += ["Muon"]
