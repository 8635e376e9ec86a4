"""Named benchmark suites: which experiments (methods x problems x seeds x budget) each one runs.

* ``quick``: ZOSGD, ZOSGD-rademacher, STP, S2P, AS2P fine-tuning the pre-trained EfficientNet-Lite0
  on scikit-learn's digits (``digits-efficientnet``), 3 seeds, 1,500 queries, 30 evaluations a run,
  problem-default hyper-parameters (found by the paper's search). What ``make demo`` runs.
* ``paper``: the S2P paper's comparison (Tables 5, Figs. 1, 3b) on EfficientNet-Lite0 /
  Fashion-MNIST and on softmax regression, 2 seeds, 10,000 queries, 50 evaluations a run, with
  the Appendix D.1 search (reduced grids, seed 0, at a quarter of the budget) before the runs.
* ``ablations``: Fig. 3a (AS2P without automatic LR / without gamma-clipping), Fig. 3c (eta_b
  sweep), Fig. 4 (normal / Rademacher / uniform directions), Fig. 7 (directions per update at an
  equal query budget), on the digits MLP.
* ``methods``: the methods beyond the paper (seed momentum for ZOSGD and AS2P, HiZOO dense and
  factored, the loss guard on ZOSGD with and without momentum) beside GA and AS2P on four cheap problems, 3 seeds, 6,000 queries, every method with
  the problem's default hyper-parameters (GA's lr and eps; no search for any method).
* ``methods-quick`` and ``methods-paper``: the same methods on the quick and paper suites'
  pre-trained networks (digits and Fashion-MNIST EfficientNet-Lite0, 1,500 and 10,000 queries),
  3 seeds, each method with the search of the method it extends (:mod:`zoptim.bench.search`),
  seed 0, at a quarter of the budget (methods-paper) or the whole budget (methods-quick: on the
  digits network the alpha_0 a quarter-budget search picks, 3e-3, diverges over the full budget).
* ``methods-lm``: ZOSGD, AS2P, their seed momentum, HiZOO and the guarded ZOSGD on the LM task (MiniLM with LoRA,
  rt-sentiment and TREC; :mod:`zoptim.problems.lm`), 3 seeds, 1,000 queries, 20 evaluations a
  run, every method with the problem's default (GA's) hyper-parameters and no search.
* ``methods-lm-search``: ZOSGD, AS2P, ZOSGD-momentum, HiZOO and the guarded ZOSGD on MiniLM / TREC,
  each with its own search at the full budget, seed 0, then 3 seeds: lr in {5e-3, 2e-3, 1e-3,
  5e-4} (eps 1e-3) for ZOSGD and the methods that extend it, eta_b in {1, 5, 50} for AS2P.
* ``lowrank-quick``, ``lowrank-paper`` and ``lowrank-lm``: forward-applied low-rank directions
  (``module=model, rank=r``: ZOSGD-lowrank at r = 1 and 4, AS2P-lowrank at r = 1) beside GA and AS2P
  on the quick and paper suites' networks (searched as methods-quick / methods-paper: each low-rank
  row gets the search of the method it extends, with as many trials) and on MiniLM / TREC with LoRA
  and with all parameters (``lm-minilm-trec-full``), 3 seeds, GA's defaults, no search.
* ``perexample-quick``, ``perexample-paper`` and ``perexample-lm``: one direction per example of the
  minibatch (``per_example=True``, rank 1: ZOSGD-perexample, AS2P-perexample) beside GA, the shared
  rank-1 direction and AS2P, at the same minibatch and query budget (a query is one forward pass
  over the minibatch), searched as the lowrank suites; the LM one on SmolLM2 / TREC at lr 3e-4.
* ``orth-quick``, ``orth-paper``, ``orth-mlp`` and ``orth-lm``: the per-example step's estimate
  used three ways, its plain average, divided by the spread of its deltas (``normalize_by_spread``,
  FZOO) and orthogonalised (``orthogonalize``, the polar factor of each matrix's estimate), beside GA;
  on the digits MLP also the seed momentum under the polar factor and 4 shared orthogonalised
  directions; every row searched with GA's number of trials (the normalised rows on the problem's
  ``orth_lr_grid``); ``orth-lm`` on MiniLM TREC with all weights (GA, per-example rank 4 and the
  orthogonalised per-example step, each also with ``sparse_embeddings``, which take their base row's
  search; GA with the embedding block frozen and rank-4 directions with it frozen) and SmolLM2 TREC
  with LoRA (there also rank 8 per example), both also with FZOO's spread-normalised step on rank-4
  per-example directions; the LM runs record the test accuracy at their end.
* ``softmax``: the softmax paper's study (Theorem 5.6): ZO-SGD with k-SPSA on the regularised
  softmax regression for d in {4, 8, 16, 32} and k in {1, 2, 4, 8}; steps and queries to reach
  L* + epsilon (L* from L-BFGS; epsilon = 1e-3 (L(x_0) - L*)), and the linear convergence curves.
* ``blackbox``: zoptim's methods against nevergrad, CMA-ES, scipy and torchzero on functions of a
  vector, 10 to 100,000 dimensions, at equal evaluation budgets (:mod:`zoptim.bench.blackbox`;
  ``--quick`` for a smoke run).

Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set) the runs of a suite are shared out: run i goes
to rank ``i % world`` (a hyper-parameter search runs on rank 0, the others wait for its choice),
and rank 0 waits for every run's result before the report is built. Every run checkpoints and
resumes on its own (:mod:`zoptim.bench.harness`), so when a worker dies and ``torchrun
--max-restarts`` restarts the group, finished runs are skipped and interrupted ones resume, with
the same records as an uninterrupted suite. The black-box suite runs on rank 0 alone.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import atomic_write_text
from ..distributed import launched_rank_and_world
from ..problems import SoftmaxRegression, get_problem
from . import harness, search
from .harness import RunSpec
from .methods import get_method

FIVE = ["ZOSGD", "ZOSGD-rademacher", "STP", "S2P", "AS2P"]
#: The methods beyond the S2P paper beside its GA and AS2P.
NEW = ["ZOSGD", "AS2P", "ZOSGD-momentum", "AS2P-momentum", "HiZOO", "HiZOO-factored", "ZOSGD-guard",
       "ZOSGD-momentum-guard"]
#: The new methods on the LM task (HiZOO-factored left out: at alpha 1e-6 it is the dense estimate).
#: Forward-applied low-rank directions against the in-place full-rank ones.
LOWRANK = ["ZOSGD", "ZOSGD-lowrank", "ZOSGD-lowrank-r4", "AS2P", "AS2P-lowrank"]
LOWRANK_LM = ["ZOSGD", "ZOSGD-lowrank", "ZOSGD-lowrank-r4"]
#: One direction per example beside GA, the shared low-rank direction and AS2P.
PEREXAMPLE = ["ZOSGD", "ZOSGD-lowrank", "ZOSGD-perexample", "AS2P", "AS2P-perexample"]
#: The orthogonalised update (polar factor of the per-example or k-direction estimate) beside GA and
#: the per-example average it replaces.
ORTH = ["ZOSGD", "ZOSGD-perexample", "ZOSGD-perexample-spread", "ZOSGD-perexample-orth",
        "ZOSGD-perexample-orth-momentum", "ZOSGD-k4-orth"]
#: On the pre-trained networks: GA, the per-example average and its two normalised alternatives.
ORTH_NETS = ["ZOSGD", "ZOSGD-perexample", "ZOSGD-perexample-spread", "ZOSGD-perexample-orth"]
LM_METHODS = ["ZOSGD", "AS2P", "ZOSGD-momentum", "AS2P-momentum", "HiZOO", "ZOSGD-guard"]
#: methods-lm-search: every LM method but AS2P-momentum (which ties AS2P on the LM task), each searched.
LM_SEARCHED = ["ZOSGD", "AS2P", "ZOSGD-momentum", "HiZOO", "ZOSGD-guard"]
#: Cheap problems for the ``methods`` suite: the quick suite's MLP, softmax regression, a
#: relaxed-smooth function and an ill-conditioned quadratic.
NEW_PROBLEMS = ["digits-mlp", "softmax", "relaxed-smooth", "quadratic"]


@dataclass
class Experiment:
    name: str
    problems: list[str]
    methods: list[str]
    seeds: int = 3
    budget: int = 6000
    hparams: dict = field(default_factory=dict)  # overrides of the problem defaults
    search: bool = False
    num_evals: int = 100
    search_fraction: float = 0.25  # the search runs at this fraction of the budget (App. D.1: reduced)


def _ablations(budget: int, seeds: int) -> list[Experiment]:
    p = ["digits-mlp"]
    return [
        Experiment("ablation-components", p, ["ZOSGD", "AS2P", "AS2P-no-auto-lr", "AS2P-no-clipping"], seeds, budget),
        Experiment("ablation-eta_b", p, ["ZOSGD", "AS2P-etab1", "AS2P-etab3", "AS2P-etab5", "AS2P-etab10", "AS2P-etab50"], seeds, budget),
        Experiment("ablation-distribution", p, ["ZOSGD", "ZOSGD-rademacher", "ZOSGD-uniform", "AS2P", "AS2P-rademacher",
                                                "AS2P-uniform"], seeds, budget),
        Experiment("ablation-directions", p, ["ZOSGD", "ZOSGD-k2", "ZOSGD-k4", "ZOSGD-k8"], seeds, budget),
    ]


SUITES = {
    "quick": lambda budget, seeds: [Experiment("quick", ["digits-efficientnet"], FIVE, seeds or 3, budget or 1500, num_evals=30)],
    "paper": lambda budget, seeds: [Experiment("paper", ["fashion-efficientnet", "softmax"], FIVE, seeds or 2, budget or 10000,
                                               search=True, num_evals=50)],
    "ablations": lambda budget, seeds: _ablations(budget or 6000, seeds or 3),
    "methods": lambda budget, seeds: [Experiment("methods", NEW_PROBLEMS, NEW, seeds or 3, budget or 6000)],
    "methods-quick": lambda budget, seeds: [Experiment("methods-quick", ["digits-efficientnet"], NEW, seeds or 3,
                                                       budget or 1500, search=True, num_evals=30, search_fraction=1.0)],
    "methods-paper": lambda budget, seeds: [Experiment("methods-paper", ["fashion-efficientnet"], NEW, seeds or 3,
                                                       budget or 10000, search=True, num_evals=50)],
    "methods-lm": lambda budget, seeds: [Experiment("methods-lm", ["lm-minilm-rt", "lm-minilm-trec"], LM_METHODS, seeds or 3,
                                                    budget or 1000, num_evals=20)],
    "methods-lm-search": lambda budget, seeds: [Experiment("methods-lm-search", ["lm-minilm-trec"], LM_SEARCHED,
                                                           seeds or 3, budget or 1000, search=True, num_evals=20,
                                                           search_fraction=1.0)],
    "lowrank-quick": lambda budget, seeds: [Experiment("lowrank-quick", ["digits-efficientnet"], LOWRANK, seeds or 3,
                                                       budget or 1500, search=True, num_evals=30, search_fraction=1.0)],
    "lowrank-paper": lambda budget, seeds: [Experiment("lowrank-paper", ["fashion-efficientnet"], LOWRANK, seeds or 3,
                                                       budget or 10000, search=True, num_evals=50)],
    # No search on the LM task (each run takes minutes here): every method at GA's defaults, LoRA's lr
    # 1e-3 and full-parameter lr 1e-5 (benchmarks/lm_minilm.sh's).
    "lowrank-lm": lambda budget, seeds: [
        Experiment("lowrank-lm", ["lm-minilm-trec"], LOWRANK_LM, seeds or 3, budget or 1000, num_evals=20),
        Experiment("lowrank-lm", ["lm-minilm-trec-full"], LOWRANK_LM, seeds or 3, budget or 1000,
                   hparams={"lr": 1e-5}, num_evals=20)],
    "perexample-quick": lambda budget, seeds: [Experiment("perexample-quick", ["digits-efficientnet"], PEREXAMPLE,
                                                          seeds or 3, budget or 1500, search=True, num_evals=30,
                                                          search_fraction=1.0)],
    "perexample-paper": lambda budget, seeds: [Experiment("perexample-paper", ["fashion-efficientnet"], PEREXAMPLE,
                                                          seeds or 3, budget or 10000, search=True, num_evals=50)],
    # SmolLM2 TREC (causal prompts; MiniLM's encoder formulation shares a forward pass between examples):
    # GA's lr 3e-4 for every method, as methods-lm's SmolLM2 runs, no search.
    "perexample-lm": lambda budget, seeds: [Experiment("perexample-lm", ["lm-smollm2-trec"], ["ZOSGD", "ZOSGD-perexample"],
                                                       seeds or 3, budget or 500, hparams={"lr": 3e-4}, num_evals=20)],
    "orth-quick": lambda budget, seeds: [Experiment("orth-quick", ["digits-efficientnet"], ORTH_NETS, seeds or 3,
                                                    budget or 1500, search=True, num_evals=30, search_fraction=1.0)],
    "orth-paper": lambda budget, seeds: [Experiment("orth-paper", ["fashion-efficientnet"], ORTH_NETS, seeds or 3,
                                                    budget or 10000, search=True, num_evals=50)],
    "orth-mlp": lambda budget, seeds: [Experiment("orth-mlp", ["digits-mlp"], ORTH, seeds or 3, budget or 6000,
                                                  search=True, num_evals=50)],
    # The LM problems at their own budgets, each row searched over 3-4 values at the full budget (seed 0).
    "orth-lm": lambda budget, seeds: [
        Experiment("orth-lm", ["lm-minilm-trec-full"], ["ZOSGD", "ZOSGD-perexample-r4", "ZOSGD-perexample-orth",
                                                        "ZOSGD-perexample-r4-sparse", "ZOSGD-perexample-orth-sparse",
                                                        "ZOSGD-frozenemb", "ZOSGD-lowrank-r4-frozenemb",
                                                        "ZOSGD-perexample-r4-spread"],
                   seeds or 3, budget or 1000, search=True, num_evals=10, search_fraction=1.0),
        Experiment("orth-lm", ["lm-smollm2-trec"], ["ZOSGD", "ZOSGD-perexample-r4", "ZOSGD-perexample",
                                                    "ZOSGD-perexample-orth", "ZOSGD-perexample-r4-spread",
                                                    "ZOSGD-perexample-r8"],
                   seeds or 3, budget or 500, search=True, num_evals=10, search_fraction=1.0)],
    "softmax": None,  # its own runner below
    "blackbox": None,  # zoptim vs nevergrad, CMA-ES, scipy, torchzero: zoptim.bench.blackbox
}

SOFTMAX_DIMS = (4, 8, 16, 32)
SOFTMAX_KS = (1, 2, 4, 8)


def softmax_study_problem(d: int) -> SoftmaxRegression:
    """The softmax-study instance of dimension d: n = 2d, 32 data points, full batch, ||A_j|| = R = 4
    (Theorem 5.6 assumes R >= 4), kappa(A_j) = 2, w_i = 0.1."""
    problem = SoftmaxRegression(n=2 * d, d=d, num_samples=32, R=4.0, cond=2.0, reg=0.1, regularized=True, seed=d)
    problem.name = f"softmax-d{d}"
    return problem


class Share:
    """Hands out a suite's runs to the ranks (run i to rank i % world) and waits for the others'."""

    def __init__(self, out_dir: Path, poll_seconds: float = 1.0):
        self.out_dir, self.poll = Path(out_dir), poll_seconds
        self.rank, self.world = launched_rank_and_world()
        self.count = 0
        self.others: list[Path] = []

    def run(self, spec: RunSpec, problem, progress=None) -> None:
        mine = self.count % self.world == self.rank
        self.count += 1
        if mine:
            harness.run(spec, problem, self.out_dir, progress=progress)
        else:
            self.others.append(self.out_dir / "raw" / f"{spec.run_id}.jsonl")

    def wait_for_file(self, path: Path) -> None:
        while not path.exists():
            time.sleep(self.poll)

    def wait_for_search(self, path: Path, request: dict) -> dict:
        """Rank 0's search result for ``request`` (its methods and budget). A file left by an earlier
        search with other methods is stale: wait until rank 0 has rewritten it for this one."""
        while True:
            if path.exists():
                found = json.loads(path.read_text())
                if found.get("request") == request:
                    return found
            time.sleep(self.poll)

    def finish(self) -> None:
        """Rank 0 returns once every rank's runs have written their results."""
        if self.rank == 0:
            for path in self.others:
                self.wait_for_file(path)


