"""Per-example directions on an encoder classifier (MiniLM's formulation): each example is scored
against its own copy of the label sentences, so everything its loss depends on sits at its own
direction and the per-example estimate stays unbiased."""

from __future__ import annotations

import copy

import torch

import zoptim
from test_lm import classifier, tiny_task
from zoptim.engine.noise import mix

SEED = 2


def test_grouped_label_embeddings_give_the_shared_logits_at_the_unperturbed_weights():
    clf = classifier("encoder")
    examples = tiny_task().train
    with torch.no_grad():
        shared = clf(**{k: v for k, v in clf.batch(examples).items() if k != "labels"})["logits"]
        grouped = clf.grouped_encoder_logits(examples)
    torch.testing.assert_close(grouped, shared, rtol=1e-5, atol=1e-5)
    assert clf.rows_per_example == 1 + len(clf.prompt.label_sentences)


def test_each_examples_loss_is_the_loss_at_its_own_materialised_point():
    clf = classifier("encoder")
    plain = copy.deepcopy(clf)
    examples = tiny_task().train[:3]
    eps = 0.05
    params = [p for p in clf.parameters() if p.requires_grad]
    opt = zoptim.ZOSGD(params, lr=0.0, eps=eps, seed=SEED, module=clf, rank=1, per_example=True)
    at = zoptim.AskTell(opt)
    for sign in (1.0, -1.0):
        at.ask()
        with torch.no_grad():
            seen = clf.losses(examples)
        for i, example in enumerate(examples):
            point = copy.deepcopy(plain)
            direction = opt.engine.direction(mix(SEED, 0, i))
            with torch.no_grad():
                for p, s in zip([q for q in point.parameters() if q.requires_grad], direction):
                    p.add_(s * (sign * eps))
                want = point.losses([example])[0]
            torch.testing.assert_close(seen[i], want, rtol=1e-4, atol=1e-5)
        at.tell(seen)
    opt.close()


def test_per_example_training_of_an_encoder_lowers_its_loss():
    clf = classifier("encoder")
    examples = tiny_task().train
    params = [p for p in clf.parameters() if p.requires_grad]
    with torch.no_grad():
        start = float(clf.loss(examples))
    opt = zoptim.ZOSGD(params, lr=1e-4, eps=1e-2, seed=SEED, module=clf, rank=1, per_example=True)
    for _ in range(30):
        opt.step(lambda: clf.losses(examples))
    with torch.no_grad():
        assert float(clf.loss(examples)) < 0.8 * start
    opt.close()
