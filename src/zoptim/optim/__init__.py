"""The zeroth-order optimizers: one module each, thin over :mod:`zoptim.engine.inplace`."""

from . import registry  # the methods by name
from .as2p import AS2P
from .base import DivergedError, NonFiniteLossWarning, ZerothOrderOptimizer
from .hizoo import HiZOO
from .s2p import S2P
from .stp import STP
from .zosgd import ZOSGD

__all__ = ["AS2P", "DivergedError", "HiZOO", "NonFiniteLossWarning", "S2P", "STP", "ZOSGD", "ZerothOrderOptimizer",
           "registry"]
