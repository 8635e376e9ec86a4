"""What every training loop of zoptim shares: seeded minibatch draws and the progress bar.

The loops are ``zoptim bench``'s harness (:mod:`zoptim.bench.harness`), ``zoptim finetune``'s
(:class:`zoptim.lm.train.Loop`) and :func:`zoptim.minimize`. Their checkpoints share
:mod:`zoptim.checkpoint` (atomic writes, ``weights_only`` reads) and their logs
:mod:`zoptim.records`.
"""

from __future__ import annotations

import torch


def minibatch(n: int, batch_size: int, generator: torch.Generator, replace: bool = False) -> torch.Tensor:
    """The indices of one minibatch of ``batch_size`` among ``n`` examples, drawn with ``generator``
    (never the global RNG, so a checkpoint of the generator's state resumes the same draws):
    without replacement (the bench's fixed datasets) or with it (``replace=True``: MeZO's sampling
    of language-model examples)."""
    if replace:
        return torch.randint(n, (batch_size,), generator=generator)
    return torch.randperm(n, generator=generator)[:batch_size]


def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0, unit: str = "step"):
    """A tqdm bar on stderr (``tqdm.auto``), gone when it closes; a no-op when not ``enabled``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, leave=False, unit=unit)
