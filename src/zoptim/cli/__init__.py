"""The ``zoptim`` command: ``zoptim bench`` and ``zoptim finetune``.

Each subcommand lives in its own module and registers itself with :func:`main`'s parser.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings


@contextlib.contextmanager
def _one_line_warnings(command: str):
    """zoptim's own warnings about a run (it stopped learning, a step was skipped) as one line each,
    ``zoptim COMMAND: warning: ...``, printed above the progress bar (tqdm.write) instead of into it."""
    from ..optim.base import NonFiniteLossWarning
    from ..optim.stall import StallWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, (StallWarning, NonFiniteLossWarning)):
            return shown(message, category, filename, lineno, file, line)
        from tqdm.auto import tqdm

        tqdm.write(f"zoptim {command}: warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def main(argv: list[str] | None = None) -> int:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="zoptim", description="Train and fine-tune with forward passes only.")
    parser.add_argument("--version", action="version", version=f"zoptim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    from . import bench, finetune

    bench.register(sub)
    finetune.register(sub)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for a subcommand that relaunches itself
    from ..signals import Terminated, stop_signals

    try:
        with stop_signals(), _one_line_warnings(args.command):  # SIGTERM / SIGUSR1 are handled as Ctrl-C
            return int(args.run(args) or 0)
    except KeyboardInterrupt as interrupt:
        # one line, not a traceback: runs checkpoint as they go (and when interrupted), and the same command resumes them
        where = f" ({interrupt})" if str(interrupt) else ""
        how = f"stopped by {interrupt.name}" if isinstance(interrupt, Terminated) else "interrupted"
        from ..distributed import launched_rank_and_world

        if launched_rank_and_world()[0] == 0:  # under torchrun, rank 0 says it for the group
            print(f"zoptim {args.command}: {how}{where}; run the same command again to resume", file=sys.stderr,
                  flush=True)
        return interrupt.exit_code if isinstance(interrupt, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
