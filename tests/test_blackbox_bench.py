"""The black-box comparison suite: equal budgets, missing peers reported, a table and plots."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from zoptim.bench import blackbox
from zoptim.problems.blackbox import BLACKBOX_PROBLEMS, get_blackbox_problem


def test_problems_know_their_start_and_minimum():
    for name in ("rosenbrock-10", "logreg-cancer", "quadratic-100"):
        p = get_blackbox_problem(name, 100)
        assert p.x0.ndim == 1 and p.f0 > p.fstar >= 0 and p.target() < p.f0
    q = BLACKBOX_PROBLEMS["quadratic-100"](10)
    assert q.fun(np.ones(100)) == 0.0  # the minimiser is x = 1


def test_suite_gives_equal_budgets_and_reports_missing_peers(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(blackbox.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchzero" else real(name, *a))
    log = []
    methods = ["zoptim AS2P", "zoptim STP", "Powell", "torchzero MeZO"]
    blackbox.run_blackbox_suite(tmp_path, methods=methods, problems=["rosenbrock-10"], seeds=1, budget=40, log=log.append)
    assert any("torchzero is not installed" in m for m in log)
    records = blackbox.load_records(tmp_path)
    ran = [r for r in records if "skipped" not in r]
    assert {r["method"] for r in ran} == set(methods) - {"torchzero MeZO"}
    # every method got the budget (zoptim only starts a step that fits: AS2P's 2-query steps + final x use 39)
    assert all(38 <= r["nfev"] <= 40 and r["error"] is None for r in ran)
    text = blackbox.build_report(tmp_path)
    assert "| torchzero MeZO | missing: torchzero is not installed |" in text
    assert "## Which method won" in text and (tmp_path / "blackbox-rosenbrock-10.png").exists()
    missing = json.loads((tmp_path / "blackbox.json").read_text())["missing"]
    assert missing["torchzero"] == "pip install --no-deps 'torchzero==0.4.4'"
    # every other peer is listed exactly when it is absent from this environment (make test installs no peers)
    assert set(missing) - {"torchzero"} == {pkg for pkg in ("nevergrad", "cma", "scipy") if real(pkg) is None}


def test_methods_that_cannot_cope_with_the_dimension_are_marked(tmp_path):
    blackbox.run_blackbox_suite(tmp_path, methods=["Nelder-Mead"], problems=["quadratic-100000"], seeds=1, budget=5)
    (rec,) = blackbox.load_records(tmp_path)
    assert rec["skipped"].startswith("n/a at d = 100,000")


def test_unknown_names_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown black-box method 'LBFGS'"):
        blackbox.run_blackbox_suite(tmp_path, methods=["LBFGS"])
    with pytest.raises(ValueError, match="unknown black-box problem 'sphere'"):
        blackbox.run_blackbox_suite(tmp_path, problems=["sphere"])
