"""zoptim's own fine-tuning loop (what ``zoptim finetune`` runs), zeroth-order or AdamW.

One loop for every method, so the first-order baseline goes through exactly the same data,
prompt loss and evaluation as the zeroth-order runs. Per step it draws a minibatch with a seeded
``torch.Generator``, then

* zeroth-order: ``optimizer.step(closure)`` with ``closure() = loss(batch)`` (or minus accuracy
  for the non-differentiable objective); the optimizer counts its forward passes;
* AdamW: ``loss(batch).backward(); optimizer.step()``; one forward pass per step.

Every ``eval_every`` steps it measures validation accuracy and appends to ``log.jsonl``; every
``checkpoint_every`` steps (default: ``eval_every``) it writes an atomic checkpoint
(:mod:`zoptim.checkpoint`; read back with ``weights_only=True``: trainable weights, optimizer state
with the zeroth-order seed stream, the data generator), so that a killed run resumes where it
stopped and continues identically.

Under ``torchrun`` (a default process group of ``world`` ranks) the loop is data parallel
(:func:`zoptim.distributed.wrap`, ``mode="batch"``): every rank draws the same minibatch from the
same generator and evaluates its share ``batch[rank::world]``, the loss is averaged across ranks
(one float per query), and every rank applies the same update. Rank 0 alone logs, validates and
writes the checkpoint; after a worker dies, ``torchrun --max-restarts`` restarts the group, every
rank loads that checkpoint, and the run continues bit for bit as if it had not been interrupted.
With FSDP2-sharded weights (``zoptim finetune --shard``) the loop uses ``mode="sharded"``, every
rank validates (the forward is collective), and every rank writes its shards of the checkpoint
(``torch.distributed.checkpoint``) before rank 0 writes ``checkpoint.pt``, which names them.
With ``per_example=True`` rank r's examples are r, r + world, ... of the minibatch, each at its
own direction, and the ranks all-gather the per-example losses.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

import torch

from .. import records, signals
from ..checkpoint import CheckpointError, atomic_save, safe_load
from ..distributed import rank_and_world
from ..engine.atomic import deferred_signals
from ..engine.shards import is_dtensor, local_part
from ..optim import registry
from ..runloop import minibatch, progress_bar
from .data import Task
from .prompts import PromptClassifier

#: A finished run's training state without its weights (read from the exported model): see Loop.slim.
RESUME_FILE = "resume.pt"


def exported_trainable(export: Path, names) -> dict[str, torch.Tensor] | None:
    """The trainable tensors ``names`` (a classifier's parameter names) as a model exported by
    :func:`zoptim.lm.models.save_model` holds them (``save_pretrained`` safetensors, or a peft
    adapter, whose keys lack the adapter name), or None if the export does not hold them all."""
    from safetensors.torch import load_file

    files = sorted(Path(export).glob("*.safetensors"))
    if not files:
        return None
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    out = {}
    for name in names:
        key = name.removeprefix("model.")  # PromptClassifier.model is the exported model
        hit = next((k for k in (key, key.replace(".default.", ".")) if k in tensors), None)
        if hit is None:
            return None
        out[name] = tensors[hit]
    return out


def finetune_methods() -> tuple[str, ...]:
    """The registry's methods (read when asked: a method registered later is one of them) and AdamW."""
    return registry.names() + ("adamw",)


OBJECTIVES = ("loss", "accuracy")

# (full-parameter, LoRA) defaults. ZOSGD: MeZO's grid (lr 1e-6..1e-7, eps 1e-3 full; lr 1e-4,
# eps 1e-2 LoRA). AS2P: rho_0 = eps from MeZO, eta_b = 50 (S2P paper, Table 4). STP: alpha_0 from
# Table 4 (2e-5) for full tuning. HiZOO: MeZO's values (it is MeZO with a preconditioner), alpha
# 1e-6 from the HiZOO paper's grid. AdamW: MeZO's fine-tuning grid (1e-5 full, 1e-4 LoRA).
DEFAULT_LR = {
    "zosgd": (1e-6, 1e-4),
    "hizoo": (1e-6, 1e-4),
    "as2p": (None, None),
    "stp": (2e-5, 1e-3),
    "s2p": (2e-5, 1e-3),
    "adamw": (1e-5, 1e-4),
}
DEFAULT_EPS = (1e-3, 1e-2)

#: How a LoRA run of the method applies its directions unless told otherwise (``rank``: each
#: example of the minibatch gets its own rank-r direction, applied inside the forward). Measured on
#: SmolLM2 TREC with LoRA (docs/benchmarks.md, suite orth-lm; 500 queries, minibatch 4, 3 seeds):
#: ZOSGD with rank-4 per-example directions reached in-place ZOSGD's final loss in 0.87x its queries
#: on 3 of 3 seeds and ended below it (1.765 against 1.828), and its loss was at or below in-place
#: ZOSGD's at every lr of the search (1e-3 .. 1e-4), so it keeps ZOSGD's LoRA lr; a step costs
#: 1.09x an in-place one (benchmarks/lm_lora_step_time.sh). Decoders only: an encoder embeds its
#: label sentences once per example under per-example directions (a forward 2.2-3.0x the shared
#: one, docs/benchmarks.md), and per-example directions were not measured on an encoder with LoRA.
#: The other methods keep their directions in place: nothing measured says otherwise.
LORA_PER_EXAMPLE_RANK = {"zosgd": 4}


def make_optimizer(
    method: str, params, steps: int, lora: bool = False, lr=None, eps=None, eta_b=50.0, seed=0, exact_restore=True,
    momentum: float = 0.0, momentum_window: int = 8, hessian_smooth: float = 1e-6, guard: float = 0.0,
    module=None, rank=None, per_example: bool = False, orthogonalize: bool = False, normalize_by_spread: bool = False,
    sparse_embeddings: bool = False,
):
    """The optimizer for ``method`` with the defaults above (see the table's sources).

    ``momentum`` / ``momentum_window``: the memory-free seed momentum of ZOSGD and AS2P (a
    ValueError for the other methods); ``hessian_smooth``: HiZOO's alpha; ``guard``: the loss
    guard's tol (:class:`zoptim.optim.guard.LossGuard`) of ZOSGD and HiZOO (0: off).

    ``module``: apply the directions inside ``module``'s forward (:mod:`zoptim.engine.forward`;
    ZOSGD, AS2P, STP, S2P), full rank, or rank-``rank`` matrix directions with ``rank``.

    ``exact_restore=False`` drops the zeroth-order engine's exact-restore journal (MeZO's
    arithmetic undo); it is ignored by AdamW.
    """
    if method not in finetune_methods():
        raise ValueError(f"method must be one of {finetune_methods()}; got {method!r}")
    options = {"momentum": momentum, "guard": guard, "module": module, "rank": rank, "per_example": per_example,
               "orthogonalize": orthogonalize, "normalize_by_spread": normalize_by_spread,
               "sparse_embeddings": sparse_embeddings}
    if method == "adamw":
        asked = [k for k, v in options.items() if v not in (None, 0, 0.0, False)]
        if asked:
            raise ValueError(f"{asked[0]} is an option of the zeroth-order methods; got method 'adamw'")
    params = [p for p in params if p.requires_grad]
    lr = DEFAULT_LR.get(method, (None, None))[int(lora)] if lr is None else lr
    eps = DEFAULT_EPS[int(lora)] if eps is None else eps
    if method == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # the fine-tuning defaults, given to each method that takes them (its constructor's arguments)
    known = registry.get(method).hyperparameters()
    hp = {k: v for k, v in dict(lr=lr, eps=eps, eta_b=eta_b, total_steps=steps, hessian_smooth=hessian_smooth).items()
          if k in known and v is not None}
    hp.update(seed=seed, exact_restore=bool(exact_restore))
    if momentum:
        hp.update(momentum=momentum, momentum_window=momentum_window)
    if guard:
        hp["guard"] = guard
    if module is not None:
        hp["module"] = module
    if rank is not None:
        hp["rank"] = rank
    if per_example:
        hp["per_example"] = True
    if orthogonalize:
        hp["orthogonalize"] = True
    if normalize_by_spread:
        hp["normalize_by_spread"] = True
    if sparse_embeddings:
        hp["sparse_embeddings"] = True
    return registry.build(method, params, **hp)




@dataclass
class LoopConfig:
    steps: int
    batch_size: int = 8
    eval_every: int = 100
    eval_examples: int = 200
    objective: str = "loss"
    seed: int = 0
    checkpoint_every: int | None = None  # default: eval_every

    def __post_init__(self):
        if self.checkpoint_every is None:
            self.checkpoint_every = self.eval_every
        for name in ("steps", "batch_size", "eval_every", "eval_examples", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}; got {self.objective!r}")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def is_zeroth_order(optimizer) -> bool:
    return hasattr(optimizer, "num_queries")


class Loop:
    """Train ``classifier`` on ``task.train`` with ``optimizer``; log and checkpoint in ``out``."""

    def __init__(self, classifier: PromptClassifier, task: Task, optimizer, config: LoopConfig, out, progress=True):
        self.classifier, self.task, self.optimizer, self.config = classifier, task, optimizer, config
        self.process_rank, self.world_size = rank_and_world()
        self.sharded = any(is_dtensor(p) for p in classifier.parameters())  # fully_shard-ed (zoptim finetune --shard)
        if self.world_size > 1:
            if not is_zeroth_order(optimizer):
                raise ValueError("a multi-process run needs a zeroth-order method (adamw would need DDP's gradient all-reduce)")
            if config.batch_size % self.world_size:
                raise ValueError(
                    f"batch_size ({config.batch_size}) must be a multiple of the number of processes ({self.world_size}), "
                    "so that every rank evaluates an equal share and their mean is the minibatch loss"
                )
            from ..distributed import wrap

            # FSDP2-sharded weights (zoptim finetune --shard): each rank moves its shard; data as in batch mode
            self.optimizer = wrap(optimizer, mode="sharded" if self.sharded else "batch",
                                  module=classifier if self.sharded else None)
        self.resumed_from: int | None = None
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path, self.ckpt_path = self.out / "log.jsonl", self.out / "checkpoint.pt"
        self.resume_path = self.out / RESUME_FILE
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.elapsed = 0.0  # seconds of training before this process's (a resumed run's earlier sessions)
        self._started = time.perf_counter()
        self.forward_passes = 0  # AdamW's count; zeroth-order optimizers count their own
        self.progress = progress
        if objective_needs_zo(config.objective) and not is_zeroth_order(optimizer):
            raise ValueError("objective='accuracy' is not differentiable: use a zeroth-order method, not adamw")

    @property
    def queries(self) -> int:
        return self.optimizer.num_queries if is_zeroth_order(self.optimizer) else self.forward_passes

    # -- checkpoints -----------------------------------------------------------------------------------
    def sharded_dir(self) -> Path:
        """The folder of a sharded run's trainable weights at the current step."""
        return self.out / f"shards-step{self.step}"

    def seconds(self) -> float:
        """Wall time the run has trained, over every session of it (resumes accumulate)."""
        return self.elapsed + time.perf_counter() - self._started

    def _trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.classifier.named_parameters() if p.requires_grad}

    def save(self) -> None:
        """Checkpoint the run (rank 0 writes ``checkpoint.pt`` atomically). A sharded run first has
        every rank write its shards (``torch.distributed.checkpoint``, a folder per step); the
        checkpoint, written after them, names the folder, so a crash at any point leaves the last
        complete pair; older folders are removed once the new checkpoint is in place."""
        shards = None
        if self.sharded:
            import torch.distributed as dist
            import torch.distributed.checkpoint as dcp

            shards = self.sharded_dir()
            dcp.save({n: p.detach() for n, p in self._trainable().items()}, checkpoint_id=shards)
            dist.barrier()  # every rank's shards are on disk before the checkpoint names them
        if self.process_rank != 0:
            return
        atomic_save(
            {
                "step": self.step,
                "forward_passes": self.forward_passes,
                "elapsed": self.seconds(),
                "trainable": {} if shards else trainable_state(self.classifier),
                "sharded_trainable": shards.name if shards else None,
                "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(),
                "config": asdict(self.config),
            },
            self.ckpt_path,
        )
        if shards:
            import shutil

            for old in self.out.glob("shards-step*"):
                if old != shards:
                    shutil.rmtree(old, ignore_errors=True)

    def slim(self, export: Path | None) -> bool:
        """After the run has finished and exported its model to ``export``: replace ``checkpoint.pt``
        (the trainable weights again) by ``resume.pt``, the rest of the training state (optimizer
        state with the seed stream, data generator, counters, time), whose weights are read back
        from the export. Written only when the export holds the trainable tensors bit for bit
        (checked here), so that ``--resume --steps N`` extends the run exactly; otherwise the
        checkpoint is just removed. True if ``resume.pt`` was written."""
        written = False
        if export is not None and self.ckpt_path.exists() and not self.sharded:
            ckpt = safe_load(self.ckpt_path)
            saved = exported_trainable(export, ckpt["trainable"].keys())
            if saved is not None and all(saved[n].dtype == v.dtype and torch.equal(saved[n], v)
                                         for n, v in ckpt["trainable"].items()):
                atomic_save({**ckpt, "trainable": {}, "trainable_in": export.name}, self.resume_path)
                written = True
        self.ckpt_path.unlink(missing_ok=True)
        if not written:
            self.resume_path.unlink(missing_ok=True)
        return written

    def resume(self) -> bool:
        """Load ``checkpoint.pt`` (or, for a finished run, ``resume.pt`` and the exported weights)
        if present; drop log records written after it. True if resumed."""
        path = self.ckpt_path if self.ckpt_path.exists() else self.resume_path
        if not path.exists():
            return False
        ckpt = safe_load(path, required_keys=("step", "forward_passes", "trainable", "optimizer", "generator"))
        if ckpt["step"] > self.config.steps:
            raise ValueError(f"the run in {self.out} has trained {ckpt['step']} steps, more than the {self.config.steps} "
                             "asked for; a run cannot be shortened (give at least its steps)")
        params = self._trainable()
        if ckpt.get("sharded_trainable"):
            if not self.sharded:
                raise CheckpointError(f"checkpoint {path} was written by a sharded run (--shard); resume it "
                                      "with --shard")
            import torch.distributed.checkpoint as dcp

            dcp.load({n: p.detach() for n, p in params.items()}, checkpoint_id=self.out / ckpt["sharded_trainable"])
        else:
            saved = ckpt["trainable"]
            if ckpt.get("trainable_in"):  # resume.pt: the weights are the run's exported model
                saved = exported_trainable(self.out / ckpt["trainable_in"], params.keys())
                if saved is None:
                    raise CheckpointError(f"{path} reads the run's weights from {self.out / ckpt['trainable_in']}, which "
                                          "is missing or no longer holds them; the run cannot continue (--overwrite "
                                          "starts it over)")
            if set(saved) != set(params) or any(saved[n].shape != params[n].shape for n in params):
                raise CheckpointError(
                    f"checkpoint {path} was written for other trainable parameters "
                    f"({len(saved)} tensors, this run has {len(params)}: another model, --lora setting or "
                    f"version?); use another --out/--run-name or delete it to start over"
                )
            with torch.no_grad():
                for name, value in saved.items():  # this rank's elements (all of them, unsharded)
                    part = local_part(params[name])
                    part.tensor.copy_(value.reshape(-1)[part.offset : part.offset + part.tensor.numel()].view_as(part.tensor))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.generator.set_state(ckpt["generator"])
        self.step, self.forward_passes = ckpt["step"], ckpt["forward_passes"]
        kept = []
        if self.log_path.exists() and self.process_rank == 0:
            kept = [r for r in records.read(self.log_path) if r["step"] <= self.step]
            records.write(self.log_path, kept)
        # checkpoints of zoptim before 0.9 do not record the time: the log's last one is the best guess
        self.elapsed = float(ckpt.get("elapsed", next((r["time"] for r in reversed(kept) if "time" in r), 0.0)))
        self.resumed_from = self.step
        if self.process_rank == 0:
            print(f"resuming from step {self.step} ({path})", flush=True)
        return True

    # -- training --------------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if self.process_rank != 0:
            return
        records.append(self.log_path, record)

    def sample(self):
        idx = minibatch(len(self.task.train), self.config.batch_size, self.generator, replace=True)
        return [self.task.train[i] for i in idx.tolist()]

    def train_step(self) -> float:
        batch = self.sample()
        clf = self.classifier
        if is_zeroth_order(self.optimizer):
            if self.world_size > 1:
                batch = batch[self.process_rank :: self.world_size]  # this rank's share; the wrapper averages over ranks
            if getattr(self.optimizer, "per_example", False):
                if self.config.objective == "accuracy":
                    raise ValueError("per-example directions need a per-example loss; objective='accuracy' is one number")
                closure = lambda: clf.losses(batch)  # noqa: E731 - one loss per example (the wrapper gathers the ranks')
            else:
                closure = (lambda: clf.minus_accuracy(batch)) if self.config.objective == "accuracy" else (
                    lambda: clf.loss(batch)
                )
            return float(self.optimizer.step(closure))
        self.optimizer.zero_grad(set_to_none=True)
        loss = clf.loss(batch)
        loss.backward()
        self.optimizer.step()
        self.forward_passes += 1
        return float(loss.detach())

    def validate(self) -> float:
        accuracy = self.classifier.accuracy(self.task.val[: self.config.eval_examples])
        if self.sharded:
            from ..distributed import reshard

            reshard(self.classifier)
        return accuracy

    def _optimizer_steps(self) -> int | None:
        return getattr(self.optimizer, "steps", None) if is_zeroth_order(self.optimizer) else None

    def _save_interrupted(self, interrupt: KeyboardInterrupt, generator_state, optimizer_steps) -> NoReturn:
        """Ctrl-C (or a stop signal, :mod:`zoptim.signals`): checkpoint the run as it stands, so the
        same command resumes it (single process; a multi-process run stops at a step boundary all
        ranks agree on, see :meth:`run`, or resumes from its last periodic checkpoint). Interrupted inside a step,
        a zeroth-order optimizer puts the parameters and its counters back as before the step
        (``StepRun.abandon(counted=False)``), and the batch draw is rewound, so the resumed run
        is the uninterrupted one, bit for bit; a step whose update was already written counts."""
        if self.world_size > 1:
            raise _like(interrupt, "the last periodic checkpoint is the one to resume from")
        if generator_state is not None:
            if optimizer_steps is not None and self._optimizer_steps() != optimizer_steps:
                self.step += 1  # the update was written before the interrupt arrived: the step is done
                self.log({"step": self.step, "queries": self.queries, "loss": float("nan"), "interrupted": True})
            else:
                self.generator.set_state(generator_state)
        self.save()
        raise _like(interrupt, f"checkpoint saved at step {self.step} ({self.ckpt_path})")

    def run(self) -> list[dict]:
        """Train to ``config.steps`` (from the checkpoint if one exists); return the log."""
        self.classifier.eval()  # two queries of one step must differ only by the perturbation
        if not self.resume() and self.process_rank == 0:
            if self.log_path.exists():
                print(f"note: {self.out} holds a log but no checkpoint (stopped before its first one): starting the "
                      "run from step 0", flush=True)
            self.log_path.unlink(missing_ok=True)
        self._started = time.perf_counter()
        bar = progress_bar(self.config.steps, "finetune", self.progress and self.process_rank == 0, initial=self.step)
        try:  # a stop signal is acted on at step boundaries every rank agrees on (multi-process)
            with signals.defer() if self.world_size > 1 else contextlib.nullcontext():
                self._train(bar)
        finally:
            bar.close()  # before any message: the bar's line is cleared, never glued to it
        return read_log(self.log_path) if self.process_rank == 0 else []

    def _train(self, bar) -> None:
        while self.step < self.config.steps:
            before = self.generator.get_state(), self._optimizer_steps()
            try:
                loss = self.train_step()
            except KeyboardInterrupt as interrupt:
                self._save_interrupted(interrupt, *before)  # raises, saying where the checkpoint is
            self.step += 1
            record = {"step": self.step, "queries": self.queries, "loss": loss, "time": self.seconds()}
            if math.isfinite(loss):
                bar.set_postfix(loss=f"{loss:.4f}")
            last = self.step == self.config.steps
            try:
                if (self.step % self.config.eval_every == 0 or last) and (self.process_rank == 0 or self.sharded):
                    record["val_accuracy"] = self.validate()
                    bar.set_postfix(loss=f"{loss:.4f}", val=f"{record['val_accuracy']:.3f}")
            except KeyboardInterrupt as interrupt:  # the step is done: keep it, without its validation
                self.log(record)
                self._save_interrupted(interrupt, None, None)
            saved = self.step % self.config.checkpoint_every == 0 or last
            try:
                with deferred_signals():  # a signal now waits for the record and the checkpoint, then acts
                    self.log(record)
                    if saved:
                        self.save()
            except KeyboardInterrupt as interrupt:
                if not saved:
                    self._save_interrupted(interrupt, None, None)
                raise _like(interrupt, f"checkpoint saved at step {self.step} ({self.ckpt_path})") from None
            bar.update(1)
            if self.world_size > 1:
                signum = signals.agreed()
                if signum:  # every rank stops after this same step
                    if not saved:
                        self.save()
                    raise signals.Terminated(signum, f"checkpoint saved at step {self.step} ({self.ckpt_path})")


def _like(interrupt: KeyboardInterrupt, message: str) -> KeyboardInterrupt:
    """``interrupt``'s kind (Ctrl-C, or the stop signal it was) with ``message``."""
    if isinstance(interrupt, signals.Terminated):
        return signals.Terminated(interrupt.signum, message)
    return KeyboardInterrupt(message)


def objective_needs_zo(objective: str) -> bool:
    return objective == "accuracy"


def read_log(path) -> list[dict]:
    """A run's log.jsonl, with the losses as floats (NaN where a step's loss was not finite)."""
    return [{**r, "loss": records.finite(r["loss"])} for r in records.read(path)]
