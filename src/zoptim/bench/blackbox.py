"""``zoptim bench --suite blackbox``: zoptim's methods against other black-box optimisers.

Every method gets the same budget of evaluations of the same function of a NumPy vector
(:mod:`zoptim.problems.blackbox`, 10 to 100,000 dimensions) and is judged on what it found:

* best loss at the budget (the lowest value of ``fun`` among all points evaluated, median over seeds),
* evaluations to a target (first evaluation whose value closes 90 % of the gap f(x0) - f*),
* wall time of the run (function evaluations included) and peak memory (the rise of the
  process's peak resident set over the run; ``/proc/self/clear_refs`` resets the mark per run).

Compared: zoptim ``AS2P``, ``ZOSGD`` (MeZO/SPSA) and ``STP`` through :func:`zoptim.minimize`;
nevergrad's ``NGOpt`` and ``OnePlusOne``; pycma's CMA-ES (diagonal covariance, ``CMA_diagonal``, at
d >= 1,000, where the full d x d matrix and its eigendecompositions are too slow); scipy's
``Powell``, ``Nelder-Mead`` and ``COBYLA`` (d <= 1,000: they keep a d x d direction set or
simplex, 80 GB at d = 100,000); torchzero's zeroth-order modules ``MeZO`` (+ LR) and ``SPSA``
(+ Adam). The peers are the optional extra ``zoptim[peers]``; missing ones are listed in the
report, not fatal. zoptim's and torchzero's step sizes are per problem (see
:mod:`zoptim.problems.blackbox`): on the four problems up to d = 100 the best of a 4-point grid
on seed 0 (``python -m zoptim.bench.blackbox --probe NAME``), on the larger ones the same values
(ZOSGD's learning rate scaled by 1/(d + 2)), not searched; torchzero's MeZO uses ZOSGD's. The
peers run with their defaults and the problem's scale. scipy's methods are deterministic: one
run each.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checkpoint import atomic_write_text
from ..problems.blackbox import BLACKBOX_PROBLEMS, BlackBoxProblem, get_blackbox_problem

#: Default budget (evaluations) per problem; ``--budget`` replaces all of them.
BUDGETS = {
    "rosenbrock-10": 2000,
    "logreg-cancer": 2000,
    "softmax-64": 2000,
    "quadratic-100": 3000,
    "logreg-digits": 5000,
    "rosenbrock-1000": 5000,
    "quadratic-100000": 3000,
}
#: ``--quick``: a smoke run (tests): three small problems, a few hundred evaluations.
QUICK_PROBLEMS = ("rosenbrock-10", "logreg-cancer", "quadratic-100")
QUICK_BUDGET = 300
TIME_CAP_S = 120.0  # a run still going after this is stopped and marked (none was, in the README run)
TARGET_FRACTION = 0.1


class _Stop(Exception):
    pass


class Recorder:
    """Wraps ``fun``: counts evaluations, keeps the best value so far, stops the run at the budget."""

    def __init__(self, fun, budget: int, time_cap: float = TIME_CAP_S):
        self.fun, self.budget, self.time_cap = fun, budget, time_cap
        self.values: list[float] = []
        self.start = time.perf_counter()
        self.capped = False

    def __call__(self, x, *args) -> float:
        if len(self.values) >= self.budget:
            raise _Stop
        if time.perf_counter() - self.start > self.time_cap:
            self.capped = True
            raise _Stop
        value = float(self.fun(np.asarray(x, dtype=np.float64)))
        self.values.append(value)
        return value


# -- methods ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Peer:
    name: str
    package: str  # import name; the run is skipped (and listed) when it is missing
    library: str
    deterministic: bool = False
    max_dim: int | None = None
    max_dim_reason: str = ""


PEERS = [
    Peer("zoptim AS2P", "zoptim", "zoptim"),
    Peer("zoptim ZOSGD", "zoptim", "zoptim"),
    Peer("zoptim STP", "zoptim", "zoptim"),
    Peer("NGOpt", "nevergrad", "nevergrad"),
    Peer("OnePlusOne", "nevergrad", "nevergrad"),
    Peer("CMA-ES", "cma", "pycma"),
    Peer("Powell", "scipy", "scipy", True, 1000, "keeps a d x d direction set (80 GB at d = 100,000)"),
    Peer("Nelder-Mead", "scipy", "scipy", True, 1000, "keeps a (d + 1) x d simplex (80 GB at d = 100,000)"),
    Peer("COBYLA", "scipy", "scipy", True, 1000, "O(d^2) memory and work per iteration"),
    Peer("torchzero MeZO", "torchzero", "torchzero"),
    Peer("torchzero SPSA+Adam", "torchzero", "torchzero"),
]


def get_peer(name: str) -> Peer:
    for m in PEERS:
        if m.name.lower() == name.lower():
            return m
    raise ValueError(f"unknown black-box method {name!r}; known: {', '.join(m.name for m in PEERS)}")


def _run_zoptim(kind: str, problem: BlackBoxProblem, rec: Recorder, seed: int) -> dict:
    from ..minimizer import minimize
    from ..optim import NonFiniteLossWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteLossWarning)
        minimize(rec, problem.x0, method=kind,
                              options={**problem.hparams[kind], "maxfev": problem.budget, "seed": seed})
    return {"hparams": problem.hparams[kind]}


def _run_nevergrad(name: str, problem: BlackBoxProblem, rec: Recorder, seed: int) -> dict:
    import nevergrad as ng

    param = ng.p.Array(init=problem.x0.copy()).set_mutation(sigma=problem.scale)
    param.random_state = np.random.RandomState(seed)
    opt = ng.optimizers.registry[name](parametrization=param, budget=problem.budget, num_workers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while True:
            cand = opt.ask()
            opt.tell(cand, rec(cand.value))
    return {}


def _run_cma(problem: BlackBoxProblem, rec: Recorder, seed: int) -> dict:
    import cma

    diagonal = problem.dim >= 1000
    opts = {"seed": seed + 1, "verbose": -9, "maxfevals": problem.budget, "CMA_diagonal": diagonal}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        es = cma.CMAEvolutionStrategy(problem.x0.copy(), problem.scale, opts)
        while True:  # restart from the best point if CMA-ES stops early (tolerances)
            if es.stop():
                es = cma.CMAEvolutionStrategy(es.result.xbest, problem.scale, {**opts, "seed": opts["seed"] + len(rec.values)})
            xs = es.ask()
            es.tell(xs, [rec(x) for x in xs])
    return {"diagonal": diagonal}


def _run_scipy(name: str, problem: BlackBoxProblem, rec: Recorder, seed: int) -> dict:
    from scipy.optimize import minimize as scipy_minimize

    key = "maxiter" if name == "COBYLA" else "maxfev"
    options = {key: problem.budget}
    if name == "COBYLA":
        options["rhobeg"] = problem.scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scipy_minimize(rec, problem.x0.copy(), method=name, options=options)
    return {}


def _run_torchzero(name: str, problem: BlackBoxProblem, rec: Recorder, seed: int) -> dict:
    import torch
    import torchzero as tz

    torch.manual_seed(seed)  # torchzero draws its directions from the global RNG
    x = torch.nn.Parameter(torch.tensor(problem.x0, dtype=torch.float64))
    if name == "torchzero MeZO":
        lr = problem.hparams["torchzero_lr"]
        opt = tz.Optimizer([x], tz.m.MeZO(h=1e-4, distribution="normal"), tz.m.LR(lr))
    else:
        lr = problem.hparams["torchzero_adam_lr"]
        opt = tz.Optimizer([x], tz.m.SPSA(h=1e-4, distribution="rademacher"), tz.m.Adam(), tz.m.LR(lr))

    def closure(backward=True):
        return torch.tensor(rec(x.detach().numpy()), dtype=torch.float64)

    with torch.no_grad():
        while True:
            opt.step(closure)
    return {"lr": lr}


def _run(method: Peer, problem: BlackBoxProblem, rec: Recorder, seed: int) -> dict:
    n = method.name
    if n.startswith("zoptim "):
        return _run_zoptim(n.split()[1].lower(), problem, rec, seed)
    if n in ("NGOpt", "OnePlusOne"):
        return _run_nevergrad(n, problem, rec, seed)
    if n == "CMA-ES":
        return _run_cma(problem, rec, seed)
    if n in ("Powell", "Nelder-Mead", "COBYLA"):
        return _run_scipy(n, problem, rec, seed)
    return _run_torchzero(n, problem, rec, seed)


# -- memory -----------------------------------------------------------------------------------------
def _proc_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- one run -------------------------------------------------------------------------------------------
def run_one(method: Peer, problem: BlackBoxProblem, seed: int) -> dict:
    """Run ``method`` on ``problem`` for its budget; the record written to raw/*.json."""
    import gc

    gc.collect()
    can_measure = _reset_peak()
    base = _proc_kib("VmRSS")
    rec = Recorder(problem.fun, problem.budget)
    error = None
    info = {}
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        info = _run(method, problem, rec, seed) or {}
    except _Stop:
        pass
    except Exception as err:  # a peer that fails is reported, not fatal
        error = f"{type(err).__name__}: {err}"[:300]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _proc_kib("VmHWM") if can_measure else None
    values = np.asarray(rec.values, dtype=float)
    with np.errstate(invalid="ignore"):
        best = np.fmin.accumulate(np.where(np.isfinite(values), values, np.inf)) if values.size else values
    target = problem.target(TARGET_FRACTION)
    hit = np.flatnonzero(best <= target)
    # the curve: best-so-far at up to 400 evaluation counts (log-spaced and linear)
    n = best.size
    idx = np.unique(np.concatenate([np.geomspace(1, max(n, 1), 200).astype(int), np.linspace(1, max(n, 1), 200).astype(int)]))
    idx = idx[(idx >= 1) & (idx <= n)]
    return {
        "problem": problem.name, "dim": problem.dim, "method": method.name, "library": method.library, "seed": seed,
        "budget": problem.budget, "nfev": int(n), "best": float(best[-1]) if n else None,
        "f0": problem.f0, "fstar": problem.fstar, "target": target,
        "evals_to_target": int(hit[0]) + 1 if hit.size else None,
        "wall_s": wall, "cpu_s": cpu, "peak_mib": None if peak is None or base is None else max(0.0, (peak - base) / 1024.0),
        "time_capped": rec.capped, "error": error, "info": info,
        "curve_evals": idx.tolist(), "curve_best": [float(best[i - 1]) for i in idx],
    }


def missing_peers() -> dict[str, str]:
    """Library -> pip hint for every peer library that is not installed."""
    hints = {"nevergrad": "pip install 'nevergrad==1.0.12'", "cma": "pip install 'cma==4.5.0'",
             "scipy": "pip install scipy", "torchzero": "pip install --no-deps 'torchzero==0.4.4'"}
    return {pkg: hint for pkg, hint in hints.items() if importlib.util.find_spec(pkg) is None}


def run_blackbox_suite(out_dir: Path, methods=None, problems=None, seeds=None, budget=None, quick=False, log=print) -> None:
    """Run every (problem, method, seed) not yet in ``out_dir/raw`` (resumable)."""
    out_dir = Path(out_dir)
    raw = out_dir / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    chosen = [get_peer(m) for m in methods] if methods else PEERS
    names = list(problems or (QUICK_PROBLEMS if quick else BUDGETS))
    for name in names:
        if name not in BLACKBOX_PROBLEMS:
            raise ValueError(f"unknown black-box problem {name!r}; known: {', '.join(BLACKBOX_PROBLEMS)}")
    seeds = seeds or (1 if quick else 2)
    missing = missing_peers()
    for pkg, hint in missing.items():
        log(f"[blackbox] {pkg} is not installed: its rows are marked missing ({hint}, or pip install 'zoptim[peers]')")
    # Imports, first-call set-up (torch.compile of zoptim's kernels, nevergrad's registry, ...) are
    # one-off costs that would land on whichever run comes first: pay them before timing anything.
    warm = get_blackbox_problem("rosenbrock-10", 20)
    for method in chosen:
        if method.package not in missing:
            run_one(method, warm, 0)
    meta = {"seeds": seeds, "quick": quick, "budget_override": budget, "missing": missing,
            "problems": names, "methods": [m.name for m in chosen]}
    for name in names:
        b = budget or (QUICK_BUDGET if quick else BUDGETS.get(name, 2000))
        log(f"[blackbox] building {name} (budget {b})")
        problem = get_blackbox_problem(name, b)
        for method in chosen:
            for seed in range(1 if method.deterministic else seeds):
                path = raw / f"{name}__{method.name.replace(' ', '_')}__{seed}.json"
                if path.exists():
                    continue
                if method.package in missing:
                    record = {"problem": name, "dim": problem.dim, "method": method.name, "seed": seed,
                              "skipped": f"missing: {method.library} is not installed"}
                elif method.max_dim is not None and problem.dim > method.max_dim:
                    record = {"problem": name, "dim": problem.dim, "method": method.name, "seed": seed,
                              "skipped": f"n/a at d = {problem.dim:,}: {method.max_dim_reason}"}
                else:
                    log(f"[blackbox] {name} {method.name} seed {seed}")
                    record = run_one(method, problem, seed)
                atomic_write_text(path, json.dumps(record))
    atomic_write_text(out_dir / "blackbox.json", json.dumps(meta, indent=1))


# -- report -------------------------------------------------------------------------------------------------
def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}g}"


def load_records(out_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(out_dir) / "raw").glob("*.json"))]


def summarize(records: list[dict]) -> dict[str, list[dict]]:
    """Per problem, one row per method: median best, evals to target, time, memory."""
    by_problem: dict[str, dict[str, list[dict]]] = {}
    for r in records:
        by_problem.setdefault(r["problem"], {}).setdefault(r["method"], []).append(r)
    order = {m.name: i for i, m in enumerate(PEERS)}
    table = {}
    for prob, methods in by_problem.items():
        rows = []
        for name, runs in sorted(methods.items(), key=lambda kv: order.get(kv[0], 99)):
            if any("skipped" in r for r in runs):
                rows.append({"method": name, "skipped": runs[0]["skipped"]})
                continue
            ok = [r for r in runs if r.get("best") is not None]
            hits = [r["evals_to_target"] for r in ok if r["evals_to_target"] is not None]
            rows.append({
                "method": name, "runs": len(runs), "dim": runs[0]["dim"], "budget": runs[0]["budget"],
                "best": float(np.median([r["best"] for r in ok])) if ok else None,
                "gap": float(np.median([r["best"] - r["fstar"] for r in ok])) if ok else None,
                "to_target": float(np.median(hits)) if len(hits) == len(ok) and ok else None,
                "reached": len(hits),
                "wall_s": float(np.mean([r["wall_s"] for r in ok])) if ok else None,
                "cpu_s": float(np.mean([r.get("cpu_s", r["wall_s"]) for r in ok])) if ok else None,
                "peak_mib": float(np.max([r["peak_mib"] for r in ok])) if ok and all(r["peak_mib"] is not None for r in ok) else None,
                "nfev": int(np.median([r["nfev"] for r in ok])) if ok else None,
                "errors": [r["error"] for r in runs if r.get("error")],
                "capped": any(r.get("time_capped") for r in runs),
                "fstar": runs[0]["fstar"], "f0": runs[0]["f0"], "target": runs[0]["target"],
            })
        table[prob] = rows
    return table


def build_report(out_dir: Path) -> str:
    """Write summary.md and one loss-vs-evaluations plot per problem; return the Markdown."""
    out_dir = Path(out_dir)
    meta_path = out_dir / "blackbox.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    records = load_records(out_dir)
    table = summarize(records)
    problems = sorted(table, key=lambda p: (table[p][0].get("dim") or next((r["dim"] for r in records if r["problem"] == p), 0)))
    lines = ["# Black-box comparison (`zoptim bench --suite blackbox`)", ""]
    lines.append(
        f"Equal evaluation budgets; median over {meta.get('seeds', '?')} seeds (scipy's deterministic methods: one run). "
        "best = lowest value evaluated; to target = evaluations until a value closes 90 % of the gap f(x0) - f*; "
        "time = CPU seconds of the process over the run (function evaluations included; robust to other jobs on a "
        "shared machine, unlike wall time, which the raw records also hold); memory = rise of the peak RSS during the run.")
    if meta.get("missing"):
        lines.append("")
        lines.append("Missing peers (rows marked missing): " + ", ".join(f"{k} (`{v}`)" for k, v in meta["missing"].items()))
    winners = []
    for prob in problems:
        rows = table[prob]
        first = next((r for r in rows if "skipped" not in r), None)
        if first is None:
            continue
        lines += ["", f"## {prob} (d = {first['dim']:,}, budget {first['budget']:,} evaluations; "
                  f"f(x0) = {_fmt(first['f0'], 4)}, f* = {_fmt(first['fstar'], 4)}, target {_fmt(first['target'], 4)})", "",
                  "| method | best loss | best - f* | evals to target | CPU time (s) | peak memory (MiB) |",
                  "|---|---|---|---|---|---|"]
        ranked = sorted((r for r in rows if "skipped" not in r and r["best"] is not None), key=lambda r: r["best"])
        best_name = ranked[0]["method"] if ranked else None
        for r in rows:
            if "skipped" in r:
                lines.append(f"| {r['method']} | {r['skipped']} | | | | |")
                continue
            name = f"**{r['method']}**" if r["method"] == best_name else r["method"]
            reach = _fmt(r["to_target"], 4) if r["to_target"] is not None else (
                f"n/r ({r['reached']}/{r['runs']} seeds)" if r["reached"] else "n/r")
            note = ""
            if r["errors"]:
                note = f" (error: {r['errors'][0][:80]})"
            elif r["capped"]:
                note = f" (stopped at the {TIME_CAP_S:.0f} s cap after {r['nfev']} evaluations)"
            elif r["nfev"] is not None and r["nfev"] < r["budget"] * 0.98:
                note = f" (stopped itself after {r['nfev']} evaluations)"
            lines.append(f"| {name}{note} | {_fmt(r['best'], 4)} | {_fmt(r['gap'], 3)} | {reach} | {_fmt(r['cpu_s'], 3)} | "
                         f"{_fmt(r['peak_mib'], 3)} |")
        if ranked:
            zo = [r for r in ranked if r["method"].startswith("zoptim")]
            winners.append((prob, first["dim"], ranked[0]["method"], zo[0]["method"] if zo else None,
                            1 + ranked.index(zo[0]) if zo else None, len(ranked)))
        png = _plot(prob, [r for r in records if r["problem"] == prob and "curve_evals" in r], out_dir)
        if png:
            lines += ["", f"![{prob}]({png.name})"]
    if winners:
        lines += ["", "## Which method won", "", "| problem | d | best method | best zoptim method (rank) |", "|---|---|---|---|"]
        for prob, dim, win, zo, rank, n in winners:
            lines.append(f"| {prob} | {dim:,} | {win} | {zo} ({rank} of {n}) |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out_dir / "summary.md", text)
    return text


def _plot(problem: str, records: list[dict], out_dir: Path) -> Path | None:
    if not records:
        return None
    from .plots import plt, save

    fig, ax = plt.subplots(figsize=(6.5, 4))
    fstar = records[0]["fstar"]
    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    order = {m.name: i for i, m in enumerate(PEERS)}
    for name in sorted(by_method, key=lambda n: order.get(n, 99)):
        runs = [r for r in by_method[name] if r["curve_evals"]]
        if not runs:
            continue
        end = max(r["curve_evals"][-1] for r in runs)
        grid = np.unique(np.geomspace(1, end, 300).astype(int))
        vals = np.array([np.interp(grid, r["curve_evals"], np.array(r["curve_best"]) - fstar, right=np.nan) for r in runs])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(vals, 0)
        style = "-" if name.startswith("zoptim") else "--"
        ax.plot(grid, np.maximum(med, 1e-16), style, label=name, lw=1.8 if name.startswith("zoptim") else 1.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("function evaluations")
    ax.set_ylabel("best loss so far - f*")
    ax.set_title(f"{problem} (d = {records[0]['dim']:,})")
    ax.legend(fontsize=7, ncol=2)
    return save(fig, out_dir / f"blackbox-{problem}.png")


def probe(problem_names=None, log=print) -> None:
    """The 4-point grids on seed 0 behind the zoptim step sizes in :mod:`zoptim.problems.blackbox`."""
    from ..minimizer import minimize

    for name in problem_names or BUDGETS:
        p = get_blackbox_problem(name, BUDGETS[name])
        grids = {"as2p": ("eps", (0.003, 0.01, 0.03, 0.1)), "stp": ("lr", (0.003, 0.01, 0.03, 0.1)),
                 "zosgd": ("lr", tuple(p.hparams["zosgd"]["lr"] * f for f in (0.1, 0.3, 1, 3)))}
        for kind, (key, grid) in grids.items():
            out = []
            for v in grid:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = minimize(p.fun, p.x0, method=kind, options={**p.hparams[kind], key: v, "maxfev": p.budget})
                out.append(f"{key}={v:.3g}: {r.fun_best:.4g}")
            log(f"{name} {kind}: " + " | ".join(out))


if __name__ == "__main__":  # pragma: no cover
    import sys

    if "--probe" in sys.argv:
        probe(sys.argv[sys.argv.index("--probe") + 1:] or None)
