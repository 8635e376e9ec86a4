"""Issue 11: own data files, saved models that load back with from_pretrained, devices, safe
checkpoints, gradient accumulation in ZOTrainer. Tiny randomly initialised models only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import zoptim  # noqa: E402
from test_lm import TEXTS, classifier, tiny_bert, tiny_llama, tiny_task, tiny_tokenizer  # noqa: E402
from zoptim.checkpoint import CheckpointError, atomic_save, safe_load  # noqa: E402
from zoptim.cli import main  # noqa: E402
from zoptim.lm.data import DataError, load_files  # noqa: E402
from zoptim.lm.models import load_classifier, load_model, resolve_device  # noqa: E402
from zoptim.lm.prompts import PromptClassifier, prompt_for_labels  # noqa: E402
from zoptim.lm.train import Loop, LoopConfig, make_optimizer  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LABELS = ("negative", "positive")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data_files(tmp_path):
    rows = [{"review": t, "sentiment": LABELS[y]} for t, y in TEXTS]
    return {
        "train": write_jsonl(tmp_path / "train.jsonl", rows),
        "validation": write_jsonl(tmp_path / "val.jsonl", rows[:4]),
        "test": write_jsonl(tmp_path / "test.jsonl", rows[4:]),
    }


def save_tiny(kind, directory):
    model = tiny_llama() if kind == "causal" else tiny_bert()
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def finetune(tmp_path, model_dir, files, *extra, run="run"):
    args = ["finetune", "--model", str(model_dir), "--train", str(files["train"]), "--validation",
            str(files["validation"]), "--test", str(files["test"]), "--text-field", "review", "--label-field",
            "sentiment", "--template", "Review: {text}\\nSentiment:", "--steps", "4", "--batch-size", "4",
            "--eval-every", "2", "--eval-examples", "4", "--max-length", "16", "--lr", "5e-2", "--eps", "1e-2",
            "--no-progress", "--run-name", run, "--out", str(tmp_path / "out"), *extra]
    assert main(args) == 0
    return tmp_path / "out" / run


def logits(clf, texts=("good movie", "the plot was dull", "a very great film")):
    with torch.no_grad():
        inputs = clf.batch([zoptim.lm.data.Example(t, 0) for t in texts])
        inputs.pop("labels")
        return clf(**inputs)["logits"].float().cpu()


def tuned_reference(model_dir, run_dir, kind="causal", lora=False):
    """The base model with the trainable tensors of the run's checkpoint copied in."""
    from zoptim.lm.models import apply_lora

    model, tok = load_model(str(model_dir))
    if lora:
        model = apply_lora(model)
    clf = PromptClassifier(model, tok, prompt_for_labels(LABELS, "Review: {text}\nSentiment:"), kind=kind,
                           max_length=16)
    ckpt = safe_load(run_dir / "checkpoint.pt")
    params = dict(clf.named_parameters())
    with torch.no_grad():
        for name, value in ckpt["trainable"].items():
            params[name].copy_(value)
    return clf, ckpt


# -- own data, saved model, reload ---------------------------------------------------------------------
def test_finetune_from_jsonl_saves_a_model_that_from_pretrained_reloads_with_the_same_logits(tmp_path, data_files):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = save_tiny("causal", tmp_path / "tiny")
    run_dir = finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--device", "cpu", "--keep-checkpoint")
    saved = run_dir / "model"
    assert (saved / "model.safetensors").exists() and (saved / "config.json").exists()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["queries"] == 8 and result["test_examples"] == 4 and result["device"] == "cpu"
    assert 0 < result["weights_changed"]["fraction"] <= 1 and result["weights_changed"]["max_abs"] > 0
    assert json.loads((saved / "zoptim_prompt.json").read_text())["template"] == "Review: {text}\nSentiment:"

    reference, _ = tuned_reference(model_dir, run_dir)
    base = PromptClassifier(*load_model(str(model_dir)),
                            prompt_for_labels(LABELS, "Review: {text}\nSentiment:"), max_length=16)
    assert not torch.equal(logits(base), logits(reference))  # training moved the weights
    # plain Hugging Face: from_pretrained, no zoptim involved
    hf = AutoModelForCausalLM.from_pretrained(saved)
    tok = AutoTokenizer.from_pretrained(saved)
    plain = PromptClassifier(hf.eval(), tok, prompt_for_labels(LABELS, "Review: {text}\nSentiment:"), max_length=16)
    torch.testing.assert_close(logits(plain), logits(reference), rtol=0, atol=0)
    # and the three-line route of the README
    clf = load_classifier(saved)
    torch.testing.assert_close(logits(clf), logits(reference), rtol=0, atol=0)
    assert clf.classify(["good movie", "awful acting"])[0] in LABELS