def run_softmax_study(out_dir: Path, seeds: int = 2, budget: int | None = None, progress=None) -> None:
    """k-SPSA on softmax-d{d}: lr = 2 k / (k + d) keeps the estimate's variance term (∝ d/k) in check,
    the step-size shape of Theorem 5.6; constant lr and full batch so the strongly convex loss converges linearly."""
    budget = budget or 8000
    lstar = {}
    share = Share(out_dir)
    for d in SOFTMAX_DIMS:
        problem = softmax_study_problem(d)
        lstar[problem.name] = problem.minimum()
        for k in SOFTMAX_KS:
            hp = {"lr": 2.0 * k / (k + d), "eps": 1e-4}
            for seed in range(seeds):
                spec = RunSpec("softmax-scaling", problem.name, f"kSPSA-k{k}", seed, budget, hp, num_evals=400)
                share.run(spec, problem, progress)
    share.finish()
    atomic_write_text(Path(out_dir) / "softmax_lstar.json", json.dumps(lstar, indent=1))


def run_suite(suite: str, out_dir: Path, methods=None, problems=None, seeds=None, budget=None, progress=None,
              log=print, quick: bool = False, num_evals: int | None = None, hparams: dict | None = None) -> None:
    """Run every experiment of ``suite`` (resumable: finished runs are skipped); ``num_evals``
    overrides the evaluations per run of its experiments, ``hparams`` the problems' default
    hyper-parameters for every method (not with a suite that searches)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; known suites: {', '.join(SUITES)}")
    if budget is not None and (not isinstance(budget, int) or budget <= 0):
        raise ValueError(f"budget must be a positive number of queries; got {budget!r}")
    if seeds is not None and seeds < 1:
        raise ValueError(f"seeds must be >= 1; got {seeds!r}")
    if suite == "blackbox":
        from .blackbox import run_blackbox_suite

        if launched_rank_and_world()[0] != 0:
            log("[blackbox] runs on rank 0 only; this rank has nothing to do")
            return
        run_blackbox_suite(Path(out_dir), methods, problems, seeds, budget, quick=quick, log=log)
        return
    for m in methods or []:
        get_method(m)
    out_dir = Path(out_dir)
    if suite == "softmax":
        run_softmax_study(out_dir, seeds or 2, budget, progress)
        return
    if num_evals is not None and num_evals < 1:
        raise ValueError(f"num_evals must be >= 1; got {num_evals!r}")
    experiments = SUITES[suite](budget, seeds)
    if hparams and any(exp.search for exp in experiments):
        raise ValueError(f"suite {suite!r} searches its hyper-parameters; set them (--set) only for a suite without search")
    share = Share(out_dir)
    for exp in experiments:
        exp.num_evals = num_evals or exp.num_evals
        exp_methods = [get_method(m).name for m in methods] if methods else exp.methods
        # --problems picks from each experiment's own problems (a suite whose experiments differ in
        # hyper-parameters per problem must not run one experiment's settings on another's problem);
        # problems outside the suite run in every experiment
        mine = [p for p in problems or [] if p in exp.problems]
        outside = [p for p in problems or [] if not any(p in e.problems for e in experiments)]
        for pname in (mine + outside if problems else exp.problems):
            log(f"[{exp.name}] building problem {pname}")
            problem = get_problem(pname)
            hp = {**problem.default_hparams, **exp.hparams, **(hparams or {})}
            found = None
            if exp.search:
                search_budget = max(100, int(exp.budget * exp.search_fraction))
                hparams_file = out_dir / f"hparams-{exp.name}-{pname}.json"
                request = {"methods": list(exp_methods), "budget": search_budget}
                if share.rank == 0:
                    log(f"[{exp.name}] hyper-parameter search on {pname} at {search_budget} queries")
                    found = search.search(pname, problem, exp_methods, search_budget, out_dir, exp.name, progress)
                    found = search.merged(found, json.loads(hparams_file.read_text()) if hparams_file.exists() else None)
                    found["request"] = request
                    hp = dict(found["chosen"])
                    # S2P's alpha_0 is per sqrt(K): keep the per-step alpha found at the search budget
                    hp["s2p_lr"] = hp["s2p_lr"] * (exp.budget / search_budget) ** 0.5
                    found["used_at_full_budget"] = hp
                    atomic_write_text(hparams_file, json.dumps(found, indent=1))
                else:
                    log(f"[{exp.name}] waiting for rank 0's hyper-parameter search on {pname}")
                    found = share.wait_for_search(hparams_file, request)
            for method in exp_methods:
                method_hp = hp if found is None else search.hparams_for(method, found)
                for seed in range(exp.seeds):
                    log(f"[{exp.name}] {pname} {method} seed {seed}")
                    share.run(RunSpec(exp.name, pname, method, seed, exp.budget, method_hp, exp.num_evals), problem, progress)
    share.finish()
