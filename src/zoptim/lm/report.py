"""The fine-tuning report: accuracy table, training-cost ratios (S2P paper, Table 6), plots.

Runs of one comparison share an output directory: ``DIR/zero_shot.json`` and one sub-directory
per run (``DIR/<run>/log.jsonl``, ``DIR/<run>/result.json``). :func:`write_report` gathers
whatever runs are there into ``DIR/report.json``, ``DIR/report.md`` and two PNG plots.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import atomic_write_text
from ..cost_ratio import MINIBATCH_FRACTIONS, minibatch_cost_ratios, trailing_mean
from .train import read_log


def load_runs(out: Path) -> dict[str, dict]:
    runs = {}
    for result in sorted(Path(out).glob("*/result.json")):
        r = json.loads(result.read_text())
        r["log"] = read_log(result.parent / "log.jsonl")
        runs[result.parent.name] = r
    return runs


def tuned_what(result: dict) -> str:
    """What a run tuned, in words: LoRA adapters or the full weights, and how its directions were drawn."""
    what = "LoRA" if result.get("lora") else "full"
    if result.get("rank") is not None:
        what += f", rank-{result['rank']} directions"
    if result.get("per_example"):
        what += ", per-example"
    return what


def _lr(result: dict) -> str:
    lr = result.get("lr")
    text = "auto" if lr is None else f"{lr:.3g}"
    return text + (" (cosine, auto-scaled)" if result.get("method") == "as2p" else "")


def write_report(out) -> dict:
    out = Path(out)
    zero = json.loads((out / "zero_shot.json").read_text()) if (out / "zero_shot.json").exists() else None
    runs = load_runs(out)
    report = {"zero_shot": zero, "runs": {k: {kk: v for kk, v in r.items() if kk != "log"} for k, r in runs.items()}}
    lines = ["| run | method | tuned | lr | steps | forward passes | test accuracy | final val accuracy | wall time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    if zero:
        lines.append(f"| zero-shot | - | - | - | 0 | 0 | {zero['test_accuracy']:.3f} | - | - |")
    for name, r in runs.items():
        lines.append(
            f"| {name} | {r.get('method', '?')} | {tuned_what(r)} | {_lr(r)} | {r['steps']} | {r['queries']} | "
            f"{r['test_accuracy']:.3f} | {r['val_accuracy']:.3f} | {r['train_seconds']:.0f} |"
        )
    md = ["# Fine-tuning report", "", f"test examples: {zero['test_examples'] if zero else '?'}", ""] + lines
    ga = next((k for k in runs if runs[k]["method"] == "zosgd"), None)
    as2p = next((k for k in runs if runs[k]["method"] == "as2p"), None)
    if ga and as2p:
        ratios = minibatch_cost_ratios(runs[ga]["log"], runs[as2p]["log"])
        report["cost_ratio"] = {"base": ga, "other": as2p, "fractions": MINIBATCH_FRACTIONS, "ratios": ratios}
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
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    plot(out, runs, zero)
    return report


def plot(out: Path, runs: dict, zero: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in runs.items():
        log = r["log"]
        ax.plot([x["queries"] for x in log], trailing_mean([x["loss"] for x in log], max(1, len(log) // 10)), label=name)
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
