"""Figures as PNG (matplotlib, Agg backend): the S2P paper's Figs. 1a/1b, 3b and the softmax study."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def save(fig, path: Path) -> Path:
    """Lay out, write as PNG and release the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

def _on_grid(curves: list[tuple], grid: np.ndarray) -> np.ndarray:
    """Each (queries, losses) curve interpolated on ``grid`` (NaN past a curve's last point)."""
    rows = []
    for q, l in curves:
        l = np.array([np.nan if v is None or not math.isfinite(v) else v for v in l], dtype=float)
        row = np.interp(grid, np.asarray(q, dtype=float), l, right=np.nan)
        rows.append(row)
    return np.array(rows)


def loss_vs_queries(curves: dict[str, list[tuple]], path: Path, title: str, log_y: bool = True,
                    ylabel: str = "training loss (full data)") -> Path:
    """Mean full training loss over seeds with a min-max band, against function queries (Fig. 1b)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in curves.items():
        end = max(q[-1] for q, _ in runs)
        grid = np.linspace(0, end, 200)
        values = _on_grid(runs, grid)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, lo, hi = np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0)
        (line,) = ax.plot(grid, mean, label=name)
        if len(runs) > 1:
            ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("function queries")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save(fig, path)


def cost_ratio_bars(table: dict[str, list[dict]], fractions, path: Path, title: str) -> Path:
    """Grouped bars of mean cost ratio per GA fraction (Fig. 1a); unreached targets are left empty and marked."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(table)
    width = 0.8 / max(1, len(names))
    x = np.arange(len(fractions))
    for i, name in enumerate(names):
        means = [c["mean"] if c["mean"] is not None else 0.0 for c in table[name]]
        stds = [c["std"] if c["std"] is not None else 0.0 for c in table[name]]
        bars = ax.bar(x + i * width, means, width, yerr=stds, label=name)
        for j, c in enumerate(table[name]):
            if c["mean"] is None:
                ax.text(x[j] + i * width, 0.02, "n/r", ha="center", fontsize=7, rotation=90, color=bars[0].get_facecolor())
    ax.set_xticks(x + width * (len(names) - 1) / 2)
    ax.set_xticklabels([f"GA@{p:g}" for p in fractions])
    ax.set_ylabel("training cost ratio (queries / GA's total)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save(fig, path)


def as2p_dynamics(runs: list[list[dict]], path: Path, title: str) -> Path:
    """AS2P's step size |alpha_k| and |gamma_k| over training, one line per seed (Fig. 3b)."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for recs in runs:
        ev = [r for r in recs if r.get("type") == "eval" and "step_size" in r]
        q = [r["queries"] for r in ev]
        axes[0].plot(q, [abs(r["step_size"]) for r in ev], alpha=0.8)
        axes[1].plot(q, [abs(r["gamma"]) for r in ev], alpha=0.8, label=f"seed {recs[0]['seed']}")
    axes[0].set_ylabel("|step size|")
    axes[1].set_ylabel("|gamma| (projected gradient)")
    for ax in axes:
        ax.set_xlabel("function queries")
        ax.set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    return save(fig, path)


def scaling_loglog(rows: list[dict], path: Path, title: str) -> Path:
    """Softmax study: steps to reach L* + epsilon against d^1.5 / k (Theorem 5.6), log-log."""
    fig, ax = plt.subplots(figsize=(5, 4))
    ks = sorted({r["k"] for r in rows})
    for k in ks:
        pts = [(r["d"] ** 1.5 / r["k"], r["steps"]) for r in rows if r["k"] == k and r["steps"] is not None]
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, "o-", label=f"k = {k}")
    reached = [(r["d"] ** 1.5 / r["k"], r["steps"]) for r in rows if r["steps"] is not None]
    if reached:
        xs = np.array(sorted(x for x, _ in reached))
        anchor = np.median([y / x for x, y in reached])
        ax.plot(xs, anchor * xs, "k--", alpha=0.5, label="slope 1 (T ∝ d^1.5/k)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("d^1.5 / k")
    ax.set_ylabel("steps to reach L* + eps")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save(fig, path)


def suboptimality(curves: dict[str, list[tuple]], l_star: float, path: Path, title: str) -> Path:
    """L(x) - L* on a log scale against queries: linear convergence shows as a straight line."""
    shifted = {name: [(q, [max(v - l_star, 1e-12) for v in l]) for q, l in runs] for name, runs in curves.items()}
    loss_vs_queries(shifted, path, title, log_y=True, ylabel="L(x) - L* (floored at 1e-12)")
    return path
