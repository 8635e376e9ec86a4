"""Crash-safe files: every write goes to a temporary file first, then ``os.replace`` (atomic on POSIX)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..checkpoint import atomic_write_text


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; readers treat None as "no finite value"
    return value


def write_jsonl(path: Path, records: list[dict]) -> None:
    lines = [json.dumps({k: _clean(v) for k, v in r.items()}, sort_keys=False) for r in records]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
