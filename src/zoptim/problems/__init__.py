"""Benchmark problems: analytic ones from the papers, and real models on real data.

Heavy problems (EfficientNet-Lite0 on Fashion-MNIST, language models) import their
dependencies lazily; build any problem by name with :func:`get_problem`.
"""

from .base import Problem, VectorModel
from .digits import DigitsMLP
from .hyperbolic import HyperbolicRegression
from .quadratic import Quadratic
from .registry import PROBLEMS, get_problem
from .relaxed import RelaxedSmooth
from .softmax import SoftmaxRegression

__all__ = [
    "PROBLEMS",
    "DigitsMLP",
    "HyperbolicRegression",
    "Problem",
    "Quadratic",
    "RelaxedSmooth",
    "SoftmaxRegression",
    "VectorModel",
    "get_problem",
]
