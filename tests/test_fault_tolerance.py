"""Multi-process runs that are interrupted (a worker killed with SIGKILL, SIGTERM from a scheduler)
resume exactly, and every rank agrees with one process.

The runs are ``torchrun --nproc-per-node 2 -m zoptim.cli finetune`` on a tiny Llama saved to disk
(data parallel, rank 0 checkpointing every 5 steps).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from test_lm import TEXTS  # noqa: E402
from test_lm_io import save_tiny, write_jsonl  # noqa: E402
from zoptim.checkpoint import safe_load  # noqa: E402
from zoptim.cli import main  # noqa: E402

#: Long enough for the kill to land mid-run (after step 12, with checkpoints every 5 steps) with
#: room to spare on a loaded machine; lr = eps = 1e-3 keep the tiny model from diverging.
STEPS = 60
LABELS = ("negative", "positive")


def command(model_dir, data, out, *extra, method="zosgd"):
    return ["finetune", "--model", str(model_dir), "--train", str(data), "--text-field", "review",
            "--label-field", "sentiment", "--method", method, "--steps", str(STEPS), "--batch-size", "4",
            "--eval-every", str(STEPS), "--checkpoint-every", "5", "--eval-examples", "2", "--max-length", "16",
            "--lr", "1e-3", "--eps", "1e-3", "--no-progress", "--no-save-model", "--keep-checkpoint", "--run-name", "run",
            "--out", str(out), *extra]


#: Seconds each query of an interrupted run's workers sleeps (tests/slow_workers/sitecustomize.py):
#: 60 steps then take about 7 s, and a signal sent after step 12 or 22 lands seconds before the end.
QUERY_DELAY = 0.05


def slowed_env() -> dict:
    """The environment of a run whose workers sleep QUERY_DELAY per query."""
    slow = str(Path(__file__).parent / "slow_workers")
    path = os.pathsep.join([slow, *sys.path])
    return {**os.environ, "PYTHONPATH": path, "ZOPTIM_TEST_QUERY_DELAY": str(QUERY_DELAY)}


def torchrun(args, log=None, env=None):
    """``torchrun`` of ``zoptim args`` on 2 processes; its output piped, or written to the file ``log``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "-m", "zoptim.cli", *args]
    out = subprocess.PIPE if log is None else open(log, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)


def logged_step(log: Path) -> int:
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return 0
    return json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0


