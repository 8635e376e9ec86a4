"""Run one (experiment, problem, method, seed, hyper-parameters) at a fixed query budget.

The x-axis of every comparison is the number of function queries, never steps: STP spends 3 a
step, S2P's dynamic rules 4, k-SPSA 2k, the others 2; a run of budget Q takes floor(Q / q) steps.
Every ``budget / num_evals`` queries (rounded to whole steps) the full-data training loss is
evaluated (not counted as queries) and recorded with the wall time and the optimizer's
``last_stats`` (gamma, step size, rho, lr, sigma).

Output: one JSON Lines file per run, ``raw/<run id>.jsonl``: a ``run`` header (method, problem,
seed, budget, hyper-parameters), ``eval`` records, and an ``end`` record. It is written atomically
when the run finishes; until then a checkpoint (model, optimizer, scheduler, batch generator,
records) is saved atomically every ``checkpoint_seconds`` under ``checkpoints/``. A finished run is
skipped on the next invocation; an interrupted one resumes from its checkpoint and, because every
optimizer resumes bit-identically, produces the same records as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoint import atomic_save, safe_load
from ..optim import DivergedError, NonFiniteLossWarning
from ..problems.base import Problem
from ..records import read as read_records
from ..records import write as write_records
from ..runloop import progress_bar
from .methods import get_method


@dataclass(frozen=True)
class RunSpec:
    experiment: str
    problem: str
    method: str
    seed: int
    budget: int
    hparams: dict = field(default_factory=dict)
    num_evals: int = 100

    def __post_init__(self):
        if not isinstance(self.budget, int) or self.budget <= 0:
            raise ValueError(f"budget must be a positive number of queries; got {self.budget!r}")
        if self.num_evals < 1:
            raise ValueError(f"num_evals must be >= 1; got {self.num_evals!r}")

    @property
    def run_id(self) -> str:
        key = json.dumps({"hparams": self.hparams, "budget": self.budget, "num_evals": self.num_evals}, sort_keys=True)
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        return f"{self.experiment}__{self.problem}__{self.method}__seed{self.seed}__{digest}"


def _stats(opt) -> dict:
    out = {}
    for key, value in (getattr(opt, "last_stats", None) or {}).items():
        if key == "loss":
            key = "batch_loss"
        if isinstance(value, (int, float)) or torch.is_tensor(value) and value.numel() == 1:
            out[key] = float(value)
    return out


def run(spec: RunSpec, problem: Problem, out_dir: Path, *, checkpoint_seconds: float = 30.0,
        progress: bool | None = None, on_eval=None) -> list[dict]:
    """Run ``spec`` on ``problem`` (already built) and return its records; see the module docstring.

    ``on_eval(record)`` is called after each evaluation (after the checkpoint, if one was due):
    raising from it interrupts the run safely.
    """
    out_dir = Path(out_dir)
    result_path = out_dir / "raw" / f"{spec.run_id}.jsonl"
    ckpt_path = out_dir / "checkpoints" / f"{spec.run_id}.pt"
    if result_path.exists():
        return read_records(result_path)

    method = get_method(spec.method)
    total_steps = spec.budget // method.queries_per_step
    if total_steps < 1:
        raise ValueError(f"budget {spec.budget} is below one step of {spec.method} ({method.queries_per_step} queries)")
    eval_every = max(1, round(total_steps / spec.num_evals))
    model = problem.make_model(spec.seed)
    params = method.parameters(model)
    opt, scheduler = method.build(params, spec.hparams, total_steps, spec.seed, module=model)
    batches = torch.Generator().manual_seed(1_000_003 * (spec.seed + 1))

    header = {"type": "run", **asdict(spec), "run_id": spec.run_id, "total_steps": total_steps,
              "queries_per_step": method.queries_per_step, "dim": sum(p.numel() for p in params)}
    step, wall_before, records = 0, 0.0, None
    if ckpt_path.exists():
        ckpt = safe_load(ckpt_path, required_keys=("model", "optimizer", "scheduler", "batches", "step", "wall",
                                                   "records"))
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        batches.set_state(ckpt["batches"])
        step, wall_before, records = ckpt["step"], ckpt["wall"], ckpt["records"]

    start = time.perf_counter()

    def wall() -> float:
        return wall_before + time.perf_counter() - start

    def evaluate(diverged: bool = False) -> dict:
        loss = problem.full_loss(model)
        rec = {"type": "eval", "step": step, "queries": int(opt.num_queries), "loss": float(loss), "wall": wall()}
        if step:
            rec.update(_stats(opt))
        if diverged:
            rec["diverged"] = True
        return rec

    def checkpoint() -> None:
        atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": None if scheduler is None else scheduler.state_dict(),
                     "batches": batches.get_state(), "step": step, "wall": wall(), "records": records}, ckpt_path)

    if records is None:
        records = [header, evaluate()]
    if progress is None:
        progress = sys.stdout.isatty()
    bar = progress_bar(total_steps, f"{spec.method} {spec.problem} s{spec.seed}", progress, initial=step)
    last_ckpt = time.perf_counter()
    diverged = False
    while step < total_steps:
        batch = problem.sample_batch(batches)
        try:
            with warnings.catch_warnings():  # a skipped non-finite step is recorded, not printed per step
                warnings.simplefilter("ignore", NonFiniteLossWarning)
                opt.step(problem.closure(model, batch, per_example=method.options.get("per_example", False)))
        except DivergedError:  # too many consecutive non-finite steps
            diverged = True
        if scheduler is not None:
            scheduler.step()
        step += 1
        bar.update(1)
        if diverged or step % eval_every == 0 or step == total_steps:
            rec = evaluate(diverged)
            records.append(rec)
            if not math.isfinite(rec["loss"]):
                diverged = True
            if diverged:
                break
            if time.perf_counter() - last_ckpt >= checkpoint_seconds and step < total_steps:
                checkpoint()
                last_ckpt = time.perf_counter()
            if on_eval is not None:
                on_eval(rec)
    bar.close()
    opt.close()  # forward-applied directions: the hooks leave the model
    end = {"type": "end", "steps": step, "queries": int(opt.num_queries), "wall": wall(), "diverged": diverged}
    accuracy = None if diverged or spec.experiment.startswith("search-") else problem.test_accuracy(model)
    if accuracy is not None:  # a held-out split (the LM problems), at the final weights
        end["test_accuracy"] = accuracy
    records.append(end)
    write_records(result_path, records)
    ckpt_path.unlink(missing_ok=True)
    return records


def load_runs(out_dir: Path) -> list[list[dict]]:
    """All finished runs under ``out_dir/raw`` (each a list of records, header first)."""
    return [read_records(p) for p in sorted((Path(out_dir) / "raw").glob("*.jsonl"))]


def curve(records: list[dict]) -> tuple[list[int], list[float]]:
    """(queries, full loss) of a run's eval records; a non-finite loss reads as +inf."""
    evals = [r for r in records if r.get("type") == "eval"]
    return [r["queries"] for r in evals], [math.inf if r["loss"] is None else r["loss"] for r in evals]
