"""Hyper-parameter search as the S2P paper does it (Appendix D.1), reduced to fit a CPU.

* GA (ZOSGD): grid over alpha_0 (``problem.lr_grid``) x rho_0 (``problem.eps_grid``). The paper's
  grids are {2e-4, 1e-4, 8e-5, 5e-5, 2e-5, 1e-5} x {1e-3, 5e-4, 1e-4, 5e-5, 1e-5} for ResNets;
  problems on another scale shift the alpha_0 grid (each problem class documents its grid).
* The sign (Rademacher) and uniform variants reuse GA's values ("the selected hyper-parameters
  directly apply to sign variants").
* STP: alpha_0 over ``problem.stp_grid`` (default 10 x the alpha_0 grid: Table 3 picks STP's
  alpha_0 10x GA's).
* S2P (stationary rule, alpha = alpha_0 / sqrt(K d)): alpha_0 so that the per-step alpha spans
  GA's alpha_0 grid.
* AS2P reuses GA's rho_0 and tunes eta_b over ``ETA_B_GRID`` (Sec. D.1, Table 4).
* The methods beyond the paper get the search of the method they extend, with as many trials:
  ZOSGD-momentum and HiZOO (dense and factored) their own alpha_0 x rho_0 grid, GA's
  (HiZOO's Hessian smoothing stays at the paper's 1e-6); AS2P-momentum its own eta_b over
  ``ETA_B_GRID``; the forward-applied low-rank rows (ZOSGD-lowrank*, AS2P-lowrank) likewise. Their
  values go to ``per_method`` (a method's overrides of the shared values).

Each candidate is one harness run (seed 0, so searches are resumable like any run) at the
search budget; the score is the mean full loss over the last 10 % of its evaluations (a diverged
run scores +inf). The chosen values and every score are returned and written to the output.
"""

from __future__ import annotations

import math
from pathlib import Path

from . import harness
from .harness import RunSpec
from .methods import get_method

ETA_B_GRID = (1.0, 5.0, 50.0)  # reduced from the paper's {3, 5, 50} range, extended down to 1
#: Methods searched on their own alpha_0 x rho_0 grid (GA's), and on their own eta_b (AS2P's).
LR_EPS_SEARCHED = ("ZOSGD-momentum", "HiZOO", "HiZOO-factored", "ZOSGD-guard", "ZOSGD-momentum-guard",
                   "ZOSGD-lowrank", "ZOSGD-lowrank-r4", "ZOSGD-lowrank-r16", "ZOSGD-frozenemb",
                   "ZOSGD-lowrank-r4-frozenemb", "ZOSGD-perexample", "ZOSGD-perexample-r4", "ZOSGD-perexample-r8",
                   "ZOSGD-perexample-r16", "ZOSGD-perexample-r8-guard")
ETA_B_SEARCHED = ("AS2P-momentum", "AS2P-lowrank", "AS2P-perexample")
#: Variants that run with the values their base method's search chose, with no trials of their own
#: (fewer trials than GA's, never more): the sparse embedding update changes which rows move, not
#: the step's scale.
SHARES_SEARCH = {"ZOSGD-perexample-r4-sparse": "ZOSGD-perexample-r4",
                 "ZOSGD-perexample-orth-sparse": "ZOSGD-perexample-orth"}
#: The orthogonalised (and spread-normalised) methods' lr sets the step's length itself (the root-mean-square
#: of every tensor's step, :mod:`zoptim.engine.polar`), a quantity on another scale than GA's alpha_0: they
#: search ``problem.orth_lr_grid`` (x 10 for the spread-normalised step) x ``problem.eps_grid``, as many
#: lr values as GA's grid, so as many trials as GA.


def score(records: list[dict]) -> float:
    _, losses = harness.curve(records)
    if any(r.get("diverged") for r in records if r.get("type") == "end"):
        return math.inf
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail) if all(math.isfinite(v) for v in tail) else math.inf


