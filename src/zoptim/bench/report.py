"""Tables and plots from finished runs: ``summary.md`` and PNGs, rebuilt by ``zoptim bench --report DIR``."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from .. import cost_ratio, records
from ..checkpoint import atomic_write_text
from . import plots
from .harness import curve
from .methods import BASELINE, get_method


def _group(out_dir: Path):
    """(experiment, problem, budget) -> method -> seed -> records, from ``out_dir/raw``.

    Runs of other budgets get tables of their own. Two runs of one method and seed with other
    settings (a reused ``--out``) are kept apart: the newest file keeps the method's name (so the
    cost ratios use the fresh baseline), an older one is shown as ``METHOD (older settings
    DIGEST)``, and the summary says so."""
    found = defaultdict(list)  # (key, method, seed) -> [(mtime, run_id, records)]
    for path in sorted((Path(out_dir) / "raw").glob("*.jsonl")):
        recs = records.read(path)
        h = recs[0]
        found[((h["experiment"], h["problem"], h["budget"]), h["method"], h["seed"])].append(
            (path.stat().st_mtime, h["run_id"], recs))
    groups = defaultdict(lambda: defaultdict(dict))
    for (key, method, seed), versions in found.items():
        versions.sort(key=lambda v: v[0], reverse=True)
        for i, (_, run_id, recs) in enumerate(versions):
            name = method if i == 0 else f"{method} (older settings {run_id.rsplit('__', 1)[-1]})"
            groups[key][name][seed] = recs
    return groups


def cost_ratio_table(methods: dict) -> dict[str, list[dict]] | None:
    """Method -> aggregated cells, with targets per seed from the baseline's run of that seed."""
    if BASELINE not in methods:
        return None
    per_method = defaultdict(list)
    for seed, base in methods[BASELINE].items():
        curves = {m: curve(runs[seed]) for m, runs in methods.items() if seed in runs}
        for m, ratios in cost_ratio.cost_ratios(curve(base), curves).items():
            per_method[m].append(ratios)
    order = [BASELINE] + [m for m in methods if m != BASELINE]
    return {m: cost_ratio.aggregate(per_method[m]) for m in order if per_method[m]}


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (nan, nan for no values)."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _final_losses(methods: dict) -> str:
    accuracy = any("test_accuracy" in r[-1] for runs in methods.values() for r in runs.values())
    lines = ["| Method | queries | final loss (mean ± std) | seeds | hyper-parameters | wall s/run |"
             + (" test accuracy |" if accuracy else ""), "|---|---|---|---|---|---|" + ("---|" if accuracy else "")]
    for m, runs in methods.items():
        finals = [curve(r)[1][-1] for r in runs.values()]
        mean, std = _mean_std([v for v in finals if math.isfinite(v)])
        h = next(iter(runs.values()))[0]
        used = {k: h["hparams"][k] for k in _uses(m) if k in h["hparams"]}
        walls = [r[-1]["wall"] for r in runs.values()]
        div = sum(1 for r in runs.values() if r[-1].get("diverged"))
        note = f" ({div} diverged)" if div else ""
        row = (f"| {m} | {h['budget']} | {mean:.4g} ± {std:.2g}{note} | {len(runs)} | "
               f"{', '.join(f'{k}={v:.3g}' for k, v in used.items())} | {sum(walls) / len(walls):.1f} |")
        if accuracy:
            accs = [r[-1]["test_accuracy"] for r in runs.values() if "test_accuracy" in r[-1]]
            am, sd = _mean_std(accs)
            row += f" {am:.3f} ± {sd:.3f} ({len(accs)}) |" if accs else " - |"
        lines.append(row)
    return "\n".join(lines)


def _uses(method: str) -> tuple:
    try:
        return get_method(method).uses
    except ValueError:
        return ()


