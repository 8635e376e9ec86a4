"""zoptim: train and fine-tune deep models with forward passes only."""

from . import distributed
from .blackbox import AskTell, OptimizeResult
from .engine.inplace import SeededPerturbation
from .minimizer import minimize
from .optim import AS2P, S2P, STP, ZOSGD, DivergedError, HiZOO, NonFiniteLossWarning, ZerothOrderOptimizer

__version__ = "0.1.0"

__all__ = [
    "AskTell",
    "distributed",
    "OptimizeResult",
    "minimize",
    "AS2P",
    "HiZOO",
    "S2P",
    "STP",
    "ZOSGD",
    "NonFiniteLossWarning",
    "DivergedError",
    "SeededPerturbation",
    "ZerothOrderOptimizer",
]