def test_lora_adapter_round_trip_with_peft_from_pretrained_and_merge(tmp_path, data_files):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny("causal", tmp_path / "tiny")
    run_dir = finetune(tmp_path, model_dir, data_files, "--method", "as2p", "--lora", "--keep-checkpoint", run="lora")
    result = json.loads((run_dir / "result.json").read_text())
    assert (result["lr"], result["eps"]) == (5e-2, 1e-2)  # the values the run used
    assert result["lr_rule"].startswith("AS2P (S2P paper, Alg. 2): lr_k decays by cosine from this lr")
    saved = run_dir / "model"
    assert (saved / "adapter_model.safetensors").exists() and not (saved / "model.safetensors").exists()
    reference, _ = tuned_reference(model_dir, run_dir, lora=True)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = PeftModel.from_pretrained(base, saved).eval()
    clf = PromptClassifier(peft_model, reference.tokenizer, reference.prompt, max_length=16)
    torch.testing.assert_close(logits(clf), logits(reference), rtol=0, atol=0)
    torch.testing.assert_close(logits(load_classifier(saved)), logits(reference), rtol=0, atol=0)

    merged_dir = finetune(tmp_path, model_dir, data_files, "--method", "as2p", "--lora", "--merge", run="merged")
    assert (merged_dir / "model" / "model.safetensors").exists()
    merged = load_classifier(merged_dir / "model")
    assert not hasattr(merged.model, "peft_config")
    # the same run (same seed), merged: equal up to the rounding of W + B A
    torch.testing.assert_close(logits(merged), logits(reference), rtol=1e-4, atol=1e-5)


def test_encoder_path_from_csv_with_labels_taken_from_the_data(tmp_path):
    model_dir = save_tiny("encoder", tmp_path / "bert")
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in TEXTS))
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(model_dir), "--train", str(csv_path), "--method", "zosgd",
                 "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--eval-examples", "4", "--lr", "1e-2",
                 "--no-progress", "--out", str(out)]) == 0
    result = json.loads((out / "zosgd" / "result.json").read_text())
    assert result["test_examples"] == 1  # no --validation / --test: 10 % of 8 held out, used for both
    clf = load_classifier(out / "zosgd" / "model")
    assert clf.kind == "encoder" and clf.prompt.classes == ("0", "1")
    assert clf.classify("good movie")[0] in ("0", "1")


