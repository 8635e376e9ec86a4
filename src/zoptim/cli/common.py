"""What the subcommands share: the help format and the checks of output folders."""

from __future__ import annotations

import argparse
from pathlib import Path


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except where there is none to show (None, a switch)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def check_out_dir(command: str, flag: str, path) -> None:
    """Refuse, in one line and before any work, an output folder that is an existing file."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise SystemExit(f"zoptim {command}: {flag} {path} is a file; give a folder (it is created if missing)")
