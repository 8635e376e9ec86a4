"""The zeroth-order optimizers: one module each, over the engines' contract (:mod:`zoptim.engine`)."""

from . import registry  # the methods by name
from .as2p import AS2P
from .base import ZerothOrderOptimizer
from .hizoo import HiZOO
from .s2p import S2P
from .step import DivergedError, NonFiniteLossWarning
from .stp import STP
from .zosgd import ZOSGD

__all__ = ["AS2P", "DivergedError", "HiZOO", "NonFiniteLossWarning", "S2P", "STP", "ZOSGD", "ZerothOrderOptimizer",
           "registry"]