def worker_of_rank(agent_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker process with RANK=rank (from /proc)."""
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    for pid in map(int, children):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    rows = [{"review": t, "sentiment": LABELS[y]} for t, y in TEXTS]
    return save_tiny("causal", tmp / "tiny"), write_jsonl(tmp / "train.jsonl", rows), tmp


def killable(process) -> None:
    """Never leave a group running after a failure: SIGKILL a launcher's children, then it."""
    if process.poll() is None:
        for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split():
            os.kill(int(pid), signal.SIGKILL)
        process.kill()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the worker through /proc (Linux)")
def test_a_killed_worker_and_a_sigterm_both_resume_and_the_two_runs_end_on_the_same_bits(setup):
    """Two 2-process runs of the same fine-tuning, interrupted in two ways, launched together:

    * ``killed``: after step 12, rank 1's worker gets SIGKILL; torchrun (``--max-restarts 1``)
      restarts the group, which resumes from the last periodic checkpoint (every 5 steps);
    * ``term``: after step 22, ``zoptim finetune --nproc 2`` gets SIGTERM (what a batch scheduler
      sends): it passes the signal to torchrun, which passes it to both workers; they agree at a
      step boundary, checkpoint there and exit on their own (torchrun never has to SIGKILL a
      worker left waiting in a collective); one line says where the checkpoint is; the exit status
      is 143. The same command with ``--resume`` finishes the run.

    The two resume from different steps, so ending on the same bits means each resume was exact.
    The workers of both runs sleep QUERY_DELAY per query, so that each signal lands mid-run.
    (One-process SIGTERM resumes: tests/test_long_runs.py.)"""
    model_dir, data, tmp = setup
    env = slowed_env()
    term_args = command(model_dir, data, tmp / "term", "--nproc", "2", "--max-restarts", "0")
    killed = torchrun(command(model_dir, data, tmp / "killed"), log=tmp / "killed.out", env=env)
    launcher = subprocess.Popen([sys.executable, "-m", "zoptim.cli", *term_args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
    try:
        killed_log, term_log = tmp / "killed" / "run" / "log.jsonl", tmp / "term" / "run" / "log.jsonl"
        victim, termed = None, False
        deadline = time.monotonic() + 180
        while (victim is None or not termed) and time.monotonic() < deadline:
            if victim is None and killed.poll() is None and logged_step(killed_log) >= 12:
                victim = worker_of_rank(killed.pid, 1)
                if victim is not None:
                    os.kill(victim, signal.SIGKILL)
            if not termed and launcher.poll() is None and logged_step(term_log) >= 22:
                launcher.send_signal(signal.SIGTERM)
                termed = True
            if killed.poll() is not None and launcher.poll() is not None:
                break
            time.sleep(0.01)
        output, _ = launcher.communicate(timeout=120)
        killed.wait(timeout=240)
    finally:
        killable(launcher)
        killable(killed)
    killed_output = (tmp / "killed.out").read_text()
    assert victim is not None, f"the run ended before a worker could be killed:\n{killed_output}"
    assert killed.returncode == 0, killed_output
    result = json.loads((tmp / "killed" / "run" / "result.json").read_text())
    assert result["processes"] == 2 and result["steps"] == STEPS
    assert result["resumed_from_step"] is not None and 10 <= result["resumed_from_step"] < STEPS  # it did restart
    # the log has one record per step, none duplicated by the replay after the restart
    assert [json.loads(line)["step"] for line in killed_log.read_text().splitlines()] == list(range(1, STEPS + 1))

    assert termed and launcher.returncode == 143, output
    assert "closing signal SIGKILL" not in output, output
    said = [line for line in output.splitlines() if "stopped by SIGTERM" in line]
    assert len(said) == 1 and said[0].startswith("zoptim finetune: stopped by SIGTERM (checkpoint saved at step "), output
    step = int(said[0].split("checkpoint saved at step ")[1].split()[0])
    assert 22 <= step < STEPS and safe_load(tmp / "term" / "run" / "checkpoint.pt")["step"] == step
    assert [json.loads(line)["step"] for line in term_log.read_text().splitlines()] == list(range(1, step + 1))
    resumed = torchrun(command(model_dir, data, tmp / "term", "--resume"))
    try:
        output, _ = resumed.communicate(timeout=240)
    finally:
        killable(resumed)
    assert resumed.returncode == 0, output
    term = json.loads((tmp / "term" / "run" / "result.json").read_text())
    assert term["resumed_from_step"] == step != result["resumed_from_step"] and term["steps"] == STEPS

    final = [safe_load(tmp / run / "run" / "checkpoint.pt")["trainable"] for run in ("killed", "term")]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][n], final[1][n]) for n in final[0])
    assert any(not torch.equal(final[0][n], v) for n, v in first_checkpoint_free(model_dir).items())


def first_checkpoint_free(model_dir):
    """The untrained weights, to show the runs did train."""
    from zoptim.lm.models import load_model

    model, _ = load_model(str(model_dir))
    return {f"model.{n}": p.detach() for n, p in model.named_parameters()}


def test_nproc_and_batch_size_are_checked_before_anything_starts(setup, capsys):
    model_dir, data, tmp = setup
    with pytest.raises(SystemExit, match="multiple of the number of processes"):
        main(command(model_dir, data, tmp / "bad", "--nproc", "3"))
    with pytest.raises(SystemExit, match="zeroth-order --method"):
        main(command(model_dir, data, tmp / "bad", "--nproc", "2", method="adamw"))
    with pytest.raises(SystemExit, match="--nproc must be >= 1"):
        main(command(model_dir, data, tmp / "bad", "--nproc", "0"))
    with pytest.raises(SystemExit, match="--shard splits the weights across processes; it needs --nproc"):
        main(command(model_dir, data, tmp / "bad", "--shard"))
    with pytest.raises(SystemExit, match="--shard shards the full model's weights; it does not combine with --lora"):
        main(command(model_dir, data, tmp / "bad", "--nproc", "2", "--shard", "--lora"))


