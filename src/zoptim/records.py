"""Run records as JSON Lines, one policy for every run of zoptim (``zoptim bench`` and ``zoptim finetune``).

JSON has no NaN or infinity: a non-finite float is written as ``null`` (readers treat ``None`` as
"no finite value"; :func:`finite` turns it back into NaN for arithmetic). Whole files are written
atomically (:func:`zoptim.checkpoint.atomic_write_text`); a log that grows a line per step is
appended to, and a run resumed from a checkpoint rewrites it atomically up to that step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .checkpoint import atomic_write_text


def clean(value):
    """A value as JSON can hold it: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(record: dict) -> str:
    return json.dumps({k: clean(v) for k, v in record.items()})


def finite(value) -> float:
    """A logged number back as a float (None, the logged form of NaN/inf, is NaN)."""
    return math.nan if value is None else float(value)


def append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(dumps(record) + "\n")


def write(path: Path, records: list[dict]) -> None:
    """Replace ``path`` with ``records``, atomically."""
    atomic_write_text(Path(path), "".join(dumps(r) + "\n" for r in records))


def read(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
