"""``zoptim finetune``: fine-tune a language model with forward passes only (or AdamW, to compare).

    zoptim finetune --model smollm2 --task rt-sentiment --method as2p --steps 200 --lora --out runs/rt

Runs sharing ``--out`` form one comparison: each writes ``OUT/<run>/`` (log.jsonl, checkpoint.pt,
result.json) and then the report (``OUT/report.md``, ``report.json``, ``loss_vs_queries.png``,
``accuracy.png``) is regenerated from every run present. Zero-shot accuracy is computed once per
``OUT`` and cached in ``OUT/zero_shot.json``. A run killed midway resumes from its checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def register(sub) -> None:
    from ..lm.data import TASKS
    from ..lm.train import METHODS, OBJECTIVES

    p = sub.add_parser("finetune", help="fine-tune a language model with forward passes only")
    p.add_argument("--model", default="smollm2", help="smollm2, minilm or a local Hugging Face model directory")
    p.add_argument("--task", default="rt-sentiment", help=f"one of {', '.join(TASKS)}")
    p.add_argument("--method", default="as2p", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lora", action="store_true", help="tune LoRA adapters only (peft), base weights frozen")
    p.add_argument("--dtype", default="fp32", help="fp32 or bf16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64, help="longest prompt in tokens")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-examples", type=int, default=200, help="validation examples per periodic evaluation")
    p.add_argument("--test-examples", type=int, default=1000, help="test examples for the final accuracy (<= 1000)")
    p.add_argument("--objective", default="loss", help=f"one of {', '.join(OBJECTIVES)} (accuracy: minus argmax accuracy)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: per method, see zoptim.lm.train)")
    p.add_argument("--eps", type=float, default=None, help="smoothing parameter (the paper's rho, MeZO's epsilon)")
    p.add_argument("--eta-b", type=float, default=50.0, help="AS2P's eta_b (S2P paper Table 4: 50 for LLMs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-name", default=None, help="sub-directory of --out for this run (default: method)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="output directory shared by the runs of one comparison")
    p.set_defaults(run=run)


def check_args(args) -> None:
    from ..lm.data import TASKS
    from ..lm.models import DTYPES, KNOWN_MODELS
    from ..lm.train import METHODS, OBJECTIVES

    if args.method not in METHODS:
        raise SystemExit(f"zoptim finetune: --method must be one of {', '.join(METHODS)}; got {args.method!r}")
    if args.task not in TASKS:
        raise SystemExit(f"zoptim finetune: --task must be one of {', '.join(TASKS)}; got {args.task!r}")
    if args.model not in KNOWN_MODELS and not Path(args.model).is_dir():
        raise SystemExit(
            f"zoptim finetune: --model must be one of {', '.join(KNOWN_MODELS)} or a local directory; got {args.model!r}"
        )
    if args.dtype not in DTYPES:
        raise SystemExit(f"zoptim finetune: --dtype must be one of fp32, bf16; got {args.dtype!r}")
    if args.objective not in OBJECTIVES:
        raise SystemExit(f"zoptim finetune: --objective must be one of {', '.join(OBJECTIVES)}; got {args.objective!r}")
    if args.objective == "accuracy" and args.method == "adamw":
        raise SystemExit("zoptim finetune: --objective accuracy is not differentiable; use a zeroth-order --method")
    if not 1 <= args.test_examples <= 1000:
        raise SystemExit(f"zoptim finetune: --test-examples must be in [1, 1000]; got {args.test_examples}")
    for name in ("steps", "batch_size", "eval_every", "eval_examples", "max_length"):
        if getattr(args, name) < 1:
            raise SystemExit(f"zoptim finetune: --{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_args(args)
    from ..lm.data import load_task
    from ..lm.models import apply_lora, load_model, resolve
    from ..lm.prompts import PromptClassifier, get_prompt
    from ..lm.report import write_report
    from ..lm.train import Loop, LoopConfig, make_optimizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = load_task(args.task, seed=args.seed)
    test = task.test[: args.test_examples]
    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype)
    except ModuleNotFoundError as err:
        raise SystemExit(f"zoptim finetune: {err}") from None
    kind = resolve(args.model)[1]
    if args.lora:
        model = apply_lora(model, seed=args.seed)
    clf = PromptClassifier(model, tokenizer, get_prompt(args.task), kind=kind, max_length=args.max_length)

    zero_path = out / "zero_shot.json"
    if not zero_path.exists():
        print("zero-shot evaluation ...", flush=True)
        zero = {
            "model": args.model,
            "task": args.task,
            "dtype": args.dtype,
            "test_examples": len(test),
            "test_accuracy": clf.accuracy(test),
            "val_accuracy": clf.accuracy(task.val[: args.eval_examples]),
        }
        zero_path.write_text(json.dumps(zero, indent=2))

    config = LoopConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        eval_examples=args.eval_examples,
        objective=args.objective,
        seed=args.seed,
    )
    optimizer = make_optimizer(
        args.method, clf.parameters(), args.steps, lora=args.lora, lr=args.lr, eps=args.eps, eta_b=args.eta_b,
        seed=args.seed,
    )
    run_dir = out / (args.run_name or args.method)
    loop = Loop(clf, task, optimizer, config, run_dir, progress=not args.no_progress)
    start = time.perf_counter()
    log = loop.run()
    train_seconds = log[-1]["time"] if log else time.perf_counter() - start
    result = {
        "method": args.method,
        "model": args.model,
        "task": args.task,
        "lora": args.lora,
        "dtype": args.dtype,
        "steps": loop.step,
        "queries": loop.queries,
        "batch_size": args.batch_size,
        "lr": optimizer.param_groups[0]["lr"] if args.method != "as2p" else args.lr,
        "eps": args.eps,
        "objective": args.objective,
        "val_accuracy": log[-1]["val_accuracy"],
        "test_accuracy": clf.accuracy(test),
        "test_examples": len(test),
        "train_seconds": train_seconds,
    }
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    write_report(out)
    print((out / "report.md").read_text())
    return 0
