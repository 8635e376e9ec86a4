"""``zoptim finetune``: fine-tune a language model with forward passes only (or AdamW, to compare).

    zoptim finetune --model smollm2 --task rt-sentiment --method as2p --steps 200 --lora --out runs/rt

Own data: ``--train FILE [--validation FILE] [--test FILE]`` (JSONL, CSV or TSV) with
``--text-field``, ``--label-field`` and ``--labels "negative,positive"`` (default: the labels found in
the training file), instead of ``--task``.

Runs sharing ``--out`` form one comparison: each writes ``OUT/<run>/`` (log.jsonl, checkpoint.pt,
result.json, and the tuned model in ``model/``: ``save_pretrained`` safetensors + tokenizer, the
LoRA adapter with ``--lora``, the merged model with ``--lora --merge``) and then the report (``OUT/report.md``, ``report.json``, ``loss_vs_queries.png``,
``accuracy.png``) is regenerated from every run present. Zero-shot accuracy is computed once per
``OUT`` and cached in ``OUT/zero_shot.json``. A run killed midway resumes from its checkpoint;
Ctrl-C, SIGTERM and SIGUSR1 write one at the interruption (:mod:`zoptim.signals`). A finished run's
checkpoint is removed unless ``--keep-checkpoint`` (``resume.pt`` keeps the rest of its state, the
weights being read back from ``model/``); ``--resume --steps N`` extends a run (exactly, or
refused: see :func:`check_extension`).

Several processes: ``zoptim finetune --nproc 2 ...`` launches itself under ``torchrun
--standalone --nproc-per-node 2 --max-restarts 3`` (or run ``torchrun ... -m zoptim.cli finetune
...`` yourself). The run is data parallel (see :mod:`zoptim.lm.train`); rank 0 writes a checkpoint
every ``--checkpoint-every`` steps, and a worker that dies is restarted with the whole group from
that checkpoint, ending on the same parameters, bit for bit, as an uninterrupted run.
``--shard`` shards the weights across the processes instead (FSDP2, built with
:func:`zoptim.lm.models.load_sharded`: no process ever holds the whole model); validation runs on
every rank, each checkpoint's weights are a ``torch.distributed.checkpoint`` folder written shard
by shard (``shards-step<N>/``, named by ``checkpoint.pt``), and that folder is the tuned model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..checkpoint import atomic_write_text


def register(sub) -> None:
    from ..lm.data import TASKS
    from ..lm.train import OBJECTIVES, finetune_methods
    from .common import HelpFormatter

    p = sub.add_parser("finetune", help="fine-tune a language model with forward passes only",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, minilm or a local Hugging Face model directory")
    p.add_argument("--task", default=None, help=f"one of {', '.join(TASKS)} (default rt-sentiment; not with --train)")
    p.add_argument("--train", default=None, metavar="FILE", help="own training data: .jsonl, .csv or .tsv")
    p.add_argument("--validation", default=None, metavar="FILE", help="own validation data (default: 10%% of --train)")
    p.add_argument("--test", default=None, metavar="FILE", help="own test data (default: the validation data)")
    p.add_argument("--text-field", default="text", help="field / column holding the text (own data)")
    p.add_argument("--label-field", default="label", help="field / column holding the label (own data)")
    p.add_argument("--labels", default=None, help='class names in order, e.g. "negative,positive" (default: from the data)')
    p.add_argument("--template", default=None,
                   help="decoder prompt with {text}; \\n is a newline (own data default: '{text}\\nLabel:'); label words = ' <label>'")
    p.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda[:N] or mps")
    p.add_argument("--method", default="zosgd",
                   help=f"one of {', '.join(finetune_methods())} (zosgd, MeZO's method, is what the LM measurements recommend: README, 'Which method')")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (a zeroth-order step is 2 forward passes)")
    p.add_argument("--lora", action="store_true", help="tune LoRA adapters only (peft), base weights frozen")
    p.add_argument("--merge", action="store_true", help="with --lora: save the merged model instead of the adapter")
    p.add_argument("--no-save-model", action="store_true", help="do not write OUT/RUN/model/")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep OUT/RUN/checkpoint.pt once the run has finished. By default it is removed (it holds the "
                        "weights again) and the rest of the training state stays in OUT/RUN/resume.pt, the weights "
                        "being read back from OUT/RUN/model/, so --resume --steps N can still extend the run; with "
                        "--merge, --no-save-model or --shard nothing is kept and the run cannot be extended")
    p.add_argument("--no-exact-restore", action="store_true",
                   help="drop the exact-restore journal (MeZO's arithmetic undo; a control for bf16)")
    p.add_argument("--dtype", default="fp32", help="fp32 or bf16")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step")
    p.add_argument("--max-length", type=int, default=64, help="longest prompt in tokens")
    p.add_argument("--eval-every", type=int, default=100, help="steps between validation evaluations")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default: --eval-every)")
    p.add_argument("--nproc", type=int, default=None,
                   help="run N data-parallel processes under torchrun (each its share of every minibatch)")
    p.add_argument("--max-restarts", type=int, default=3, help="with --nproc: restarts of the group after a worker dies")
    p.add_argument("--shard", action="store_true",
                   help="with --nproc N: shard the weights across the processes with FSDP2 (built on the meta device, "
                        "each rank reads only its rows; checkpoints and the tuned model are sharded "
                        "torch.distributed.checkpoint folders) instead of a whole copy per process")
    p.add_argument("--eval-examples", type=int, default=200, help="validation examples per periodic evaluation")
    p.add_argument("--test-examples", type=int, default=None, help="test examples for the final accuracy (default: all)")
    p.add_argument("--objective", default="loss", help=f"one of {', '.join(OBJECTIVES)} (accuracy: minus argmax accuracy)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: per method, see zoptim.lm.train)")
    p.add_argument("--eps", type=float, default=None, help="smoothing parameter (the paper's rho, MeZO's epsilon)")
    p.add_argument("--eta-b", type=float, default=50.0, help="AS2P's eta_b (S2P paper Table 4: 50 for LLMs)")
    p.add_argument("--momentum", type=float, default=0.0,
                   help="zosgd / as2p: beta of the memory-free seed momentum (0: none)")
    p.add_argument("--momentum-window", type=int, default=8, help="steps in the seed momentum's window")
    p.add_argument("--guard", type=float, default=0.0,
                   help="zosgd / hizoo: tol of the loss guard, which halves lr when the smoothed loss rises (0: off; "
                        "try 0.02)")
    p.add_argument("--hessian-smooth", type=float, default=1e-6, help="hizoo: alpha, the Hessian estimate's EMA rate")
    p.add_argument("--forward", action="store_true",
                   help="apply the directions inside the model's forward (module=model): queries never write the "
                        "weights; full-rank directions unless --rank R (default: full-rank directions in place; "
                        "with --lora, zosgd and a decoder, --rank 4 --per-example)")
    p.add_argument("--in-place", action="store_true", default=None,
                   help="full-rank directions written into the weights (MeZO's way): the default, except for zosgd "
                        "with --lora on a decoder (and --objective loss), whose default is --rank 4 --per-example "
                        "(it reached in-place zosgd's final loss in 0.87x the queries on SmolLM2 TREC, "
                        "docs/benchmarks.md); this flag keeps them in place there")
    p.add_argument("--rank", type=int, default=None,
                   help="apply rank-R matrix directions inside the model's forward (module=model, rank=R; implies "
                        "--forward): a step costs about its two forwards")
    p.add_argument("--per-example", action="store_true",
                   help="zosgd / as2p with --rank: each example of the minibatch gets its own direction (B "
                        "directional derivatives per two forward passes; an encoder embeds its label sentences once "
                        "per example)")
    p.add_argument("--normalize-by-spread", action="store_true",
                   help="zosgd with --per-example: divide the step by the standard deviation of the B deltas (FZOO's "
                        "normalised step; --lr is then the step's length: try 1e-4 to 1e-3)")
    p.add_argument("--orthogonalize", action="store_true",
                   help="zosgd with --rank: each weight matrix steps along the polar factor of its estimate (root-mean-"
                        "square step = --lr); pays with --per-example (a rank-B estimate per matrix)")
    p.add_argument("--sparse-embeddings", action="store_true",
                   help="zosgd / as2p with --rank: an embedding matrix moves only in the rows the step's examples looked "
                        "up, each direction in its own examples' rows (unbiased; the other rows' estimate is noise). Not "
                        "with --momentum or --nproc")
    p.add_argument("--freeze-embeddings", action="store_true",
                   help="leave an encoder's embedding block (its parameters named *embeddings*: word, position and "
                        "token-type matrices, their LayerNorm) out of training; with --rank on MiniLM TREC it beat "
                        "tuning it (docs/benchmarks.md). Not with --lora")
    p.add_argument("--seed", type=int, default=0, help="seed of the directions, the data order and the split")
    p.add_argument("--run-name", default=None, help="sub-directory of --out for this run (default: method)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (transformers' included)")
    p.add_argument("--out", required=True, help="output directory shared by the runs of one comparison")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in OUT/RUN as it was configured (its recorded settings win over this "
                            "command's, except --steps: --resume --steps N extends a finished or interrupted run to N "
                            "steps, exactly as a run started with --steps N; refused for as2p and s2p, whose schedules "
                            "run over --steps)")
    again.add_argument("--overwrite", action="store_true", help="delete the run in OUT/RUN and start it again")
    p.set_defaults(run=run)


#: The arguments that define a run (recorded in OUT/RUN/config.json with the data files' SHA-256):
#: a folder holding a run with other values is never reused silently.
RUN_FIELDS = ("model", "task", "train", "validation", "test", "text_field", "label_field", "labels", "template",
              "method", "steps", "lora", "no_exact_restore", "dtype", "batch_size", "max_length", "eval_every",
              "checkpoint_every", "eval_examples", "objective", "lr", "eps", "eta_b", "momentum", "momentum_window",
              "guard", "hessian_smooth", "forward", "rank", "per_example", "in_place", "orthogonalize",
              "normalize_by_spread", "sparse_embeddings", "freeze_embeddings", "shard", "seed")


def recorded_config(run_dir: Path) -> dict:
    """The configuration recorded in ``run_dir``. A record from before ``in_place`` was a field
    ran its directions in place exactly when it had neither ``--forward`` nor ``--rank``."""
    saved = json.loads((run_dir / "config.json").read_text())
    saved.setdefault("in_place", saved.get("rank") is None and not saved.get("forward"))
    return saved


def run_config(args) -> dict:
    """What defines this run: the run fields and the content of the data files."""
    config = {name: getattr(args, name) for name in RUN_FIELDS}
    config["data_sha256"] = {flag: _sha256(getattr(args, flag))
                             for flag in ("train", "validation", "test") if getattr(args, flag) is not None}
    return config


_HASHES: dict[tuple, str] = {}


def _sha256(path) -> str:
    """The file's SHA-256, computed once per (path, size, modification time) in this process."""
    import hashlib

    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return _HASHES[key]


