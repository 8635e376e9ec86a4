"""The fine-tuning report: accuracy table, training-cost ratios (S2P paper, Table 6), plots.

Runs of one comparison share an output directory: ``DIR/zero_shot.json`` and one sub-directory
per run (``DIR/<run>/log.jsonl``, ``DIR/<run>/result.json``). :func:`write_report` gathers
whatever runs are there into ``DIR/report.json``, ``DIR/report.md`` and two PNG plots.
"""

from __future__ import annotations

import json
from pathlib import Path

from .train import read_log

FRACTIONS = (1.0, 0.75, 0.5, 0.25)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the minibatch loss is noisy; the paper plots smoothed curves)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def cost_ratios(base_log: list[dict], other_log: list[dict], window: int | None = None) -> list[float | None]:
    """Table 6 of the S2P paper: targets are the base method's (GA's) smoothed loss at 100, 75, 50
    and 25 % of its queries; each ratio is the queries the other method needs to first reach the
    target, divided by the base's total queries (None: never reached). Curves are trailing means
    over ``window`` steps (default 10 % of the base run); points before the first full window are
    not counted as reaching a target."""
    window = window or max(1, len(base_log) // 10)
    base = smooth([r["loss"] for r in base_log], window)
    other = smooth([r["loss"] for r in other_log], window)
    total = base_log[-1]["queries"]
    ratios = []
    for frac in FRACTIONS:
        target = base[max(0, round(frac * len(base)) - 1)]
        # A trailing mean over fewer than `window` minibatches is one noisy batch at the start:
        # only a full window counts as reaching a target.
        hit = next((r["queries"] for i, (r, s) in enumerate(zip(other_log, other))
                    if i >= window - 1 and s <= target), None)
        ratios.append(None if hit is None else hit / total)
    return ratios


def load_runs(out: Path) -> dict[str, dict]:
    runs = {}
    for result in sorted(Path(out).glob("*/result.json")):
        r = json.loads(result.read_text())
        r["log"] = read_log(result.parent / "log.jsonl")
        runs[result.parent.name] = r
    return runs


def write_report(out) -> dict:
    out = Path(out)
    zero = json.loads((out / "zero_shot.json").read_text()) if (out / "zero_shot.json").exists() else None
    runs = load_runs(out)
    report = {"zero_shot": zero, "runs": {k: {kk: v for kk, v in r.items() if kk != "log"} for k, r in runs.items()}}
    lines = ["| run | steps | forward passes | test accuracy | final val accuracy | wall time (s) |", "|---|---|---|---|---|---|"]
    if zero:
        lines.append(f"| zero-shot | 0 | 0 | {zero['test_accuracy']:.3f} | - | - |")
    for name, r in runs.items():
        lines.append(
            f"| {name} | {r['steps']} | {r['queries']} | {r['test_accuracy']:.3f} | "
            f"{r['val_accuracy']:.3f} | {r['train_seconds']:.0f} |"
        )
    md = ["# Fine-tuning report", "", f"test examples: {zero['test_examples'] if zero else '?'}", ""] + lines
    ga = next((k for k in runs if runs[k]["method"] == "zosgd"), None)
    as2p = next((k for k in runs if runs[k]["method"] == "as2p"), None)
    if ga and as2p:
        ratios = cost_ratios(runs[ga]["log"], runs[as2p]["log"])
        report["cost_ratio"] = {"base": ga, "other": as2p, "fractions": FRACTIONS, "ratios": ratios}
        fmt = lambda x: "n/r" if x is None else f"{x:.2f}"  # noqa: E731
        md += [
            "",
            "Training cost ratio (S2P paper, Table 6 format; targets: ZOSGD's smoothed loss at 100/75/50/25 % of "
            "its queries):",
            "",
            "| method | 100 % | 75 % | 50 % | 25 % |",
            "|---|---|---|---|---|",
            "| ZOSGD (GA, MeZO) | 1 | 0.75 | 0.50 | 0.25 |",
            "| AS2P | " + " | ".join(fmt(x) for x in ratios) + " |",
        ]
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text("\n".join(md) + "\n")
    plot(out, runs, zero)
    return report


def plot(out: Path, runs: dict, zero: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in runs.items():
        log = r["log"]
        ax.plot([x["queries"] for x in log], smooth([x["loss"] for x in log], max(1, len(log) // 10)), label=name)
    ax.set(xlabel="forward passes (function queries)", ylabel="training loss (smoothed)", title="loss vs queries")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_vs_queries.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in runs.items():
        pts = [(x["queries"], x["val_accuracy"]) for x in r["log"] if "val_accuracy" in x]
        if zero:
            pts = [(0, zero["val_accuracy"])] + pts
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set(xlabel="forward passes (function queries)", ylabel="validation accuracy", title="accuracy vs queries")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)
