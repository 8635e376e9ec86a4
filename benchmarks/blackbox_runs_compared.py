"""Two runs of ``zoptim bench --suite blackbox`` compared: wall time per library and problem, and
every record that differs (issue 36: the suite before and after the small-problem work).

    python benchmarks/blackbox_runs_compared.py BEFORE_DIR AFTER_DIR

BEFORE_DIR and AFTER_DIR are the suite's ``--out`` folders (their ``raw/*.json`` records). A run's
own end-to-end wall time (peers' imports, plots) is not in the records: time the commands.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

COMPARED = ("best", "nfev", "evals_to_target")


def load(folder: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((folder / "raw").glob("*.json"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    args = ap.parse_args()
    before, after = load(args.before), load(args.after)
    wall = collections.defaultdict(lambda: [0.0, 0.0])
    differ, untimed = [], []
    for name, b in before.items():
        a = after.get(name)
        if a is None or "wall_s" not in b or "wall_s" not in a:
            untimed.append(name)
            continue
        library = "zoptim" if b["method"].startswith("zoptim") else "peers"
        for key in ((library, "all problems"), (library, b["problem"])):
            wall[key][0] += b["wall_s"]
            wall[key][1] += a["wall_s"]
        differ += [(name, f, b[f], a[f]) for f in COMPARED if b[f] != a[f]]
    print(f"{'library':8s} | {'problem':18s} | {'before wall s':>13s} | {'after wall s':>12s} | speed-up")
    for (library, problem), (x, y) in sorted(wall.items()):
        print(f"{library:8s} | {problem:18s} | {x:13.1f} | {y:12.1f} | {x / y:6.2f}x")
    print(f"\nrecords compared: {len(before) - len(untimed)}; not timed (a method n/a at that size): {len(untimed)}")
    print(f"records that differ in {', '.join(COMPARED)}: {len(differ)}")
    for name, field, b, a in differ:
        print(f"  {name}: {field} {b} -> {a}")


if __name__ == "__main__":
    main()
