"""The benchmark harness: methods x problems x seeds at equal query budgets, cost ratios, reports.

Modules: :mod:`.methods` (named optimizer recipes), :mod:`.harness` (one resumable run),
:mod:`.search` (Appendix D.1 grid search), :mod:`.cost_ratio` (Appendix D.2), :mod:`.plots`,
:mod:`.report` (summary.md), :mod:`.suites` (quick / paper / ablations / softmax).
"""

from ..cost_ratio import FRACTIONS, cost_ratios, markdown_table, smooth
from .harness import RunSpec, run
from .methods import RECIPES, get_method
from .report import build_report
from .suites import SUITES, run_suite

__all__ = ["FRACTIONS", "RECIPES", "SUITES", "RunSpec", "build_report", "cost_ratios", "get_method", "markdown_table",
           "run", "run_suite", "smooth"]
