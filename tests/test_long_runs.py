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


# -- a word when a run stops learning (zoptim.optim.stall) ---------------------------------------------
def rosenbrock(x):
    x = torch.as_tensor(x)
    return float((100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum())


def stalls(caught) -> list[str]:
    from zoptim.optim.stall import StallWarning

    return [str(w.message) for w in caught if issubclass(w.category, StallWarning)]


def drive(at, steps):
    for _ in range(steps):
        at.tell(rosenbrock(at.ask()))
        while at.in_step:
            at.tell(rosenbrock(at.ask()))


def test_ask_tell_warns_once_when_the_iterate_runs_away_and_once_when_its_step_size_falls_to_zero():
    """The issue's run: ZOSGD at lr 1e-2 on Rosenbrock reaches 2.4e95 and then sits still."""
    import numpy as np

    at = zoptim.AskTell("zosgd", np.zeros(10), lr=1e-2, num_directions=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drive(at, 60)
    said = stalls(caught)
    assert len(said) == 2 and all("\n" not in m for m in said), said
    assert said[0].startswith("ZOSGD has run away: every loss of the last 10 steps") and "status 5" in said[0]
    assert said[1].startswith("ZOSGD's step size has been 0 for 20 steps in a row") and "eps is below" in said[1]
    assert at.optimizer.last_stats["step_size"] == 0.0
    with warnings.catch_warnings(record=True) as caught:  # once: not again however long it goes on
        warnings.simplefilter("always")
        drive(at, 30)
    assert stalls(caught) == []


def test_step_warns_when_a_schedule_has_ended_and_steps_continue_and_when_lr_is_zero():
    x = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = zoptim.AS2P([x], total_steps=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(8):
            opt.step(lambda: (x ** 2).sum())
    said = stalls(caught)
    assert said == ["AS2P took step 6, past total_steps=5: its schedules over total_steps have ended (lr now 0.0); "
                    "give total_steps the run's real length"]
    opt = zoptim.ZOSGD([x], lr=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(25):
            opt.step(lambda: (x ** 2).sum())
    assert [m.split(":")[1].strip() for m in stalls(caught)] == ["its lr is 0; the parameters no longer move"]
    # a run that learns says nothing
    opt = zoptim.ZOSGD([x], lr=1e-2, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(50):
            opt.step(lambda: (x ** 2).sum())
    assert stalls(caught) == []


def test_minimize_keeps_its_status_and_the_optimizer_warns_even_where_minimize_does_not_stop():
    import numpy as np

    from zoptim.blackbox import DIVERGED_STEPS
    from zoptim.optim import stall

    assert stall.DIVERGED_STEPS == DIVERGED_STEPS  # the same rule
    options = {"lr": 1e-2, "num_directions": 4, "maxfev": 2000}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = zoptim.minimize(rosenbrock, np.zeros(10), method="zosgd", options=options)
    assert result.status == 5 and "diverged" in result.message
    assert len(stalls(caught)) == 1 and "has run away" in stalls(caught)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = zoptim.minimize(rosenbrock, np.zeros(10), method="zosgd", options={**options, "divergence": None})
    assert result.status == 1  # ran its budget, as asked; the warnings said it had stopped learning
    assert [m.split(" ")[1] for m in stalls(caught)] == ["has", "step"]


# -- fine-tuning runs: tiny models, own data ----------------------------------------------------------
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_lm import TEXTS  # noqa: E402
from test_lm_io import LABELS, save_tiny, write_jsonl  # noqa: E402


@pytest.fixture
def data_files(tmp_path):
    rows = [{"review": t, "sentiment": LABELS[y]} for t, y in TEXTS]
    return {"train": write_jsonl(tmp_path / "train.jsonl", rows),
            "validation": write_jsonl(tmp_path / "val.jsonl", rows[:4]),
            "test": write_jsonl(tmp_path / "test.jsonl", rows[4:])}


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


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_outputs_follow_the_users_umask_atomic_writes_and_model_folders_included(tmp_path, data_files, umask_027):
    """Files as open() would make them under the umask (not mkstemp's 0600), folders as mkdir would."""
    from zoptim.checkpoint import atomic_save, atomic_write_text

    atomic_save({"step": 1}, tmp_path / "a" / "checkpoint.pt")
    atomic_write_text(tmp_path / "a" / "result.json", "{}")
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "a").iterdir()} == {
        "checkpoint.pt": "0o640", "result.json": "0o640"}
    model_dir = save_tiny("causal", tmp_path / "tiny")
    for extra in ([], ["--lora"]):
        assert main(command(model_dir, data_files, tmp_path / "out", "--run-name", "lora" if extra else "full",
                            "--checkpoint-every", "1", *extra, steps=2)) == 0
    out = tmp_path / "out"
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert {"full/model/model.safetensors", "lora/model/adapter_model.safetensors", "report.md",
            "full/result.json", "zero_shot.json"} <= set(modes)
    wrong = {p: oct(m) for p, m in modes.items() if m != (0o750 if (out / p).is_dir() else 0o640)}
    assert not wrong, wrong


def test_an_adapter_names_a_base_that_resolves_on_another_machine_and_no_future_warning_is_printed(
        tmp_path, data_files, monkeypatch, recwarn):
    """A LoRA adapter of "smollm2" records "smollm2" (this machine's cache path as a hint), so it
    loads where that cache is elsewhere; peft's FutureWarning about transformers is not printed."""
    from zoptim.lm import models
    from zoptim.lm.models import load_classifier

    here = save_tiny("causal", tmp_path / "cache-here")
    monkeypatch.setattr(models, "smollm2_dir", lambda: here)  # "smollm2", converted into this machine's cache
    assert main(command("smollm2", data_files, tmp_path / "out", "--lora", steps=2)) == 0
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)], [str(w.message) for w in recwarn]
    saved = tmp_path / "out" / "zosgd" / "model"
    assert json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"] == "smollm2"
    assert json.loads((saved / "zoptim_prompt.json").read_text())["base_model_path"] == str(here)
    before = load_classifier(saved)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)], [str(w.message) for w in recwarn]
    # on "another machine" the cache is elsewhere: the adapter loads on it, with the same outputs
    elsewhere = tmp_path / "cache-there"
    here.rename(elsewhere)
    monkeypatch.setattr(models, "smollm2_dir", lambda: elsewhere)
    after = load_classifier(saved)
    from test_lm_io import logits

    torch.testing.assert_close(logits(after), logits(before), rtol=0, atol=0)


