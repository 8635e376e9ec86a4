"""Issue 35: long runs people can leave alone: stop signals, extension, honest records, shareable
outputs, a word when a run stops learning, and the nits found on the way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import zoptim
from zoptim.cli import main

SRC = str(Path(zoptim.__file__).resolve().parents[1])


# -- zoptim bench's message for a missing --suite ------------------------------------------------------
def test_bench_without_a_suite_says_what_is_missing_not_that_optional_flags_are(tmp_path):
    with pytest.raises(SystemExit) as err:
        main(["bench", "--methods", "nosuch", "--out", str(tmp_path / "x")])
    text = str(err.value)
    assert "give --suite and --out" not in text
    assert "--methods overrides a suite's settings: give --suite NAME (one of quick," in text and "--report DIR" in text
    with pytest.raises(SystemExit, match=r"--suite quick needs --out DIR"):
        main(["bench", "--suite", "quick"])
    assert not (tmp_path / "x").exists()


# -- torch's OneCycleLR on ZOSGD / AS2P ---------------------------------------------------------------
def test_one_cycle_lr_runs_on_zosgd_and_as2p_and_drives_seed_momentum_when_there_is_one():
    x = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    for opt in (zoptim.ZOSGD([x], lr=1e-2), zoptim.AS2P([x], total_steps=10)):
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)  # torch's defaults
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                opt.step(lambda: (x ** 2).sum())
                schedule.step()
        said = [str(w.message) for w in caught if "cycle_momentum" in str(w.message)]
        assert len(said) == 1 and "built without seed momentum" in said[0]  # once, saying what to do
        assert opt.param_groups[0]["lr"] != 1e-2 / 25  # the lr schedule moved on
    opt = zoptim.ZOSGD([x], lr=1e-2, momentum=0.9)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)
    for _ in range(3):
        opt.step(lambda: (x ** 2).sum())
        schedule.step()
    opt.step(lambda: (x ** 2).sum())
    assert opt.momentum.beta == opt.param_groups[0]["momentum"] != 0.9  # the cycle drives the seed momentum's beta
    quiet = zoptim.ZOSGD([x], lr=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(quiet, max_lr=1e-2, total_steps=10, cycle_momentum=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.step(lambda: (x ** 2).sum())
        schedule.step()


# -- fine-tuning runs: tiny models, own data ----------------------------------------------------------
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_lm_io import data_files, save_tiny  # noqa: E402,F401 - data_files is a fixture

FLAGS = ["--text-field", "review", "--label-field", "sentiment", "--template", "Review: {text}\\nSentiment:",
         "--batch-size", "4", "--eval-every", "3", "--eval-examples", "4", "--max-length", "16", "--lr", "1e-3",
         "--eps", "1e-2", "--no-progress"]


def command(model_dir, files, out, *extra, steps=6):
    return ["finetune", "--model", str(model_dir), "--train", str(files["train"]), "--validation",
            str(files["validation"]), "--test", str(files["test"]), *FLAGS, "--steps", str(steps), "--out", str(out),
            *extra]


def tuned(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    model = run_dir / "model"
    return load_file(model / ("adapter_model.safetensors" if (model / "adapter_model.safetensors").exists()
                              else "model.safetensors"))


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


#: the command, in a process of its own, with every loss evaluation slowed down (so that a signal
#: lands inside a step, between its queries, as it does in a real run)
SLOW = ("import sys, time\n"
        "from zoptim.lm.prompts import PromptClassifier\n"
        "loss = PromptClassifier.loss\n"
        "def slow(self, batch):\n"
        "    time.sleep(0.05)\n"
        "    return loss(self, batch)\n"
        "PromptClassifier.loss = slow\n"
        "from zoptim.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")


def logged_steps(log: Path) -> int:
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return 0
    return len([line for line in lines if line.endswith("}")])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_checkpoints_says_how_to_resume_and_the_resumed_run_is_bit_identical(tmp_path, data_files, sig):
    model_dir = save_tiny("causal", tmp_path / "tiny")
    assert main(command(model_dir, data_files, tmp_path / "whole", steps=8)) == 0
    args = command(model_dir, data_files, tmp_path / "out", "--checkpoint-every", "100", steps=8)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", SLOW, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = tmp_path / "out" / "zosgd" / "log.jsonl"
    deadline = time.monotonic() + 60
    while logged_steps(log) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.03)  # inside the next step's queries
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"zoptim finetune: stopped by {signal.Signals(sig).name} (checkpoint saved at step ")
    assert str(tmp_path / "out" / "zosgd" / "checkpoint.pt") in lines[0] and "run the same command again" in lines[0]
    step = int(lines[0].split("checkpoint saved at step ")[1].split()[0])
    assert 2 <= step < 8
    # the same command resumes from there and ends where the uninterrupted run ended, bit for bit
    assert main(args) == 0
    result = json.loads((tmp_path / "out" / "zosgd" / "result.json").read_text())
    assert result["resumed_from_step"] == step and result["queries"] == 16
    assert_same(tuned(tmp_path / "out" / "zosgd"), tuned(tmp_path / "whole" / "zosgd"))


def test_outputs_follow_the_users_umask_and_an_adapter_names_a_base_that_resolves_elsewhere(tmp_path, data_files,
                                                                                          monkeypatch, recwarn):
    """Files as open() would make them under the umask (atomic writes included, not mkstemp's 0600),
    folders as mkdir would; a LoRA adapter of "smollm2" records "smollm2" (this machine's cache path
    as a hint), so it loads where that cache is elsewhere; no transformers FutureWarning."""
    from zoptim.lm import models
    from zoptim.lm.models import load_classifier

    here = save_tiny("causal", tmp_path / "cache-here")
    monkeypatch.setattr(models, "smollm2_dir", lambda: here)  # "smollm2", converted into this machine's cache
    old = os.umask(0o027)
    try:
        args = command("smollm2", data_files, tmp_path / "out", "--lora", steps=2)
        assert main(args) == 0
        assert main(command("smollm2", data_files, tmp_path / "out", "--lora", "--keep-checkpoint", "--run-name", "kept",
                            steps=2)) == 0
    finally:
        os.umask(old)
    out = tmp_path / "out"
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert "kept/checkpoint.pt" in modes and "zosgd/model/adapter_model.safetensors" in modes
    wrong = {p: oct(m) for p, m in modes.items() if m != (0o750 if (out / p).is_dir() else 0o640)}
    assert not wrong, wrong
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)], [str(w.message) for w in recwarn]
    # the adapter's base is the model's name; zoptim_prompt.json keeps this machine's path as a hint
    saved = out / "zosgd" / "model"
    assert json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"] == "smollm2"
    assert json.loads((saved / "zoptim_prompt.json").read_text())["base_model_path"] == str(here)
    # on "another machine" the cache is elsewhere: the adapter loads on it, with the same outputs
    before = load_classifier(saved)
    elsewhere = tmp_path / "cache-there"
    here.rename(elsewhere)
    monkeypatch.setattr(models, "smollm2_dir", lambda: elsewhere)
    after = load_classifier(saved)
    from test_lm_io import logits

    torch.testing.assert_close(logits(after), logits(before), rtol=0, atol=0)
