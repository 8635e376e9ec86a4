"""Issue 22: one run-record format for bench and lm: JSON Lines that strict JSON readers accept
(a non-finite number is written as null, read back as NaN where a number is expected)."""

from __future__ import annotations

import json
import math

import pytest

from zoptim import records


def strict(line: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(line, parse_constant=refuse)


def test_non_finite_values_are_written_as_null_and_the_file_is_strict_json(tmp_path):
    path = tmp_path / "log.jsonl"
    records.write(path, [{"step": 1, "loss": 0.5}, {"step": 2, "loss": float("nan")}])
    records.append(path, {"step": 3, "loss": float("inf"), "note": "x"})
    lines = path.read_text().splitlines()
    assert [strict(line)["loss"] for line in lines] == [0.5, None, None]
    back = records.read(path)
    assert back[2]["note"] == "x" and math.isnan(records.finite(back[1]["loss"])) and records.finite(0.5) == 0.5


def test_the_finetune_log_follows_it(tmp_path):
    pytest.importorskip("transformers")
    from test_lm import classifier, tiny_task
    from zoptim.lm.train import Loop, LoopConfig, make_optimizer, read_log

    clf = classifier("causal")
    opt = make_optimizer("zosgd", clf.parameters(), steps=3, lr=1e-2)
    loss = clf.loss
    clf.loss = lambda batch: float("nan") if opt.steps == 1 else loss(batch)  # step 2 is not finite
    log = Loop(clf, tiny_task(), opt, LoopConfig(steps=3, batch_size=4, eval_every=3, eval_examples=4), tmp_path,
               progress=False).run()
    assert math.isnan(log[1]["loss"]) and math.isfinite(log[2]["loss"]) and read_log(tmp_path / "log.jsonl")[0] == log[0]
    assert [strict(line)["loss"] is None for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [False, True, False]