# -- extending a run; the finished run's checkpoint ---------------------------------------------------
def test_resume_steps_extends_a_run_exactly_and_refuses_where_the_schedules_run_over_its_length(
        tmp_path, data_files, capsys):
    model_dir = save_tiny("causal", tmp_path / "tiny")
    assert main(command(model_dir, data_files, tmp_path / "whole", steps=6)) == 0
    out = tmp_path / "out"
    assert main(command(model_dir, data_files, out, "--keep-checkpoint", steps=4)) == 0
    # a new length without --resume: refused, saying how to extend
    with pytest.raises(SystemExit, match=r"other settings \(--steps 4 -> 6\); pass --resume .*\(--resume --steps 6 "
                                         r"extends it\)"):
        main(command(model_dir, data_files, out, steps=6))
    capsys.readouterr()
    assert main(command(model_dir, data_files, out, "--resume", "--keep-checkpoint", steps=6)) == 0
    said = capsys.readouterr().out
    assert "--resume --steps 6: the run in" in said and "continues to step 6" in said and "resuming from step 4" in said
    assert json.loads((out / "zosgd" / "config.json").read_text())["steps"] == 6
    result = json.loads((out / "zosgd" / "result.json").read_text())
    assert result["steps"] == 6 and result["queries"] == 12 and result["resumed_from_step"] == 4
    assert_same(tuned(out / "zosgd"), tuned(tmp_path / "whole" / "zosgd"))  # the run started with --steps 6
    assert [r["step"] for r in map(json.loads, (out / "zosgd" / "log.jsonl").read_text().splitlines())] == list(range(1, 7))
    # shortening below what was trained is refused
    with pytest.raises(SystemExit, match=r"has trained 6 steps, more than the 5 asked for"):
        main(command(model_dir, data_files, out, "--resume", steps=5))
    # AS2P: its cosine decays run over --steps, so an extension could not be exact
    assert main(command(model_dir, data_files, out, "--method", "as2p", "--keep-checkpoint", steps=4)) == 0
    with pytest.raises(SystemExit, match=r"--resume --steps 6: the run in .*as2p cannot be extended exactly: AS2P's "
                                         r"cosine decays of rho and lr run from step 0 to step total_steps"):
        main(command(model_dir, data_files, out, "--method", "as2p", "--resume", steps=6))