def search(problem_name: str, problem, methods: list[str], budget: int, out_dir: Path, experiment: str,
           progress: bool | None = None) -> dict:
    """Chosen hyper-parameters for ``methods`` on ``problem`` and the scores of every candidate."""
    base = dict(problem.default_hparams)
    trials: list[dict] = []

    def trial(method: str, hp: dict) -> float:
        spec = RunSpec(f"search-{experiment}", problem_name, method, 0, budget, hp, num_evals=20)
        s = score(harness.run(spec, problem, out_dir, progress=progress))
        trials.append({"method": method, "hparams": hp, "score": s})
        return s

    chosen = dict(base)
    per_method: dict[str, dict] = {}

    def lr_eps(method: str, start: dict) -> dict:
        grid = problem.lr_grid
        if normalised(method):
            spread = get_method(method).options.get("normalize_by_spread")
            grid = tuple(lr * (10 if spread else 1) for lr in problem.orth_lr_grid)
        best = min(((trial(method, {**start, "lr": lr, "eps": eps}), lr, eps)
                    for lr in grid for eps in problem.eps_grid), key=lambda t: t[0])
        return {"lr": best[1], "eps": best[2]}

    def eta_b(method: str, start: dict) -> dict:
        best = min(((trial(method, {**start, "eta_b": e}), e) for e in ETA_B_GRID), key=lambda t: t[0])
        return {"eta_b": best[1]}

    chosen.update(lr_eps("ZOSGD", base))
    kinds = {get_method(m).kind for m in methods}
    if "stp" in kinds:
        grid = problem.stp_grid or tuple(10 * lr for lr in problem.lr_grid)
        best = min(((trial("STP", {**chosen, "stp_lr": lr}), lr) for lr in grid), key=lambda t: t[0])
        chosen["stp_lr"] = best[1]
    if "s2p" in kinds:
        dim = sum(p.numel() for p in problem.make_model(0).parameters() if p.requires_grad)
        steps = budget // 2
        best = min(((trial("S2P", {**chosen, "s2p_lr": lr * math.sqrt(steps * dim)}), lr * math.sqrt(steps * dim))
                    for lr in problem.lr_grid), key=lambda t: t[0])
        chosen["s2p_lr"] = best[1]
    if "as2p" in kinds:
        chosen.update(eta_b("AS2P", chosen))
    def own(method: str) -> dict | None:
        if method in LR_EPS_SEARCHED or normalised(method):
            return lr_eps(method, chosen)
        if method in ETA_B_SEARCHED:
            return eta_b(method, chosen)
        return None

    for method in methods:
        base_method = SHARES_SEARCH.get(method)
        if base_method is not None:  # the values its base method's own search chose, no trials of its own
            if base_method not in per_method:
                per_method[base_method] = own(base_method)
            per_method[method] = dict(per_method[base_method])
        elif method not in per_method and (values := own(method)) is not None:
            per_method[method] = values
    return {"problem": problem_name, "budget": budget, "chosen": chosen, "per_method": per_method, "trials": trials}


def merged(found: dict, earlier: dict | None) -> dict:
    """``found`` with the rows of an ``earlier`` search of the same problem kept: when both searched
    at the same budget and chose the same shared values, a row (and its trials) that only the earlier
    search covered keeps its pick, so that rerunning a suite for some of its rows (``--methods``)
    does not drop the others' picks from the record. Otherwise ``found`` alone."""
    same = (earlier is not None and earlier.get("problem") == found["problem"]
            and earlier.get("budget") == found["budget"] and earlier.get("chosen") == found["chosen"])
    if not same:
        return found
    per_method = {**{m: v for m, v in earlier.get("per_method", {}).items() if m not in found["per_method"]},
                  **found["per_method"]}
    searched = {t["method"] for t in found["trials"]}
    trials = [t for t in earlier.get("trials", []) if t["method"] not in searched] + found["trials"]
    return {**found, "per_method": per_method, "trials": trials}


def normalised(method: str) -> bool:
    """Whether the method's step length is lr itself (orthogonalised or spread-normalised steps)."""
    options = get_method(method).options
    return bool(options.get("orthogonalize") or options.get("normalize_by_spread"))


def hparams_for(method: str, found: dict) -> dict:
    """The hyper-parameters ``method`` runs with, from a :func:`search` result (or its
    ``used_at_full_budget`` form): the shared values with the method's own overrides."""
    shared = found.get("used_at_full_budget", found["chosen"])
    return {**shared, **found.get("per_method", {}).get(method, {})}