def test_an_encoder_is_exported_with_its_head_and_transformers_alone_classifies_with_it(tmp_path, data_files):
    model_dir = save_tiny("encoder", tmp_path / "bert")
    run_dir = finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--keep-checkpoint")
    saved = run_dir / "model"
    clf = load_classifier(saved)
    texts = ["good movie", "the plot was dull", "a very great film"]
    mine = logits(clf, texts)
    reference, _ = tuned_reference(model_dir, run_dir, kind="encoder")
    torch.testing.assert_close(mine, logits(reference, texts), rtol=0, atol=0)  # zoptim's own reload
    # a fresh process, another working directory, no zoptim import: transformers' Auto class only
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = f"""
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained({str(saved)!r}, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained({str(saved)!r})
inputs = tok({texts!r}, padding=True, return_tensors="pt")
with torch.no_grad():
    out = model(**inputs, labels=torch.tensor([1, 0, 1]))
print(json.dumps({{"logits": out.logits.tolist(), "loss": float(out.loss), "labels": model.config.id2label,
                  "zoptim": any(m.startswith("zoptim") for m in sys.modules)}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    ran = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, capture_output=True, text=True, env=env,
                         timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    got = json.loads(ran.stdout.strip().splitlines()[-1])
    assert not got["zoptim"] and got["labels"] == {"0": "negative", "1": "positive"}
    torch.testing.assert_close(torch.tensor(got["logits"]), mine, rtol=1e-5, atol=1e-5)
    assert got["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(mine, torch.tensor([1, 0, 1]))), rel=1e-5)


# -- bad data -------------------------------------------------------------------------------------------
def test_bad_data_files_get_errors_naming_the_file_and_what_was_expected(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl is empty"):
        load_files(empty)
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"sentence": "a", "label": "pos"}])
    with pytest.raises(DataError, match=r"missing\.jsonl line 1: no field 'text' \(fields: sentence, label\).*--text-field"):
        load_files(missing)
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("text,y\na,1\n")
    with pytest.raises(DataError, match=r"bad\.csv: no column 'label' \(columns: text, y\).*--label-field"):
        load_files(csv_path)
    outside = write_jsonl(tmp_path / "outside.jsonl", [{"text": "a", "label": "pos"}, {"text": "c", "label": "meh"}])
    with pytest.raises(DataError, match=r"outside\.jsonl line 2: label 'meh' is not in the label set \(neg, pos\)"):
        load_files(good, validation=outside, test=good)
    with pytest.raises(DataError, match=r"good\.jsonl line 1: label 'pos' is not in the label set \(negative, positive\)"):
        load_files(good, labels="negative,positive")
    bad_json = tmp_path / "broken.jsonl"
    bad_json.write_text('{"text": "a", "label": 1}\n{"text": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl line 2: not valid JSON"):
        load_files(bad_json)
    txt = tmp_path / "data.txt"
    txt.write_text("x")
    with pytest.raises(DataError, match=r"data\.txt: unknown format '\.txt'"):
        load_files(txt)
    task = load_files(good, labels=["neg", "pos"])
    assert [e.label for e in task.train + task.val] and task.classes == ("neg", "pos")
    # labels given as indices are accepted when the label set is given
    idx = write_jsonl(tmp_path / "idx.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}] * 3)
    assert load_files(idx, labels="negative,positive").classes == LABELS
    # the CLI turns these into one-line errors naming the flag or the file
    with pytest.raises(SystemExit, match="empty"):
        main(["finetune", "--model", "minilm", "--train", str(empty), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="either --task or --train"):
        main(["finetune", "--task", "trec", "--train", str(good), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--test .*no such file"):
        main(["finetune", "--train", str(good), "--test", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--merge .*needs --lora"):
        main(["finetune", "--train", str(good), "--merge", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"--out .*good\.jsonl is a file; give a folder"):
        main(["finetune", "--train", str(good), "--out", str(good)])
    # numbers are checked before the model loads (nothing is written); method names are case-insensitive
    for flag, value in (("--lr", "-1"), ("--lr", "nan"), ("--eps", "0"), ("--eta-b", "-3")):
        with pytest.raises(SystemExit, match=rf"^zoptim finetune: {flag} must be a finite number > 0; got"):
            main(["finetune", "--train", str(good), "--method", "ZOSGD", flag, value, "--out", str(tmp_path / "n")])
    assert not (tmp_path / "n").exists()
    with pytest.raises(SystemExit, match=r"--batch-size 1000 is larger than the \d+ training examples"):
        main(["finetune", "--train", str(good), "--batch-size", "1000", "--out", str(tmp_path / "n")])
    assert not (tmp_path / "n").exists()


def test_texts_longer_than_max_length_are_truncated_and_counted(tmp_path, data_files, capsys):
    model_dir = save_tiny("causal", tmp_path / "tiny")
    long_rows = [{"review": "very " * 30 + "good movie", "sentiment": "positive"}] * 3 + [
        {"review": "bad film", "sentiment": "negative"}]
    data_files["test"] = write_jsonl(tmp_path / "long.jsonl", long_rows)
    run_dir = finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--no-save-model", run="long")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["truncated"] == {"train": 0, "validation": 0, "test": 3}
    assert "3 of 4 test" in capsys.readouterr().out
    assert not (run_dir / "model").exists()


# -- devices --------------------------------------------------------------------------------------------
def test_device_resolution_and_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else None
    if expected:
        assert resolve_device("auto").type == "cuda"
    elif not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda, mps"):
        resolve_device("tpu")
    with pytest.raises(SystemExit, match="--device must be one of"):
        main(["finetune", "--device", "tpu", "--out", "x"])


@pytest.mark.parametrize("device", DEVICES)
def test_loop_trains_on_the_requested_device_and_matches_the_cpu_run(tmp_path, device):
    task = tiny_task()

    def run(dev, out):
        clf = classifier("causal", lora=True).to(dev)
        opt = make_optimizer("zosgd", clf.parameters(), steps=4, lora=True, lr=5e-2)
        Loop(clf, task, opt, LoopConfig(steps=4, batch_size=4, eval_every=2, eval_examples=4), out,
             progress=False).run()
        return clf

    base = dict(classifier("causal", lora=True).named_parameters())
    clf = run(device, tmp_path / "dev")
    assert all(p.device.type == device for p in clf.parameters())
    moved = [n for n, p in clf.named_parameters() if not torch.equal(p.detach().cpu(), base[n].detach())]
    assert moved and all("lora_" in n for n in moved)  # the adapters trained there, the base did not move
    # (an accelerator draws its directions with its own generator: not the CPU run's numbers)


# -- checkpoints ----------------------------------------------------------------------------------------
def test_checkpoints_are_written_atomically_and_read_without_pickled_code(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"step": 3, "w": torch.arange(4.0), "gen": torch.Generator().get_state()}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind
    assert safe_load(path, required_keys=("step",))["step"] == 3

    class Payload:  # anything that is not plain data is refused, not executed
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt holds objects other than tensors"):
        safe_load(tmp_path / "evil.pt")

    class Blocked:  # a module torch blocks outright: its message reads "unsupported GLOBAL"
        def __reduce__(self):
            return (os.system, ("echo pickled code ran",))

    torch.save({"evil": Blocked()}, tmp_path / "blocked.pt")
    with pytest.raises(CheckpointError, match=r"blocked\.pt holds objects other than tensors.*GLOBAL posix\.system"):
        safe_load(tmp_path / "blocked.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt is truncated or corrupted"):
        safe_load(tmp_path / "cut.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"junk\.pt is truncated or corrupted"):
        safe_load(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match=r"lacks \['optimizer'\]"):
        safe_load(path, required_keys=("step", "optimizer"))

    def failing_save(*a, **k):
        raise OSError("disk full")

    old = path.read_bytes()
    real = torch.save
    torch.save = failing_save
    try:
        with pytest.raises(OSError, match="disk full"):
            atomic_save({"step": 4}, path)
    finally:
        torch.save = real
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_a_corrupted_finetune_checkpoint_stops_the_run_with_the_file_named_and_keeps_the_log(tmp_path, data_files):
    model_dir = save_tiny("causal", tmp_path / "tiny")
    run_dir = finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--no-save-model", "--keep-checkpoint", run="ck")
    log_before = (run_dir / "log.jsonl").read_text()
    ckpt = run_dir / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(SystemExit, match=r"checkpoint .*checkpoint\.pt is truncated or corrupted"):
        finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--no-save-model", run="ck")
    assert (run_dir / "log.jsonl").read_text() == log_before
    # a checkpoint of other trainable parameters (here: full vs LoRA) is refused by name too (in a run
    # folder without the configuration that would refuse the --lora change first: an older zoptim's)
    ok = tmp_path / "ok"
    (finetune(ok, model_dir, data_files, "--method", "zosgd", "--no-save-model", "--keep-checkpoint", run="ck") / "config.json").unlink()
    with pytest.raises(SystemExit, match="written for other trainable parameters"):
        finetune(ok, model_dir, data_files, "--method", "zosgd", "--no-save-model", "--lora", "--steps", "6", run="ck")


def test_bench_harness_refuses_a_corrupted_checkpoint_by_name(tmp_path):
    from zoptim.bench import harness
    from zoptim.bench.harness import RunSpec
    from zoptim.problems import Quadratic

    spec = RunSpec("t", "quad", "ZOSGD", 0, 40, {"lr": 1e-2, "eps": 1e-3}, num_evals=2)
    ckpt = tmp_path / "checkpoints" / f"{spec.run_id}.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"PK\x03\x04 not a whole zip")
    with pytest.raises(CheckpointError, match=rf"{spec.run_id}\.pt is truncated or corrupted"):
        harness.run(spec, Quadratic(dim=5), tmp_path, progress=False)
    assert ckpt.exists()  # left for the user to inspect; nothing else written
    assert not (tmp_path / "raw").exists()


# -- ZOTrainer with gradient accumulation ------------------------------------------------------------------
def test_zo_trainer_gradient_accumulation_is_one_step_over_all_micro_batches(tmp_path):
    from transformers import TrainingArguments

    from zoptim.lm.trainer import ZOTrainer

    task = tiny_task()

    def train(batch_size, accumulation):
        clf = classifier("causal", lora=True)
        # lr = eps = 1e-3: the two runs' rounding differences stay at the rounding level (no chaotic growth)
        opt = zoptim.ZOSGD([p for p in clf.parameters() if p.requires_grad], lr=1e-3, eps=1e-3, seed=3)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"b{batch_size}"), max_steps=3, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, learning_rate=1e-3, lr_scheduler_type="constant",
            report_to=[], save_strategy="no", use_cpu=True, remove_unused_columns=False, disable_tqdm=True,
            dataloader_drop_last=True, seed=0, data_seed=0, logging_steps=1,
        )
        losses = []
        trainer = ZOTrainer(model=clf, args=args, train_dataset=task.train, data_collator=clf.batch,
                            zo_optimizer=opt)
        trainer.get_train_dataloader = lambda: torch.utils.data.DataLoader(  # fixed order: same batches
            task.train, batch_size=batch_size, collate_fn=clf.batch, shuffle=False)
        trainer.train()
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        return clf, opt, losses

    whole, opt_whole, loss_whole = train(8, 1)
    micro, opt_micro, loss_micro = train(2, 4)
    assert opt_micro.steps == opt_whole.steps == 3  # one zeroth-order step per optimizer step
    assert opt_micro.num_queries == opt_whole.num_queries == 6
    assert loss_micro == pytest.approx(loss_whole, rel=1e-5)  # Trainer logs the window's mean loss
    assert not torch.equal(dict(whole.named_parameters())[next(n for n, p in whole.named_parameters()
                                                               if p.requires_grad)],
                           dict(classifier("causal", lora=True).named_parameters())[next(
                               n for n, p in whole.named_parameters() if p.requires_grad)])
    for (n, p), (_, q) in zip(whole.named_parameters(), micro.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("extra", [("--forward",), ("--rank", "1"), ("--rank", "1", "--per-example"),
                                   ("--rank", "1", "--per-example", "--orthogonalize"),
                                   ("--rank", "1", "--per-example", "--normalize-by-spread")],
                         ids=["full-rank", "rank1", "per-example", "orthogonalized", "spread"])
def test_finetune_with_forward_directions_trains_records_them_and_exports(tmp_path, data_files, extra):
    """`zoptim finetune --forward | --rank 1 [--per-example]`: directions in the forward (full rank
    or rank 1), recorded in result.json, the exported model carries the trained weights and no hook."""
    model_dir = save_tiny("causal", tmp_path / "tiny")
    run_dir = finetune(tmp_path, model_dir, data_files, "--method", "zosgd", *extra, "--keep-checkpoint", run="fwd")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["rank"] == (1 if "--rank" in extra else None) and result["per_example"] == ("--per-example" in extra)
    assert result["forward"] == ("--forward" in extra)
    assert result["orthogonalize"] == ("--orthogonalize" in extra)
    assert result["normalize_by_spread"] == ("--normalize-by-spread" in extra)
    assert result["queries"] == 8 and result["weights_changed"]["fraction"] > 0
    reference, _ = tuned_reference(model_dir, run_dir)
    torch.testing.assert_close(logits(load_classifier(run_dir / "model")), logits(reference), rtol=0, atol=0)


def test_finetune_refuses_forward_options_that_cannot_hold(tmp_path, data_files):
    model_dir = save_tiny("causal", tmp_path / "tiny")
    with pytest.raises(SystemExit, match="--per-example needs --rank"):
        finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--per-example")
    with pytest.raises(SystemExit, match="--rank must be >= 1"):
        finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--rank", "0")
    with pytest.raises(SystemExit, match="--rank is an option of zosgd, as2p, stp and s2p; got --method hizoo"):
        finetune(tmp_path, model_dir, data_files, "--method", "hizoo", "--rank", "1")
    with pytest.raises(SystemExit, match="--forward is an option of zosgd, as2p, stp and s2p; got --method hizoo"):
        finetune(tmp_path, model_dir, data_files, "--method", "hizoo", "--forward")
    with pytest.raises(SystemExit, match="--per-example needs --rank R"):  # full-rank directions per example
        finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--forward", "--per-example")
    with pytest.raises(SystemExit, match="--per-example is an option of zosgd and as2p; got --method stp"):
        finetune(tmp_path, model_dir, data_files, "--method", "stp", "--rank", "1", "--per-example")
    with pytest.raises(SystemExit, match="--normalize-by-spread needs --per-example"):
        finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--rank", "1", "--normalize-by-spread")
    with pytest.raises(SystemExit, match="--normalize-by-spread is an option of zosgd; got --method as2p"):
        finetune(tmp_path, model_dir, data_files, "--method", "as2p", "--rank", "1", "--per-example",
                 "--normalize-by-spread")
    with pytest.raises(SystemExit, match="--orthogonalize needs --rank"):
        finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--orthogonalize")
    with pytest.raises(SystemExit, match="--orthogonalize is an option of zosgd; got --method as2p"):
        finetune(tmp_path, model_dir, data_files, "--method", "as2p", "--rank", "1", "--orthogonalize")
    with pytest.raises(SystemExit, match="--sparse-embeddings needs --rank R"):
        finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--sparse-embeddings")
    with pytest.raises(SystemExit, match="--sparse-embeddings does not combine with --momentum"):
        finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--rank", "1", "--momentum", "0.9",
                 "--sparse-embeddings")
    with pytest.raises(SystemExit, match="--sparse-embeddings is an option of zosgd and as2p; got --method stp"):
        finetune(tmp_path, model_dir, data_files, "--method", "stp", "--rank", "1", "--sparse-embeddings")


def test_finetune_freeze_embeddings_trains_everything_but_the_encoders_embedding_block(tmp_path, data_files):
    """`--freeze-embeddings`: the exported encoder's embedding block (word, position, token-type
    matrices and LayerNorm) is the base model's bit for bit, the other weights moved, and the
    run records the option."""
    from transformers import AutoModel

    model_dir = save_tiny("encoder", tmp_path / "bert")
    run_dir = finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--rank", "4", "--freeze-embeddings",
                       run="frozen")
    assert json.loads((run_dir / "result.json").read_text())["freeze_embeddings"] is True
    before = dict(AutoModel.from_pretrained(model_dir).named_parameters())
    after = dict(AutoModel.from_pretrained(run_dir / "model").named_parameters())
    block = [n for n in before if "embeddings" in n]
    assert len(block) == 5  # word, position, token type; LayerNorm weight and bias
    for n in block:
        assert torch.equal(after[n], before[n]), n
    assert any(not torch.equal(after[n], before[n]) for n in before if n not in block)


def test_finetune_freeze_embeddings_is_refused_where_there_is_no_block_to_freeze(tmp_path, data_files):
    model_dir = save_tiny("causal", tmp_path / "tiny")
    with pytest.raises(SystemExit, match="--freeze-embeddings freezes the embedding block .* with --lora"):
        finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--lora", "--freeze-embeddings")
    with pytest.raises(SystemExit, match="freeze_embeddings: .* has no trainable parameter named '\\*embeddings\\*'"):
        finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--freeze-embeddings")


# -- run folders are never reused silently (issue 21) -------------------------------------------------
def test_a_run_folder_with_other_settings_is_refused_unless_resume_or_overwrite(tmp_path, data_files, capsys):
    model_dir = save_tiny("causal", tmp_path / "tiny")
    run_dir = finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--no-save-model")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["lr"] == 5e-2 and set(config["data_sha256"]) == {"train", "validation", "test"}
    capsys.readouterr()
    # the same command again: the finished run (its checkpoint removed) has nothing to do, and says so
    assert not (run_dir / "checkpoint.pt").exists()
    finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--no-save-model")
    assert "has finished its 4 steps (result.json); nothing to do" in capsys.readouterr().out
    # a run recorded before a flag existed (here --shard, --per-example) had it off: still the same run
    (run_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in ("shard", "per_example")}))
    finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--no-save-model")
    assert "nothing to do" in capsys.readouterr().out
    (run_dir / "config.json").write_text(json.dumps(config))
    # the default method is the one the README recommends for language models
    assert config["method"] == "zosgd" and json.loads(
        (finetune(tmp_path, model_dir, data_files, "--no-save-model", run="default") / "config.json").read_text()
    )["method"] == "zosgd"
    # another lr: one line naming the field, nothing trained or rewritten
    before = (run_dir / "result.json").read_bytes()
    with pytest.raises(SystemExit, match=r"run holds a run with other settings \(--lr 0\.05 -> 0\.01\); pass --resume"):
        finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--no-save-model", "--lr", "1e-2")
    assert (run_dir / "result.json").read_bytes() == before
    # --resume: the run's own settings win
    finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--no-save-model", "--lr", "1e-2", "--resume")
    assert "ignoring this command's --lr 0.01" in capsys.readouterr().out
    assert json.loads((run_dir / "result.json").read_text())["lr"] == 5e-2
    # --overwrite: a new run with the new settings
    finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--no-save-model", "--lr", "1e-2", "--overwrite")
    assert json.loads((run_dir / "result.json").read_text())["lr"] == 1e-2
    # other data in the same comparison folder: refused before any work
    data_files["train"].write_text(data_files["train"].read_text() + data_files["train"].read_text())
    with pytest.raises(SystemExit, match=r"holds a comparison whose runs this one cannot join: the data files "
                                         r"changed since this comparison was made \(recorded in .*zero_shot.json\); give "
                                         r"another --out"):
        finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--no-save-model", run="other")


def test_zosgd_with_lora_on_a_decoder_defaults_to_rank_4_per_example_directions_and_in_place_keeps_mezos(
        tmp_path, data_files, capsys):
    """The measured default (docs/benchmarks.md, SmolLM2 TREC with LoRA: per-example rank 4 reached
    in-place GA's final loss in 0.87x its queries): the library's config and the command take it,
    record what the run did, and a run recorded before the default changed is never continued
    with other directions."""
    from zoptim.lm.finetune import ConfigError, FinetuneConfig

    resolved = lambda **kw: (lambda c: (c.in_place, c.rank, c.per_example))(FinetuneConfig(**kw))  # noqa: E731
    assert resolved(lora=True) == (False, 4, True)
    assert resolved(lora=True, in_place=True) == (True, None, False)
    assert resolved(lora=True, rank=2) == (False, 2, False)  # directions the user chose are kept as given
    assert resolved(lora=True, method="as2p") == (True, None, False)  # nothing measured says otherwise
    assert resolved(lora=True, objective="accuracy") == (True, None, False)  # one number, not one per example
    # an encoder embeds its label sentences once per example under per-example directions: not its default
    assert resolved(lora=True, model="minilm") == (True, None, False)
    assert resolved(lora=True, model=str(save_tiny("encoder", tmp_path / "bert"))) == (True, None, False)
    assert resolved() == (True, None, False) and resolved(forward=True) == (False, None, False)
    with pytest.raises(ConfigError, match="in_place writes full-rank directions into the weights; it does not "
                                          "combine with forward or rank"):
        FinetuneConfig(lora=True, in_place=True, rank=4)
    with pytest.raises(ConfigError, match="in_place False needs the directions applied inside the forward"):
        FinetuneConfig(in_place=False)
    with pytest.raises(ConfigError, match="per_example needs a loss per example; objective accuracy is one number"):
        FinetuneConfig(rank=1, per_example=True, objective="accuracy")

    model_dir = save_tiny("causal", tmp_path / "tiny")
    run_dir = finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--lora", "--steps", "2", run="lora")
    config, result = (json.loads((run_dir / f).read_text()) for f in ("config.json", "result.json"))
    assert (config["in_place"], config["rank"], config["per_example"]) == (False, 4, True)
    assert (result["in_place"], result["rank"], result["per_example"]) == (False, 4, True)
    # a LoRA run recorded before the default changed (no in_place field, directions in place)
    old = finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--lora", "--in-place", "--steps", "2",
                   run="old")
    recorded = json.loads((old / "config.json").read_text())
    assert (recorded["in_place"], recorded["rank"], recorded["per_example"]) == (True, None, False)
    del recorded["in_place"]
    (old / "config.json").write_text(json.dumps(recorded))
    before = (old / "result.json").read_bytes()
    with pytest.raises(SystemExit, match=r"holds a run with other settings \(--in-place True -> False, --per-example "
                                         r"False -> True, --rank None -> 4\).*zosgd with --lora now defaults to --rank 4 "
                                         r"--per-example, and that run's directions were in place: --in-place runs it"):
        finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--lora", "--steps", "2", run="old")
    assert (old / "result.json").read_bytes() == before
    capsys.readouterr()
    finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--lora", "--in-place", "--steps", "2", run="old")
    assert "nothing to do" in capsys.readouterr().out
    # --resume continues it as it was recorded: in place
    finetune(tmp_path, model_dir, data_files, "--method", "zosgd", "--lora", "--steps", "4", "--resume", run="old")
    extended = json.loads((old / "result.json").read_text())
    assert extended["queries"] == 8 and (extended["in_place"], extended["rank"], extended["per_example"]) == (
        True, None, False)


def test_an_out_folder_of_the_users_own_files_is_never_written(tmp_path, data_files):
    mine = tmp_path / "out"
    mine.mkdir()
    (mine / "report.md").write_text("my notes")
    with pytest.raises(SystemExit, match=r"--out .*out holds files that are not zoptim runs"):
        finetune(tmp_path, save_tiny("causal", tmp_path / "tiny"), data_files, "--method", "zosgd")
    assert (mine / "report.md").read_text() == "my notes" and sorted(p.name for p in mine.iterdir()) == ["report.md"]


def test_an_adapter_trained_from_a_relative_base_path_records_it_absolutely(tmp_path, data_files, monkeypatch):
    save_tiny("causal", tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    run_dir = finetune(tmp_path, "tiny", data_files, "--method", "zosgd", "--lora", "--steps", "2", run="rel")
    config = json.loads((run_dir / "model" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "tiny").resolve())


def test_a_failed_start_leaves_no_folder_and_does_not_block_the_corrected_command(tmp_path, data_files):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # a folder, but no model in it: fails when the model loads
    with pytest.raises(BaseException):  # noqa: B017 - whatever transformers raises for it
        finetune(tmp_path, broken, data_files, "--method", "zosgd", "--lr", "1e-2")
    assert not (tmp_path / "out").exists()
    # a configuration left by a start that never trained does not block other settings
    run_dir = tmp_path / "out" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"lr": 0.5}))
    finetune(tmp_path, save_tiny("causal", tmp_path / "tiny"), data_files, "--method", "zosgd", "--steps", "2",
             "--no-save-model")
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 5e-2


def test_ctrl_c_in_finetune_is_one_line_and_the_same_command_resumes_from_the_interruption(
        tmp_path, data_files, monkeypatch, capsys):
    from zoptim.lm.train import Loop

    model_dir = save_tiny("causal", tmp_path / "tiny")
    step, calls = Loop.train_step, [0]

    def interrupted(self):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Loop, "train_step", interrupted)
    capsys.readouterr()  # what saving the tiny model printed
    args = ["finetune", "--model", str(model_dir), "--train", str(data_files["train"]), "--text-field", "review",
            "--label-field", "sentiment", "--steps", "4", "--batch-size", "4", "--eval-every", "4",
            "--eval-examples", "4", "--max-length", "16", "--no-progress", "--out", str(tmp_path / "out")]
    assert main(args) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted (checkpoint saved at step 2" in err[0] and "run the same command again" in err[0]
    assert main(args) == 0
    assert "resuming from step 2" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "zosgd" / "result.json").read_text())["resumed_from_step"] == 2


def test_the_fine_tuning_run_is_one_library_call_and_its_config_checks_every_value(tmp_path, data_files):
    """What `zoptim finetune` does is zoptim.lm.finetune.finetune(config, task, prompt, out): the
    command only parses flags (issue 22)."""
    from zoptim.lm.finetune import ConfigError, FinetuneConfig
    from zoptim.lm.finetune import finetune as run_finetune

    model_dir = save_tiny("causal", tmp_path / "tiny")
    task = load_files(data_files["train"], data_files["validation"], data_files["test"], text_field="review",
                      label_field="sentiment", seed=0, name="own")
    config = FinetuneConfig(model=str(model_dir), method="ZOSGD", steps=4, batch_size=4, eval_every=2,
                            eval_examples=4, max_length=16, lr=5e-2, eps=1e-2, progress=False)
    result = run_finetune(config, task, prompt_for_labels(task.classes, "Review: {text}\nSentiment:"), tmp_path / "out")
    assert result["method"] == "zosgd" and result["queries"] == 8 and result["lr"] == 5e-2
    assert json.loads((tmp_path / "out" / "zosgd" / "result.json").read_text()) == result
    assert (tmp_path / "out" / "zosgd" / "model" / "model.safetensors").exists()
    for bad, message in [(dict(method="sgd"), "method must be one of zosgd, as2p"),
                         (dict(method="stp", momentum=0.9), "momentum is an option of zosgd and as2p; got method stp"),
                         (dict(per_example=True), "per_example needs rank R"),
                         (dict(lr=float("nan")), "lr must be"), (dict(steps=0), "steps must be >= 1; got 0"),
                         (dict(merge=True), "merge merges LoRA adapters; it needs lora")]:
        with pytest.raises(ConfigError, match=message):
            FinetuneConfig(**bad)