def test_per_example_directions_under_torchrun_equal_one_process(setup):
    """``zoptim finetune --rank 1 --per-example`` on 2 processes: each rank's examples at their own
    directions, the per-example losses all-gathered; the run ends where one process ends.

    The two runs reduce the losses in another order, so they differ by rounding. At lr = eps = 1e-3
    those differences stay at the rounding level (measured: 2.4e-7 after 5 steps, 3.6e-7 after
    20, while the weights move by 1e-2 and 5e-2); at a larger step the tiny model diverges and
    every step multiplies them, so the comparison would measure chaos, not the code."""
    model_dir, data, tmp = setup
    extra = ("--rank", "1", "--per-example", "--steps", "5", "--eval-every", "5", "--checkpoint-every", "5")
    two = torchrun(command(model_dir, data, tmp / "pe-two", *extra))
    output, _ = two.communicate(timeout=240)
    assert two.returncode == 0, output
    assert main(command(model_dir, data, tmp / "pe-one", *extra)) == 0
    results = [json.loads((tmp / run / "run" / "result.json").read_text()) for run in ("pe-two", "pe-one")]
    assert [r["processes"] for r in results] == [2, 1]
    final = [safe_load(tmp / run / "run" / "checkpoint.pt")["trainable"] for run in ("pe-two", "pe-one")]
    assert final[0].keys() == final[1].keys()
    assert all(torch.allclose(final[0][n], final[1][n], atol=1e-5) for n in final[0])
    assert any(not torch.allclose(final[1][n], v, atol=1e-4) for n, v in first_checkpoint_free(model_dir).items())


def test_a_sharded_run_resumes_from_its_sharded_checkpoint_and_equals_one_process(setup):
    """``zoptim finetune --nproc 2 --shard``: FSDP2-sharded weights (each rank reads its rows),
    checkpoints written shard by shard (torch.distributed.checkpoint, one folder per step, the last
    kept) and validations run on every rank. 10 steps, then the run is extended to 20 (``--resume
    --steps 20``): it continues from the sharded checkpoint and ends where one unsharded process
    running 20 steps ends."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    model_dir, data, tmp = setup
    extra = ("--eval-every", "5", "--checkpoint-every", "10")
    run = tmp / "sh" / "run"
    for steps in ("10", "20"):
        sharded = torchrun(command(model_dir, data, tmp / "sh", "--shard", *extra, "--steps", steps, "--resume"))
        output, _ = sharded.communicate(timeout=240)
        assert sharded.returncode == 0, output
    assert main(command(model_dir, data, tmp / "one", *extra, "--steps", "20")) == 0
    result = json.loads((run / "result.json").read_text())
    assert result["processes"] == 2 and result["shard"] and result["steps"] == 20
    # the extension continued from the step-10 checkpoint; a group that torchrun restarted after the last
    # checkpoint (seen once on a loaded machine) resumes again from step 20 and records that
    assert "resuming from step 10" in output, output
    restarted = "resuming from step 20" in output
    assert result["resumed_from_step"] == (20 if restarted else 10), output
    ckpt = safe_load(run / "checkpoint.pt")
    assert ckpt["trainable"] == {} and ckpt["sharded_trainable"] == "shards-step20"
    assert sorted(p.name for p in run.glob("shards-step*")) == ["shards-step20"]  # the step-10 folder was removed
    dcp_to_torch_save(run / "shards-step20", tmp / "sh.pt")
    got = torch.load(tmp / "sh.pt", weights_only=True)
    want = safe_load(tmp / "one" / "run" / "checkpoint.pt")["trainable"]
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[n], want[n], atol=1e-5) for n in want)
    assert any(not torch.allclose(want[n], v, atol=1e-4) for n, v in first_checkpoint_free(model_dir).items())
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 21))
    assert [r["step"] for r in logged if "val_accuracy" in r] == [5, 10, 15, 20]
