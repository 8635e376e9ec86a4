"""The ``zoptim`` command: ``zoptim bench`` and ``zoptim finetune``.

Each subcommand lives in its own module and registers itself with :func:`main`'s parser.
"""

from __future__ import annotations

import argparse
import sys


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
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt as interrupt:
        # one line, not a traceback: runs checkpoint as they go (and when interrupted), and the same command resumes them
        where = f" ({interrupt})" if str(interrupt) else ""
        print(f"zoptim {args.command}: interrupted{where}; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