def started(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that has trained (a log or a checkpoint), not just its configuration."""
    return any((run_dir / f).exists() for f in ("checkpoint.pt", "resume.pt", "log.jsonl"))


def remove_unstarted(run_dir: Path) -> None:
    """After a failed start: remove the run folder if it holds nothing but its configuration, and
    ``--out`` with it if that leaves it empty."""
    if run_dir.is_dir() and not started(run_dir) and {p.name for p in run_dir.iterdir()} <= {"config.json"}:
        (run_dir / "config.json").unlink(missing_ok=True)
        run_dir.rmdir()
        if not any(run_dir.parent.iterdir()):
            run_dir.parent.rmdir()


def settle_run_folder(args, run_dir: Path, say=print) -> None:
    """Check ``run_dir`` against this command before any heavy work, in one line if it differs.

    A folder with no recorded run is started (its configuration written); one holding this very
    configuration is resumed; one holding another is refused, naming the differing fields, unless
    ``--resume`` (the recorded settings are used, if the data files are unchanged) or
    ``--overwrite`` (the folder is deleted first)."""
    import shutil

    out = run_dir.parent
    mine = run_config(args)
    zero_path = out / "zero_shot.json"
    if zero_path.exists():  # the comparison's zero-shot row: its runs share the model and the data
        zero = json.loads(zero_path.read_text())
        shared = {"model": args.model, "dtype": args.dtype, "data_sha256": mine["data_sha256"]}
        differ = [k for k, v in shared.items() if k in zero and zero[k] != v]
        if differ:
            said = {"model": f"it was made with --model {zero.get('model')}, not {args.model}",
                    "dtype": f"it was made with --dtype {zero.get('dtype')}, not {args.dtype}",
                    "data_sha256": "the data files changed since this comparison was made"}
            raise SystemExit(f"zoptim finetune: {out} holds a comparison whose runs this one cannot join: "
                             + "; ".join(said[k] for k in differ)
                             + f" (recorded in {zero_path}); give another --out")
    elif out.exists() and any(out.iterdir()) and not any(out.glob("*/config.json")):
        raise SystemExit(f"zoptim finetune: --out {out} holds files that are not zoptim runs; give another folder "
                         "(nothing there is overwritten)")
    config_path = run_dir / "config.json"
    if args.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
        say(f"--overwrite: deleted the previous run in {run_dir}")
    if config_path.exists():
        saved = recorded_config(run_dir)
        # a flag added after that run was recorded was off in it (e.g. --per-example, --shard)
        differ = [k for k in sorted(set(saved) | set(mine))
                  if saved.get(k) != mine.get(k) and not (k not in saved and mine.get(k) in (False, None))]
        if differ and not started(run_dir):
            say(f"note: {run_dir} held the configuration of a run that never trained; starting it with these settings")
        elif differ and args.resume and saved.get("data_sha256") == mine["data_sha256"]:
            changed = [k for k in differ if k not in ("data_sha256", "steps")]
            if changed:
                say(f"--resume: continuing the run in {run_dir} as it was configured (ignoring this command's "
                    + ", ".join(f"--{k.replace('_', '-')} {mine.get(k)!r}" for k in changed) + ")")
            for k in changed:
                setattr(args, k, saved[k])
            if "steps" in differ:  # --resume --steps N: the run's new length
                check_extension(saved, args.steps, run_dir)
                say(f"--resume --steps {args.steps}: the run in {run_dir} (--steps {saved.get('steps')}) continues "
                    f"to step {args.steps}, exactly as a run started with --steps {args.steps}")
        elif differ:
            shown = ", ".join(
                "the data files changed since that run was made" if k == "data_sha256" else f"--{k.replace('_', '-')} {saved.get(k)!r} -> {mine.get(k)!r}"
                for k in differ)
            hint = ("it cannot continue on other data; pass --overwrite to start over, or another "
                    "--run-name" if "data_sha256" in differ else
                    "pass --resume to continue that run as it was configured"
                    + (f" (--resume --steps {mine['steps']} extends it)" if "steps" in differ else "")
                    + ", --overwrite to start over, or another --run-name")
            from ..lm.train import LORA_PER_EXAMPLE_RANK

            default_rank = LORA_PER_EXAMPLE_RANK.get(args.method) if args.lora else None
            if saved["in_place"] and mine["per_example"] and default_rank is not None and args.rank == default_rank:
                hint += (f"; {args.method} with --lora now defaults to --rank {default_rank} --per-example, and that "
                         "run's directions were in place: --in-place runs it as it was")
            raise SystemExit(f"zoptim finetune: {run_dir} holds a run with other settings ({shown}); {hint}")
    elif started(run_dir):
        say(f"note: {run_dir} holds a run without a recorded configuration (an older zoptim's); its settings "
            "cannot be checked against this command's")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise SystemExit(f"zoptim finetune: {run_dir} exists and holds files that are not a zoptim run; give another "
                         "--out or --run-name (nothing there is overwritten)")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_path, json.dumps(run_config(args), indent=1))


def check_extension(saved: dict, steps: int, run_dir: Path) -> None:
    """Refuse ``--resume --steps N`` where the result would not be the run started with ``--steps
    N``: methods whose schedules are defined over the run's length (``total_steps``)."""
    from .. import records
    from ..optim import registry

    log = run_dir / "log.jsonl"
    trained = max((r["step"] for r in records.read(log)), default=0) if log.exists() else 0
    if trained > steps:
        raise SystemExit(f"zoptim finetune: --resume --steps {steps}: the run in {run_dir} has trained {trained} steps, "
                         f"more than the {steps} asked for; a run cannot be shortened (give --steps {trained} or more)")
    from ..lm.train import RESUME_FILE

    if (run_dir / "result.json").exists() and not any((run_dir / f).exists() for f in ("checkpoint.pt", RESUME_FILE)):
        raise SystemExit(
            f"zoptim finetune: --resume --steps {steps}: the run in {run_dir} finished and its training checkpoint "
            "was removed (its model was not saved in a form the weights can be read back from exactly: --merge, "
            "--no-save-model or --shard; a run keeps the checkpoint with --keep-checkpoint), so it cannot continue "
            f"exactly; start a new run with --steps {steps} (--overwrite, or another --run-name)")
    method = saved.get("method")
    if method in registry.names() and "total_steps" in registry.get(method).hyperparameters():
        what = ("AS2P's cosine decays of rho and lr run from step 0 to step total_steps" if method == "as2p" else
                f"{method}'s step size is set from total_steps")
        raise SystemExit(
            f"zoptim finetune: --resume --steps {steps}: the run in {run_dir} cannot be extended exactly: {what} "
            f"(= --steps {saved.get('steps')}), so every step it took would differ in a run of {steps} steps; "
            f"start a new run with --steps {steps} (--overwrite, or another --run-name)")


def finetune_config(args):
    """The run's :class:`~zoptim.lm.finetune.FinetuneConfig` from the flags; a bad value is one line
    naming the flag (the config checks the values, the command only words the message)."""
    from ..lm.finetune import ConfigError, FinetuneConfig

    try:
        config = FinetuneConfig(
            model=args.model, method=args.method, dtype=args.dtype, lora=args.lora, merge=args.merge,
            steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, eval_every=args.eval_every,
            checkpoint_every=args.checkpoint_every, eval_examples=args.eval_examples,
            test_examples=args.test_examples, objective=args.objective, lr=args.lr, eps=args.eps, eta_b=args.eta_b,
            momentum=args.momentum, momentum_window=args.momentum_window, guard=args.guard,
            hessian_smooth=args.hessian_smooth, forward=args.forward, rank=args.rank, per_example=args.per_example,
            in_place=args.in_place, orthogonalize=args.orthogonalize, normalize_by_spread=args.normalize_by_spread,
            sparse_embeddings=args.sparse_embeddings, freeze_embeddings=args.freeze_embeddings, shard=args.shard,
            exact_restore=not args.no_exact_restore, seed=args.seed, save_model=not args.no_save_model,
            keep_checkpoint=args.keep_checkpoint,
            progress=not args.no_progress,
        )
    except ConfigError as err:
        flag = lambda field: "--forward" if field == "module" else "--" + field.replace("_", "-")  # noqa: E731
        raise SystemExit("zoptim finetune: " + err.render(flag)) from None
    # what the run does is recorded, not the flags' defaults (a default may change between versions)
    args.in_place, args.rank, args.per_example = config.in_place, config.rank, config.per_example
    return config


def check_args(args) -> None:
    """Every flag checked before anything loads: the run's settings by its FinetuneConfig, the
    command's own (data files, --out, --device, processes) here."""
    from ..lm.data import TASKS
    from ..lm.models import DEVICES, KNOWN_MODELS

    args.config = finetune_config(args)
    args.method = args.config.method  # as written in the run folder's config (names are case-insensitive)
    if args.train is not None and args.task is not None:
        raise SystemExit("zoptim finetune: give either --task or --train FILE (own data), not both")
    if args.train is None:
        for flag in ("validation", "test", "labels"):
            if getattr(args, flag) is not None:
                raise SystemExit(f"zoptim finetune: --{flag} needs --train FILE (own data)")
        args.task = args.task or "rt-sentiment"
        if args.task not in TASKS:
            raise SystemExit(f"zoptim finetune: --task must be one of {', '.join(TASKS)}; got {args.task!r}")
    else:
        for flag in ("train", "validation", "test"):
            path = getattr(args, flag)
            if path is not None and not Path(path).is_file():
                raise SystemExit(f"zoptim finetune: --{flag} {path}: no such file")
    from .common import check_out_dir

    check_out_dir("finetune", "--out", args.out)
    if args.template is not None and "{text}" not in args.template:
        raise SystemExit(f"zoptim finetune: --template must contain {{text}}; got {args.template!r}")
    if args.device.split(":")[0] not in DEVICES:
        raise SystemExit(f"zoptim finetune: --device must be one of {', '.join(DEVICES)}; got {args.device!r}")
    if args.model not in KNOWN_MODELS and not Path(args.model).is_dir():
        raise SystemExit(
            f"zoptim finetune: --model must be one of {', '.join(KNOWN_MODELS)} or a local directory; got {args.model!r}"
        )
    if args.nproc is not None and args.nproc < 1:
        raise SystemExit(f"zoptim finetune: --nproc must be >= 1; got {args.nproc}")
    if args.max_restarts < 0:
        raise SystemExit(f"zoptim finetune: --max-restarts must be >= 0; got {args.max_restarts}")
    from ..distributed import launched_world_size

    world = args.nproc or launched_world_size()
    if args.shard and world < 2:
        raise SystemExit("zoptim finetune: --shard splits the weights across processes; it needs --nproc N >= 2 "
                         "(or torchrun)")
    if world > 1:
        if args.method == "adamw":
            raise SystemExit("zoptim finetune: several processes need a zeroth-order --method (adamw would need DDP)")
        if args.batch_size % world:
            raise SystemExit(
                f"zoptim finetune: --batch-size ({args.batch_size}) must be a multiple of the number of processes "
                f"({world}): each evaluates an equal share of every minibatch"
            )


def load_data(args):
    """(task, prompt) for a built-in --task or for own --train/--validation/--test files."""
    import dataclasses

    from ..lm.data import DataError, load_files, load_task
    from ..lm.prompts import get_prompt, prompt_for_labels

    if args.template is not None:  # a shell passes "\n" as backslash + n: make it the newline it means
        args.template = args.template.replace("\\n", "\n").replace("\\t", "\t")
    if args.train is None:
        task, prompt = load_task(args.task, seed=args.seed), get_prompt(args.task)
        if args.template is not None:
            prompt = dataclasses.replace(prompt, template=args.template)
        return task, prompt
    try:
        task = load_files(args.train, args.validation, args.test, text_field=args.text_field,
                          label_field=args.label_field, labels=args.labels, seed=args.seed,
                          name=Path(args.train).stem)
    except DataError as err:
        raise SystemExit(f"zoptim finetune: {err}") from None
    return task, prompt_for_labels(task.classes, args.template or "{text}\nLabel:")


def launch(args) -> int:
    """Run this same command under torchrun with ``--nproc`` processes (standalone: one machine)."""
    import subprocess
    import sys

    argv, skip = [], False
    for a in args.argv:
        if skip:
            skip = False
            continue
        if a in ("--nproc", "--max-restarts"):
            skip = True
            continue
        if a == "--overwrite":  # done once, here: a restarted worker must not delete the run's checkpoints
            continue
        if a.startswith(("--nproc=", "--max-restarts=")):
            continue
        argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           f"--max-restarts={args.max_restarts}", "-m", "zoptim.cli", *argv]
    print("launching: " + " ".join(cmd[1:]), flush=True)
    from ..signals import Terminated

    proc, stopped = subprocess.Popen(cmd), None
    while True:  # a stop signal goes on to torchrun, which passes it to every worker: they checkpoint together
        try:
            code = proc.wait()
            break
        except KeyboardInterrupt as interrupt:  # Ctrl-C reaches the whole process group itself
            if isinstance(interrupt, Terminated):
                stopped = interrupt
                proc.send_signal(interrupt.signum)
    # rank 0 has said where the group's checkpoint is; the exit status is the signal's, as for one process
    return stopped.exit_code if stopped is not None and code else code


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_args(args)
    from ..distributed import launched_rank_and_world, launched_world_size

    task, _ = load_data(args)  # data errors are one line before anything is written (and read again in _run)
    if args.batch_size > len(task.train):
        raise SystemExit(f"zoptim finetune: --batch-size {args.batch_size} is larger than the {len(task.train)} training "
                         "examples; give a smaller --batch-size")
    args.run_name = args.run_name or args.method
    run_dir = Path(args.out) / args.run_name
    if launched_rank_and_world()[0] == 0:  # under torchrun, rank 0 (or the launching process) settles the folder
        settle_run_folder(args, run_dir)
    elif args.resume and (run_dir / "config.json").exists():  # the other ranks take the settings rank 0 kept
        saved = recorded_config(run_dir)
        for k in RUN_FIELDS:  # but --steps, which --resume takes from the command (rank 0 may be rewriting the file)
            if k != "steps":
                setattr(args, k, saved.get(k, getattr(args, k)))
    args.config = finetune_config(args)  # again: with --resume the recorded settings are the run's
    if args.nproc is not None and args.nproc > 1 and launched_world_size() <= 1:
        return launch(args)
    from ..lm.models import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise SystemExit(f"zoptim finetune: --device: {err}") from None
    from ..distributed import init_from_env

    rank, world = init_from_env(device)
    try:
        code = _run(args, device, rank, world)
    except BaseException:
        if rank == 0:
            remove_unstarted(Path(args.out) / args.run_name)
        raise
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # no rank tears the group down while another still talks to it
        dist.destroy_process_group()
    return code


def _run(args, device, rank: int, world: int) -> int:
    from ..checkpoint import CheckpointError
    from ..lm.finetune import finetune

    task, prompt = load_data(args)
    try:
        finetune(args.config, task, prompt, args.out, args.run_name, device, data_sha256=run_config(args)["data_sha256"])
    except (CheckpointError, ModuleNotFoundError, ValueError) as err:  # ValueError: e.g. label words sharing a token
        raise SystemExit(f"zoptim finetune: {err}") from None
    return 0
