"""Benchmark problems: analytic ones from the papers, and real models on real data."""

from .base import Problem, VectorModel
from .quadratic import Quadratic
from .softmax import SoftmaxRegression

__all__ = ["Problem", "Quadratic", "SoftmaxRegression", "VectorModel"]
