"""Summarise `zoptim finetune` results over seeds: test accuracy, mean and standard deviation.

    python benchmarks/lm_summary.py docs/results/lm/minilm-full docs/results/lm/smollm2-full-h100 ...

Every directory holding a ``zero_shot.json`` is one comparison (one seed); its sub-directories with
a ``result.json`` are the runs. Comparisons that differ only by a ``seed<k>`` path component are
pooled. Prints one Markdown table per root.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f} (1 seed)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} ({len(values)} seeds)"


def summarise(root: Path) -> str:
    groups: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    extra: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for zero in sorted(root.rglob("zero_shot.json")):
        rel = zero.parent.relative_to(root)
        key = "/".join(p for p in rel.parts if not re.fullmatch(r"seed\d+", p)) or "."
        groups[key]["zero-shot"].append(json.loads(zero.read_text())["test_accuracy"])
        for result in sorted(zero.parent.glob("*/result.json")):
            r = json.loads(result.read_text())
            name = result.parent.name
            groups[key][name].append(r["test_accuracy"])
            extra[key][name].append((r["queries"], r.get("device", "cpu"), r.get("train_seconds", 0.0)))
    lines = []
    for key, runs in groups.items():
        lines += [f"### {root.name}/{key}", "", "| run | forward passes | test accuracy | device | train s / run |",
                  "|---|---|---|---|---|"]
        for name, values in runs.items():
            if name == "zero-shot":
                lines.append(f"| zero-shot | 0 | {fmt(values)} | | |")
                continue
            q, dev, _ = extra[key][name][0]
            secs = statistics.mean(e[2] for e in extra[key][name])
            lines.append(f"| {name} | {q:,} | {fmt(values)} | {dev} | {secs:.0f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n".join(summarise(Path(a)) for a in sys.argv[1:]))