def test_a_finished_run_drops_its_checkpoint_unless_kept_yet_extends_exactly_and_is_never_restarted(
        tmp_path, data_files, capsys):
    """The checkpoint of a finished run (the weights again) is removed; resume.pt keeps the rest of
    the training state and the weights are read back from model/, so --resume --steps still
    extends it bit for bit. Where the export cannot give the weights back (--no-save-model,
    --merge) nothing is kept and an extension is refused, saying why."""
    model_dir = save_tiny("causal", tmp_path / "tiny")
    assert main(command(model_dir, data_files, tmp_path / "whole", steps=6)) == 0
    out = tmp_path / "out"
    args = command(model_dir, data_files, out, steps=4)
    assert main(args) == 0
    run = out / "zosgd"
    assert not (run / "checkpoint.pt").exists() and (run / "model" / "model.safetensors").exists()
    from zoptim.checkpoint import safe_load

    state = safe_load(run / "resume.pt")
    assert state["trainable"] == {} and state["trainable_in"] == "model" and state["step"] == 4  # no weights
    log, model = (run / "log.jsonl").read_bytes(), (run / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(args) == 0  # the same command: nothing to do, nothing rewritten
    assert "has finished its 4 steps (result.json); nothing to do" in capsys.readouterr().out
    assert (run / "log.jsonl").read_bytes() == log and (run / "model" / "model.safetensors").read_bytes() == model
    assert main(command(model_dir, data_files, out, "--resume", steps=6)) == 0
    assert f"resuming from step 4 ({run / 'resume.pt'})" in capsys.readouterr().out
    assert_same(tuned(run), tuned(tmp_path / "whole" / "zosgd"))  # = the run started with --steps 6
    assert json.loads((run / "result.json").read_text())["resumed_from_step"] == 4
    # LoRA: the adapter gives its tensors back too
    assert main(command(model_dir, data_files, out, "--lora", "--run-name", "lora", steps=2)) == 0
    assert (out / "lora" / "resume.pt").exists() and not (out / "lora" / "checkpoint.pt").exists()
    assert main(command(model_dir, data_files, out, "--lora", "--run-name", "lora", "--resume", steps=3)) == 0
    # nothing to read the weights back from: nothing kept, and an extension says why it cannot be
    assert main(command(model_dir, data_files, out, "--no-save-model", "--run-name", "bare", steps=2)) == 0
    assert not [p for p in (out / "bare").iterdir() if p.suffix == ".pt"]
    with pytest.raises(SystemExit, match=r"finished and its training checkpoint was removed \(its model was not "
                                         r"saved in a form .*--no-save-model.*--keep-checkpoint\)"):
        main(command(model_dir, data_files, out, "--no-save-model", "--run-name", "bare", "--resume", steps=3))
    assert main(command(model_dir, data_files, out, "--keep-checkpoint", "--run-name", "kept", steps=2)) == 0
    assert (out / "kept" / "checkpoint.pt").exists() and not (out / "kept" / "resume.pt").exists()


# -- honest records -----------------------------------------------------------------------------------
def test_wall_time_accumulates_across_resumes_in_the_log_the_result_and_the_report(tmp_path, data_files, monkeypatch,
                                                                                  capsys):
    from zoptim.lm.prompts import PromptClassifier
    from zoptim.lm.train import Loop

    model_dir = save_tiny("causal", tmp_path / "tiny")
    loss, step, calls = PromptClassifier.loss, Loop.train_step, [0]

    def slow(self, batch):
        time.sleep(0.1)
        return loss(self, batch)

    def interrupted(self):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(PromptClassifier, "loss", slow)
    monkeypatch.setattr(Loop, "train_step", interrupted)
    args = command(model_dir, data_files, tmp_path / "out", "--checkpoint-every", "100", steps=4)
    assert main(args) == 130
    assert main(args) == 0
    run = tmp_path / "out" / "zosgd"
    times = [r["time"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())]
    assert len(times) == 4 and all(b > a for a, b in zip(times, times[1:])), times  # never restarts
    assert times[-1] >= 4 * 2 * 0.1  # every step's two slow queries, both sessions
    result = json.loads((run / "result.json").read_text())
    assert result["train_seconds"] == times[-1]
    row = next(line for line in (tmp_path / "out" / "report.md").read_text().splitlines() if line.startswith("| zosgd"))
    assert row.rstrip(" |").endswith(f"| {times[-1]:.0f}")


def test_the_report_says_what_each_run_tuned_and_with_which_lr(tmp_path, data_files):
    model_dir = save_tiny("causal", tmp_path / "tiny")
    out = tmp_path / "out"
    for extra in (["--run-name", "full"], ["--lora", "--run-name", "lora", "--lr", "2e-3"],
                  ["--lora", "--in-place", "--run-name", "mezo"],
                  ["--rank", "1", "--per-example", "--run-name", "pe"], ["--method", "as2p", "--run-name", "as2p"]):
        assert main(command(model_dir, data_files, out, "--no-save-model", *extra, steps=2)) == 0
    lines = (out / "report.md").read_text().splitlines()
    assert "| run | method | tuned | lr | steps |" in lines[4]
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ")}
    assert rows["full"].startswith("| full | zosgd | full | 0.001 | 2 |")
    assert rows["lora"].startswith("| lora | zosgd | LoRA, rank-4 directions, per-example | 0.002 | 2 |")  # the default
    assert rows["mezo"].startswith("| mezo | zosgd | LoRA | 0.001 | 2 |")
    assert rows["pe"].startswith("| pe | zosgd | full, rank-1 directions, per-example | 0.001 | 2 |")
    assert rows["as2p"].startswith("| as2p | as2p | full | 0.001 (cosine, auto-scaled) | 2 |")


def test_the_interrupt_message_starts_its_own_line_after_the_progress_bar(tmp_path, data_files, monkeypatch, capsys):
    from zoptim.lm.train import Loop

    model_dir = save_tiny("causal", tmp_path / "tiny")
    step, calls = Loop.train_step, [0]

    def interrupted(self):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Loop, "train_step", interrupted)
    args = [a for a in command(model_dir, data_files, tmp_path / "out", steps=4) if a != "--no-progress"]
    capsys.readouterr()
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "finetune:" in err  # the bar was drawn
    before = err[: err.index("zoptim finetune: interrupted")]
    assert before == "" or before[-1] in "\r\n", repr(before[-80:])


def test_finetune_says_in_one_line_when_its_run_stops_learning(tmp_path, data_files, capsys):
    """Minus-accuracy at an eps far below what moves a prediction: every step's two queries tie."""
    model_dir = save_tiny("causal", tmp_path / "tiny")
    capsys.readouterr()
    assert main(command(model_dir, data_files, tmp_path / "out", "--objective", "accuracy", "--eps", "1e-12",
                        "--no-save-model", steps=24)) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line.lower()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("zoptim finetune: warning: ZOSGD's step size has been 0 for 20 steps in a row")


# -- the README ---------------------------------------------------------------------------------------
def test_the_readme_library_example_trains_its_own_model(capsys):
    """Part 1 of "The library in 20 lines", as written: its printed loss falls."""
    pytest.importorskip("sklearn")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## The library in 20 lines", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    part1 = block.split("# 2.", 1)[0]
    capsys.readouterr()
    exec(compile(part1, "README.md", "exec"), {})
    printed = [line.split() for line in capsys.readouterr().out.splitlines()]
    steps, losses = [int(s) for s, _ in printed], [float(v) for _, v in printed]
    assert steps == [0, 100, 200, 300]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.7 * losses[0], losses
