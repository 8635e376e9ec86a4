"""A fine-tuning run, whole: zero-shot evaluation, training, the weight-change check, the result
record, the export and the report.

``zoptim finetune`` parses its flags into a :class:`FinetuneConfig` (which checks every value
before anything loads) and calls :func:`finetune`; a script, a notebook or a test does the same::

    from zoptim.lm.finetune import FinetuneConfig, finetune
    from zoptim.lm.data import load_task
    from zoptim.lm.prompts import get_prompt

    config = FinetuneConfig(model="minilm", method="zosgd", steps=100, lr=1e-5)
    result = finetune(config, load_task("trec"), get_prompt("trec"), out="runs/trec")
"""

from __future__ import annotations

import builtins
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..checkpoint import atomic_write_text
from ..optim import registry
from ..optim.checks import check_positive
from ..optim.options import OptionError, Options, check_options
from .train import LORA_PER_EXAMPLE_RANK, OBJECTIVES, finetune_methods


class ConfigError(ValueError):
    """A bad value of a :class:`FinetuneConfig` field. ``detail`` may name other fields as
    ``{field}`` (given in ``refs`` with their values), so the message can be rendered with field
    names (the library) or with the command's flags (the CLI, :meth:`render`)."""

    def __init__(self, field: str, detail: str, **refs):
        self.field, self.detail, self.refs = field, detail, refs
        super().__init__(self.render())

    def render(self, name=lambda field: field) -> str:
        refs = {k: name(k) if v is None else f"{name(k)} {v}" for k, v in self.refs.items()}
        return f"{name(self.field)} {self.detail.format(**refs)}"


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run (``zoptim finetune``'s flags, as values), checked on creation.

    ``lr`` / ``eps`` None: the method's fine-tuning default (:data:`zoptim.lm.train.DEFAULT_LR`).
    ``keep_checkpoint``: keep the run's training checkpoint once it has finished. By default it is
    removed, since it holds the trainable weights again; what else it holds (optimizer state, seed
    stream, data generator, counters) stays in ``resume.pt`` when the exported model holds the
    weights bit for bit (not with ``merge``, ``save_model=False`` or ``shard``), so the run can
    still be extended to more steps exactly.

    How the directions are applied: ``forward`` / ``rank`` / ``per_example`` as in
    :class:`zoptim.ZOSGD`; ``in_place=True``: full-rank directions written into the weights
    (MeZO's way). ``in_place=None`` (the default) takes what the measurements recommend: with
    ``lora``, a decoder and ZOSGD on the loss objective, rank-4 per-example directions in the forward
    (:data:`zoptim.lm.train.LORA_PER_EXAMPLE_RANK`, ``rank=4, per_example=True``); else the
    directions stay in place unless ``forward`` or ``rank`` is given. After creation ``in_place``,
    ``rank`` and ``per_example`` hold what the run does.
    """

    model: str = "smollm2"
    method: str = "zosgd"
    dtype: str = "fp32"
    lora: bool = False
    merge: bool = False
    steps: int = 200
    batch_size: int = 8
    max_length: int = 64
    eval_every: int = 100
    checkpoint_every: int | None = None
    eval_examples: int = 200
    test_examples: int | None = None
    objective: str = "loss"
    lr: float | None = None
    eps: float | None = None
    eta_b: float = 50.0
    momentum: float = 0.0
    momentum_window: int = 8
    guard: float = 0.0
    hessian_smooth: float = 1e-6
    forward: bool = False  # directions applied inside the model's forward (implied by rank)
    rank: int | None = None
    per_example: bool = False
    in_place: bool | None = None  # None: the measured default (see above)
    orthogonalize: bool = False
    normalize_by_spread: bool = False
    sparse_embeddings: bool = False
    freeze_embeddings: bool = False
    shard: bool = False
    exact_restore: bool = True
    seed: int = 0
    save_model: bool = True
    keep_checkpoint: bool = False
    progress: bool = True

    def __post_init__(self):
        from .models import DTYPES

        self.method = str(self.method).lower()  # names are case-insensitive, as everywhere
        if self.method not in finetune_methods():
            raise ConfigError("method", f"must be one of {', '.join(finetune_methods())}; got {self.method!r}")
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", f"must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError("objective", f"must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        if self.objective == "accuracy" and self.method == "adamw":
            raise ConfigError("objective", "accuracy is not differentiable; use a zeroth-order {method}", method=None)
        if self.merge and not self.lora:
            raise ConfigError("merge", "merges LoRA adapters; it needs {lora}", lora=None)
        if self.shard and self.lora:  # LoRA adapters are small and stay whole
            raise ConfigError("shard", "shards the full model's weights; it does not combine with {lora}", lora=None)
        self._resolve_directions()
        if self.freeze_embeddings and self.lora:
            raise ConfigError("freeze_embeddings", "freezes the embedding block of a model whose weights are tuned; "
                              "with {lora} every base weight is frozen already", lora=None)
        options = {"momentum": self.momentum, "guard": self.guard, "module": self.forward, "rank": self.rank,
                   "per_example": self.per_example, "orthogonalize": self.orthogonalize,
                   "normalize_by_spread": self.normalize_by_spread, "sparse_embeddings": self.sparse_embeddings}
        missing = (next(((k, registry.names()) for k, v in options.items() if v), None) if self.method == "adamw"
                   else registry.unsupported(self.method, options))
        if missing:  # what each method offers comes from the registry
            field, methods = missing
            raise ConfigError(field, f"is an option of {registry.and_list(methods)}; got {{method}}", method=self.method)
        if not self.guard >= 0.0:
            raise ConfigError("guard", f"must be >= 0; got {self.guard}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError("momentum", f"must be in [0, 1); got {self.momentum}")
        try:  # the combinations of how directions are applied: checked where the optimizers check them
            check_options(Options(self.method, module=self.forward or self.rank is not None, rank=self.rank,
                                  per_example=self.per_example, orthogonalize=self.orthogonalize, shard=self.shard,
                                  sparse_embeddings=self.sparse_embeddings, momentum=bool(self.momentum)))
        except OptionError as err:
            raise ConfigError(err.field, err.detail, **err.refs) from None
        if self.per_example and self.objective == "accuracy":
            raise ConfigError("per_example", "needs a loss per example; {objective} is one number for the minibatch",
                              objective="accuracy")
        if self.normalize_by_spread and not self.per_example:  # a fine-tuning step has one direction, or B
            raise ConfigError("normalize_by_spread", "needs {per_example}: the step is divided by the standard "
                              "deviation of its B per-example deltas", per_example=None)
        if self.normalize_by_spread and self.orthogonalize:
            raise ConfigError("normalize_by_spread", "has no effect with {orthogonalize} (the polar factor does not "
                              "depend on the estimate's scale); use one of the two", orthogonalize=None)
        if self.shard:
            if self.method == "adamw":
                raise ConfigError("shard", "runs the zeroth-order methods; got {method}", method=self.method)
        for field, strict in (("lr", True), ("eps", True), ("eta_b", True), ("hessian_smooth", False)):
            try:
                check_positive(field, getattr(self, field), allow_none=True, allow_zero=not strict)
            except ValueError as err:
                raise ConfigError(field, str(err)[len(field) + 1:]) from None
        for field in ("steps", "batch_size", "eval_every", "eval_examples", "max_length", "checkpoint_every",
                      "test_examples", "rank", "momentum_window"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(field, f"must be >= 1; got {value}")

    def _resolve_directions(self) -> None:
        """Settle ``in_place`` (and with it the LoRA default's ``rank`` and ``per_example``)."""
        chosen = self.forward or self.rank is not None
        if self.in_place is None:
            # per-example directions need a loss per example; the accuracy objective is one number
            default_rank = LORA_PER_EXAMPLE_RANK.get(self.method) if self.lora and self.objective == "loss" else None
            if default_rank is not None and not chosen and _is_decoder(self.model):
                self.rank, self.per_example = default_rank, True
            self.in_place = not (self.forward or self.rank is not None)
        elif self.in_place and chosen:
            raise ConfigError("in_place", "writes full-rank directions into the weights; it does not combine with "
                              "{forward} or {rank}, which apply them inside the forward", forward=None, rank=None)
        elif not self.in_place and not chosen:
            raise ConfigError("in_place", "False needs the directions applied inside the forward: give {forward} or "
                              "{rank}", forward=None, rank=None)


def _is_decoder(model: str) -> bool:
    """Whether ``model`` (a known name or a local directory) is a decoder; False when it cannot be
    read (the command then refuses the model by name before anything runs)."""
    from .models import model_kind

    try:
        return model_kind(model) == "causal"
    except (OSError, ValueError):
        return False


def weights_changed(model, name: str, dtype) -> dict:
    """How far full-parameter tuning moved the weights: the fraction of scalars that differ from
    the pretrained ones (reloaded from disk, so no copy is held during training) and the largest
    change. In bfloat16 an update below half an ulp is lost; this shows whether any survived."""
    import torch

    from .models import load_model

    base, _ = load_model(name, dtype=dtype)
    ref = dict(base.named_parameters())
    changed = total = 0
    largest = 0.0
    with torch.no_grad():
        for n, p in model.named_parameters():
            q = ref[n].to(p.device)
            diff = p != q
            changed += int(diff.sum())
            total += p.numel()
            if diff.any():
                largest = max(largest, float((p.float() - q.float()).abs().max()))
    return {"fraction": changed / max(total, 1), "max_abs": largest}


def finished(run_dir: Path, steps: int) -> dict | None:
    """The result of the run in ``run_dir`` if it finished ``steps`` steps and its checkpoint was
    removed (nothing is left to train), else None. A finished run of another length without its
    checkpoint cannot be continued exactly: ValueError."""
    from .train import RESUME_FILE

    result_path = Path(run_dir) / "result.json"
    if not result_path.exists() or (Path(run_dir) / "checkpoint.pt").exists():
        return None
    result = json.loads(result_path.read_text())
    if result.get("steps") == steps:
        return result
    if (Path(run_dir) / RESUME_FILE).exists():  # the training state without the weights: it can continue
        return None
    raise ValueError(
        f"the run in {run_dir} finished {result.get('steps')} steps and its training checkpoint was removed (it was "
        "not saved in a form its weights can be read back from exactly: --merge, --no-save-model or --shard; a run "
        f"keeps it with keep_checkpoint / --keep-checkpoint), so it cannot continue to {steps} steps exactly; start "
        "a new run")


def _agreed(value: bool, collective: bool) -> bool:
    """``value`` as rank 0 sees it, on every rank when ``collective`` (so that all take the same branch)."""
    if not collective:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def finetune(config: FinetuneConfig, task, prompt, out, run_name: str | None = None, device="cpu",
             data_sha256: dict | None = None) -> dict | None:
    """Fine-tune ``config.model`` on ``task`` through ``prompt``; return the result record.

    Writes ``out/zero_shot.json`` (once per comparison), ``out/<run_name>/`` (log, checkpoint,
    ``result.json``, the exported model unless ``config.save_model`` is False) and the comparison's
    report (``out/report.md``). A run folder holding a checkpoint resumes from it. Under
    ``torch.distributed`` every rank trains its share of each minibatch and rank 0 writes; the
    other ranks return None.
    """
    import torch

    from ..distributed import rank_and_world
    from .models import apply_lora, freeze_embeddings, load_model, load_sharded, resolve, resolve_device, save_model
    from .prompts import PromptClassifier
    from .report import write_report
    from .train import Loop, LoopConfig, make_optimizer

    process_rank, world_size = rank_and_world()
    say = builtins.print if process_rank == 0 else (lambda *a, **k: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_name = run_name or config.method
    done = finished(out / run_name, config.steps)
    if done is not None:
        say(f"the run in {out / run_name} has finished its {done['steps']} steps (result.json); nothing to do. "
            "--resume --steps N extends it, --overwrite starts it over", flush=True)
        return done if process_rank == 0 else None
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if not config.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    test = task.test[: config.test_examples] if config.test_examples else task.test
    if config.shard:  # no process holds the whole model: built on the meta device, each rank reads its rows
        model, tokenizer = load_sharded(config.model, dtype=config.dtype, device=device)
    else:
        model, tokenizer = load_model(config.model, dtype=config.dtype)
    kind = resolve(config.model)[1]
    if config.lora:
        model = apply_lora(model, seed=config.seed)
    if config.freeze_embeddings:
        frozen = freeze_embeddings(model)
        say(f"embedding block frozen: {frozen:,} weights not tuned", flush=True)
    clf = PromptClassifier(model, tokenizer, prompt, kind=kind, max_length=config.max_length).to(device)
    truncated = {name: clf.count_truncated(split) for name, split in
                 (("train", task.train), ("validation", task.val), ("test", test))}
    if any(truncated.values()):
        say(f"note: texts longer than max_length {config.max_length} tokens are truncated "
            f"({'the beginning' if kind == 'causal' else 'the end'} is dropped): "
            + ", ".join(f"{n} of {len(s)} {name}" for (name, n), s in
                        zip(truncated.items(), (task.train, task.val, test))), flush=True)
    say(f"task {task.name}: {len(task.train)} train / {len(task.val)} validation / {len(test)} test examples, "
        f"classes {', '.join(task.classes)}; device {device}"
        + (f"; {world_size} processes ({'FSDP2-sharded' if config.shard else 'data parallel'})" if world_size > 1 else ""),
        flush=True)

    # a sharded model's forward is collective: every rank evaluates, rank 0 writes
    evaluates = process_rank == 0 or config.shard
    zero_path = out / "zero_shot.json"
    if evaluates and not _agreed(zero_path.exists(), config.shard):
        say("zero-shot evaluation ...", flush=True)
        zero = {"model": config.model, "task": task.name, "dtype": config.dtype, "test_examples": len(test),
                "test_accuracy": clf.accuracy(test), "val_accuracy": clf.accuracy(task.val[: config.eval_examples]),
                "data_sha256": data_sha256}
        if process_rank == 0:
            atomic_write_text(zero_path, json.dumps(zero, indent=2))
        if config.shard:  # the optimizer must not move shards under FSDP2's gathered copy
            from ..distributed import reshard

            reshard(clf)

    loop_config = LoopConfig(steps=config.steps, batch_size=config.batch_size, eval_every=config.eval_every,
                             eval_examples=config.eval_examples, objective=config.objective, seed=config.seed,
                             checkpoint_every=config.checkpoint_every)
    optimizer = make_optimizer(
        config.method, clf.parameters(), config.steps, lora=config.lora, lr=config.lr, eps=config.eps,
        eta_b=config.eta_b, seed=config.seed, exact_restore=config.exact_restore, momentum=config.momentum,
        momentum_window=config.momentum_window, hessian_smooth=config.hessian_smooth, guard=config.guard,
        module=clf if config.forward or config.rank is not None else None, rank=config.rank, per_example=config.per_example,
        orthogonalize=config.orthogonalize, normalize_by_spread=config.normalize_by_spread,
        sparse_embeddings=config.sparse_embeddings,
    )
    run_dir = out / run_name
    loop = Loop(clf, task, optimizer, loop_config, run_dir, progress=config.progress)
    start = time.perf_counter()
    log = loop.run()
    test_accuracy = clf.accuracy(test) if evaluates else None
    if process_rank != 0:
        return None
    group = optimizer.param_groups[0]
    result = {
        **{k: v for k, v in asdict(config).items() if k not in ("progress", "save_model", "merge")},
        "task": task.name,
        "device": str(device),
        "hessian_smooth": config.hessian_smooth if config.method == "hizoo" else None,
        "steps": loop.step,
        "queries": loop.queries,
        # the values the run used (the method's defaults filled in)
        "lr": group["lr"],
        "lr_rule": ("AS2P (S2P paper, Alg. 2): lr_k decays by cosine from this lr, times the automatic rate "
                    "1 / (eta_b sigma)") if config.method == "as2p" else "fixed",
        "eps": group.get("eps", config.eps),
        "val_accuracy": log[-1]["val_accuracy"],
        "test_accuracy": test_accuracy,
        "test_examples": len(test),
        "truncated": truncated,
        "nonfinite_losses": sum(1 for r in log if r["loss"] != r["loss"] or abs(r["loss"]) == float("inf")),
        "train_seconds": log[-1]["time"] if log else time.perf_counter() - start,
        "processes": world_size,
        "resumed_from_step": loop.resumed_from,
    }
    if config.shard:  # the tuned weights: the last checkpoint's sharded folder (nothing gathers the whole model)
        result["weights_changed"] = None
        if config.save_model:
            result["model_dir"] = str(loop.sharded_dir())
            say(f"tuned weights saved, sharded, in {loop.sharded_dir()} (torch.distributed.checkpoint; "
                "python -m torch.distributed.checkpoint.format_utils dcp_to_torch DIR FILE makes one file)",
                flush=True)
    elif not config.lora:
        result["weights_changed"] = weights_changed(clf.model, config.model, config.dtype)
    if config.save_model and not config.shard:
        from .models import KNOWN_MODELS

        base = {"base_model": config.model if config.model in KNOWN_MODELS else str(resolve(config.model)[0]),
                "base_model_path": str(resolve(config.model)[0])}
        where = save_model(clf, run_dir / "model", merge=config.merge,
                           extra={"task": task.name, "method": config.method, **base})
        result["model_dir"] = str(where)
        say(f"tuned model saved in {where}", flush=True)
    atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2))
    write_report(out)
    if not config.keep_checkpoint and process_rank == 0:  # everything is recorded: the weights need not be kept twice
        exact_export = config.save_model and not config.merge and not config.shard
        loop.slim(Path(result["model_dir"]) if exact_export else None)
    else:
        loop.resume_path.unlink(missing_ok=True)  # checkpoint.pt is the state; an older resume.pt must not linger
    say((out / "report.md").read_text())
    return result
