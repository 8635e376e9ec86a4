"""Checkpoint files: written atomically, read without running pickled code.

* :func:`atomic_save` writes ``torch.save(obj)`` to a temporary file in the target's folder,
  flushes it to disk and renames it over the target (``os.replace``, atomic on POSIX and
  Windows). A run killed mid-write leaves the previous checkpoint intact and at most a stray
  ``.<name>.*.tmp`` file, never a half-written checkpoint under the real name.
* :func:`safe_load` reads with ``torch.load(weights_only=True)``: tensors, numbers, strings and
  the standard containers only, so a checkpoint copied from elsewhere cannot run code. A
  truncated, corrupted or foreign file raises :class:`CheckpointError` naming the file and what to
  do; nothing else (logs, results) is touched.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch

__all__ = ["CheckpointError", "atomic_save", "atomic_write", "atomic_write_text", "safe_load", "share_as_umask"]


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, corrupted, or not a zoptim checkpoint)."""


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux), else set and reset."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_as_umask(path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the permissions a plain ``open`` /
    ``mkdir`` would have given it under the user's umask: ``tempfile.mkstemp`` and ``mkdtemp``
    create 0600 files and 0700 folders, which would keep a colleague from reading a tuned model."""
    mask = _umask()
    path = Path(path)
    for p in [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def atomic_write(path, write: Callable[[IO], None], mode: str = "wb") -> None:
    """Write ``path`` all or nothing: ``write(file)`` fills a temporary file with a unique name in
    the same folder, which is flushed to disk and renamed over ``path``. Processes writing one path
    at once never clash (the last rename wins; every reader sees one whole file). The file gets
    the permissions of the user's umask, as ``open`` would give it (not mkstemp's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` all or nothing (:func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_save(obj, path) -> None:
    """``torch.save(obj, path)``, all or nothing (:func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def safe_load(path, map_location="cpu", required_keys=()):
    """``torch.load(path, weights_only=True)`` with a clear :class:`CheckpointError` on failure.

    ``required_keys``: keys the loaded dict must hold (checked, so a checkpoint of something else
    is reported as such instead of failing later with a ``KeyError``).
    """
    path = Path(path)
    hint = "delete it (or restore a good copy) to start over"
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        text = str(err)
        # torch words it "Unsupported global" or "unsupported GLOBAL" (2.13) depending on the version
        detail = next((line.strip() for line in text.splitlines() if "unsupported" in line.lower()), "")
        if "unsupported global" in text.lower():
            raise CheckpointError(
                f"checkpoint {path} holds objects other than tensors and plain Python values, which zoptim "
                f"does not load (they could run code); {hint}. Detail: {detail}"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted (unpickling failed: {detail or text.splitlines()[0]}); {hint}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError) as err:
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted ({size} bytes; {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}); {hint}"
        ) from None
    missing = [k for k in required_keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a checkpoint of this kind: it lacks {missing}; {hint}")
    return obj