def softmax_section(methods_by_problem: dict, out_dir: Path, lstar: dict) -> list[str]:
    """Queries/steps to reach L* + eps per (d, k), log-log plot against d^1.5/k, and suboptimality curves."""
    rows = []
    for pname, methods in sorted(methods_by_problem.items(), key=lambda kv: int(kv[0].split("-d")[-1])):
        d = int(pname.split("-d")[-1])
        ls = lstar.get(pname)
        for m, runs in sorted(methods.items(), key=lambda kv: get_method(kv[0]).options.get("num_directions", 1)):
            k, per_step = get_method(m).options.get("num_directions", 1), get_method(m).queries_per_step
            steps, queries = [], []
            for recs in runs.values():
                q, l = curve(recs)
                target = ls + 1e-3 * (l[0] - ls)
                hit = cost_ratio.queries_to_reach(q, l, target, beta=0.0)
                queries.append(hit)
                steps.append(None if hit is None else hit // per_step)
            ok = [s for s in steps if s is not None]
            rows.append({"d": d, "k": k, "steps": sum(ok) / len(ok) if len(ok) == len(steps) else None,
                         "queries": (sum(q for q in queries if q is not None) / len(ok)) if len(ok) == len(steps) else None,
                         "reached": f"{len(ok)}/{len(steps)}"})
    intro = ("Target: L* + epsilon with epsilon = 1e-3 (L(x_0) - L*), L* from L-BFGS. Steps = queries / (2k). "
             "Theorem 5.6 predicts T = O(1 + d^1.5 kappa^2 / k) steps (up to log terms and constants).")
    lines = ["## Softmax regression: ZO-SGD with k-SPSA (softmax paper, Theorem 5.6)", "", intro, "",
             "| d | k | steps to target | queries to target | seeds reached | d^1.5/k |", "|---|---|---|---|---|---|"]
    for r in rows:
        s = "n/r" if r["steps"] is None else f"{r['steps']:.0f}"
        q = "n/r" if r["queries"] is None else f"{r['queries']:.0f}"
        lines.append(f"| {r['d']} | {r['k']} | {s} | {q} | {r['reached']} | {r['d'] ** 1.5 / r['k']:.1f} |")
    png = plots.scaling_loglog(rows, out_dir / "softmax-scaling.png", "k-SPSA on softmax regression")
    lines += ["", f"![scaling]({png.name})", ""]
    largest = max(methods_by_problem, key=lambda p: int(p.split("-d")[-1]))
    curves = {m: [curve(r) for r in runs.values()] for m, runs in methods_by_problem[largest].items()}
    png = plots.suboptimality(curves, lstar[largest], out_dir / "softmax-linear-convergence.png",
                              f"L - L* on {largest} (log scale)")
    lines += [f"Linear convergence of the regularised loss ({largest}): ![linear]({png.name})", ""]
    return lines


def build_report(out_dir: Path) -> str:
    """Write ``summary.md`` and the PNGs under ``out_dir`` from its ``raw/*.jsonl``; return the Markdown."""
    out_dir = Path(out_dir)
    if not (out_dir / "raw").is_dir():
        raise FileNotFoundError(f"no results under {out_dir}/raw: run `zoptim bench --suite ... --out {out_dir}` first")
    groups = _group(out_dir)
    intro = ("Loss = full-data training loss; x-axis = function queries. Training cost ratio (S2P paper, App. D.2): "
             "queries to first reach ZOSGD's (GA/MeZO) smoothed loss at 100/80/60/40/20 % of its budget, divided by "
             "ZOSGD's total queries; smoothing = EMA (beta 0.6) then running minimum; mean ± std over seeds; "
             "n/r = not reached, (r/n) = reached by r of n seeds.")
    md = ["# zoptim benchmark summary", "", intro, ""]
    softmax = {p: m for (e, p, _), m in groups.items() if e == "softmax-scaling"}
    budgets = defaultdict(set)
    for e, p, b in groups:
        budgets[(e, p)].add(b)
    for (exp, pname, budget), methods in sorted(groups.items()):
        if exp.startswith("search-") or exp == "softmax-scaling":
            continue
        several = len(budgets[(exp, pname)]) > 1
        slug = f"{exp}-{pname}" + (f"-{budget}q" if several else "")
        md += [f"## {exp}: {pname}" + (f" ({budget} queries)" if several else ""), ""]
        if any(" (older settings " in m for m in methods):
            md += ["This folder holds runs of one method with other settings (a reused `--out`): the newest run "
                   "keeps the method's name, older ones are marked and are not the baseline.", ""]
        table = cost_ratio_table(methods)
        if table is not None:
            md += ["Training cost ratio (format of Tables 5/6):", "", cost_ratio.markdown_table({pname: table}), ""]
            png = plots.cost_ratio_bars(table, cost_ratio.FRACTIONS, out_dir / f"{slug}-cost-ratio.png", f"{exp}: {pname}")
            md += [f"![cost ratio]({png.name})", ""]
        md += [_final_losses(methods), ""]
        png = plots.loss_vs_queries({m: [curve(r) for r in runs.values()] for m, runs in methods.items()},
                                    out_dir / f"{slug}-loss.png", f"{exp}: {pname}")
        md += [f"![loss vs queries]({png.name})", ""]
        for m in methods:
            if m == "AS2P":
                png = plots.as2p_dynamics(list(methods[m].values()), out_dir / f"{slug}-as2p-dynamics.png",
                                          f"AS2P step size and gamma ({pname})")
                md += [f"![AS2P dynamics]({png.name})", ""]
    for path in sorted(out_dir.glob("hparams-*.json")):
        found = json.loads(path.read_text())
        md += [f"## Hyper-parameter search: {path.stem[len('hparams-'):]}", "",
               f"Search budget {found['budget']} queries, seed 0, {len(found['trials'])} candidates. Chosen: "
               + ", ".join(f"{k}={v:.3g}" for k, v in found["chosen"].items())
               + ". Used at the full budget: " + ", ".join(f"{k}={v:.3g}" for k, v in found.get("used_at_full_budget", {}).items())
               + "".join(f". {m}'s own: " + ", ".join(f"{k}={v:.3g}" for k, v in own.items())
                         for m, own in found.get("per_method", {}).items()), ""]
    if softmax:
        lstar_path = out_dir / "softmax_lstar.json"
        if lstar_path.exists():
            md += softmax_section(softmax, out_dir, json.loads(lstar_path.read_text()))
    text = "\n".join(md) + "\n"
    atomic_write_text(out_dir / "summary.md", text)
    return text
