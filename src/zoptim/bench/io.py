"""Crash-safe files: every write goes to a temporary file first, then ``os.replace`` (atomic on POSIX)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; readers treat None as "no finite value"
    return value


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` all or nothing: a temporary file with a unique name in the same
    folder, renamed over ``path``, so processes writing one path at once never clash (the last
    rename wins, and every reader sees one whole file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: Path, records: list[dict]) -> None:
    lines = [json.dumps({k: _clean(v) for k, v in r.items()}, sort_keys=False) for r in records]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
