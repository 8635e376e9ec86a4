"""``zoptim bench``: run a benchmark suite, or rebuild the report of an existing output folder."""

from __future__ import annotations

import sys
from pathlib import Path


def _positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise SystemExit(f"zoptim bench: --{name} must be a positive integer; got {text!r}") from None
        if value <= 0:
            raise SystemExit(f"zoptim bench: --{name} must be a positive integer; got {text!r}")
        return value

    return parse


def _override(text):
    import math

    from ..bench.methods import HPARAM_KEYS  # imported here: it loads torch, which --help does not need

    key, sep, value = text.partition("=")
    if not sep or key not in HPARAM_KEYS:
        raise SystemExit(f"zoptim bench: --set takes KEY=VALUE with KEY in {', '.join(HPARAM_KEYS)}; got {text!r}")
    try:
        number = float(value)
    except ValueError:
        raise SystemExit(f"zoptim bench: --set {key} must be a number; got {value!r}") from None
    if not (number > 0 and math.isfinite(number)):
        raise SystemExit(f"zoptim bench: --set {key} must be a finite number > 0; got {value!r}")
    return key, number


def register(sub) -> None:
    from .common import HelpFormatter

    p = sub.add_parser("bench", help="compare zeroth-order optimizers at equal query budgets",
                       formatter_class=HelpFormatter,
                       description="Run a benchmark suite (quick | paper | methods | methods-quick | methods-paper | methods-lm | "
                                   "methods-lm-search | lowrank-quick | lowrank-paper | lowrank-lm | perexample-quick | perexample-paper | perexample-lm | "
                                   "orth-quick | orth-paper | orth-mlp | orth-lm | softmax | ablations | blackbox) or rebuild a report.")
    p.add_argument("--suite", help="quick (the demo), paper, methods (HiZOO, seed momentum, loss guard) on cheap problems, methods-quick and "
                                   "methods-paper (the same on the quick and paper suites' pre-trained networks, with search), methods-lm "
                                   "(the LM task, defaults) and methods-lm-search (MiniLM / TREC, every LM method searched), lowrank-quick, "
                                   "lowrank-paper and lowrank-lm (forward-applied low-rank directions against GA), perexample-quick, perexample-paper and "
                                   "perexample-lm (one direction per example), orth-quick, orth-paper, orth-mlp and orth-lm (the per-example "
                                   "estimate averaged, divided by its spread or orthogonalised), softmax, ablations or blackbox (zoptim vs nevergrad, "
                                   "CMA-ES, scipy, torchzero on functions of a vector)")
    p.add_argument("--quick", action="store_true", help="blackbox suite only: a smoke run (3 small problems, 300 evaluations)")
    p.add_argument("--methods", nargs="+", help="override the suite's methods (see zoptim.bench.RECIPES)")
    p.add_argument("--problems", nargs="+", help="override the suite's problems (see zoptim.problems.PROBLEMS)")
    p.add_argument("--seeds", type=_positive_int("seeds"), help="number of seeds (0..N-1)")
    p.add_argument("--budget", type=_positive_int("budget"), help="function queries per run")
    p.add_argument("--evals", type=_positive_int("evals"), help="full-loss evaluations per run (default: the suite's)")
    p.add_argument("--set", dest="overrides", nargs="+", metavar="KEY=VALUE", type=_override,
                   help="hyper-parameters for every method instead of the problem's defaults, e.g. --set lr=3e-4 "
                        "(any key a method reads, zoptim.bench.methods.HPARAM_KEYS; not with a suite that searches)")
    p.add_argument("--out", type=Path, help="output folder (raw/*.jsonl, summary.md, *.png)")
    p.add_argument("--report", type=Path, metavar="DIR", help="rebuild summary.md and plots from DIR and exit")
    p.set_defaults(run=main)


def main(args) -> int:
    import os

    import torch

    from ..bench import build_report, run_suite

    # Small models: one intra-op thread is ~10x faster than oversubscribed cores on a shared machine.
    torch.set_num_threads(int(os.environ.get("ZOPTIM_BENCH_THREADS", "1")))

    from ..checkpoint import CheckpointError
    from .common import check_out_dir

    check_out_dir("bench", "--out", args.out)
    if args.report is not None and not args.report.is_dir():
        raise SystemExit(f"zoptim bench: --report {args.report}: no such folder (give the --out folder of a run)")
    if args.report is not None:
        if (args.report / "blackbox.json").exists():
            from ..bench.blackbox import build_report as build_blackbox_report

            build_report = build_blackbox_report  # noqa: F811
        print(_table_only(build_report(args.report)))
        print(f"wrote {args.report / 'summary.md'}")
        return 0
    if args.suite is None:  # --suite and --out are optional only because --report DIR needs neither
        from ..bench import SUITES

        given = [f"--{name}" for name in ("methods", "problems", "seeds", "budget", "evals", "set")
                 if getattr(args, "overrides" if name == "set" else name) is not None]
        what = f"{' and '.join(given)} override{'s' if len(given) == 1 else ''} a suite's settings: " if given else ""
        raise SystemExit(f"zoptim bench: {what}give --suite NAME (one of {', '.join(SUITES)}) to run a benchmark, "
                         "or --report DIR to rebuild the report of one")
    if args.out is None:
        raise SystemExit(f"zoptim bench: --suite {args.suite} needs --out DIR (the folder its runs and report go to)")
    try:
        from ..checkpoint import safe_load

        for ckpt in sorted((args.out / "checkpoints").glob("*.pt")):  # unreadable ones refused before any run
            safe_load(ckpt)
        run_suite(args.suite, args.out, methods=args.methods, problems=args.problems, seeds=args.seeds,
                  budget=args.budget, num_evals=args.evals, hparams=dict(args.overrides or []), log=lambda msg: print(msg, file=sys.stderr, flush=True), quick=args.quick)
    except (ValueError, FileNotFoundError, ImportError, CheckpointError) as err:
        raise SystemExit(f"zoptim bench: {err}") from None
    from ..distributed import launched_rank_and_world

    if launched_rank_and_world()[0] != 0:
        return 0  # under torchrun, rank 0 writes the report once every rank's runs are in
    if args.suite == "blackbox":
        from ..bench.blackbox import build_report as build_blackbox_report

        build_report = build_blackbox_report  # noqa: F811
    text = build_report(args.out)
    print(_table_only(text))
    print(f"wrote {args.out / 'summary.md'} and plots in {args.out}")
    return 0


def _table_only(markdown: str) -> str:
    """The report without image links, for the terminal."""
    return "\n".join(line for line in markdown.splitlines() if not line.startswith("!["))
