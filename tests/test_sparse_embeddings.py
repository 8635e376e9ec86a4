"""Sparse embedding updates (``sparse_embeddings=True``, :mod:`zoptim.engine.forward`): an embedding
matrix moves only in the rows its queries looked up, each direction in the rows of its own examples.

The loss of example i does not depend on the rows its tokens do not look up, so its delta does not
depend on its direction there either: masking the estimate to those rows keeps E[delta_i S_i] (that
part of the gradient is zero) and drops the rest, which is noise. Checked against a reference
written from the formulas: the directions materialised (``reference.lowrank_direction``), the
queries' losses by hand, the mask by the ids, ``torch.linalg.svd`` for the orthogonalised step.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import reference
import zoptim
from test_forward import Net, build, trainable
from test_orthogonal import reference_orthogonal_step
from zoptim.engine.noise import mix
from zoptim.optim.options import OptionError, Options, check_options

SEED = 5
VOCAB = 40


def model_and_ids(tied: bool = False):
    torch.manual_seed(0)
    model = Net(vocab=VOCAB, width=6, tied=tied)
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (4, 3))  # 12 lookups of 40 rows: most rows unused
    return model, ids


def per_example_loss(model, ids):
    return model(ids).square().mean(dim=(1, 2))


def reference_step(model, ids, lr, eps, rank, per_example, k=1, orthogonalize=False):
    """One ZOSGD step from the formulas, the embedding's estimate masked to the looked-up rows."""
    params = trainable(model)
    n = ids.shape[0] if per_example else k
    keys = [mix(SEED, 0, i) for i in range(n)]
    dirs = [[reference.lowrank_direction(key, j, tuple(p.shape), rank if p.dim() >= 2 else None).double()
             for j, p in enumerate(params)] for key in keys]

    def loss_at(i, sign):
        point = copy.deepcopy(model)
        with torch.no_grad():
            for p, s in zip(trainable(point), dirs[i]):
                p.add_((s * sign * eps).to(p.dtype))
            losses = per_example_loss(point, ids).double()
        return losses[i] if per_example else losses.mean()

    deltas = [(loss_at(i, 1.0) - loss_at(i, -1.0)) / (2 * eps) for i in range(n)]
    looked = [sorted(set(ids[i].tolist())) if per_example else sorted(set(ids.flatten().tolist())) for i in range(n)]
    want = []
    for j, p in enumerate(params):
        terms = []
        for i, d in enumerate(deltas):
            s = dirs[i][j]
            if j == 0:  # the embedding: direction i in its examples' rows only
                mask = torch.zeros(VOCAB, 1, dtype=torch.float64)
                mask[looked[i]] = 1.0
                s = s * mask
            terms.append(-d / n * s)
        estimate = sum(terms)
        if not orthogonalize:
            step = lr * estimate
        elif j == 0:  # the polar factor of the block of looked-up rows, RMS lr over that block
            rows = sorted(set(r for lk in looked for r in lk))
            step = torch.zeros_like(estimate)
            step[rows] = reference_orthogonal_step(estimate[rows], lr, matrix=True)
        else:
            step = reference_orthogonal_step(estimate, lr, matrix=p.dim() >= 2)
        want.append(p.detach().double() + step)
    return want


@pytest.mark.parametrize("orthogonalize", [False, True], ids=["sgd", "orthogonalised"])
@pytest.mark.parametrize("per_example,k", [(True, 1), (False, 3)], ids=["per-example", "3-shared-directions"])
@pytest.mark.parametrize("rank", [1, 2])
def test_one_step_moves_the_embedding_only_in_the_rows_each_direction_looked_up(rank, per_example, k,
                                                                                 orthogonalize):
    model, ids = model_and_ids()
    want = reference_step(model, ids, 0.05, 0.01, rank, per_example, k, orthogonalize)
    opt = zoptim.ZOSGD(trainable(model), lr=0.05, eps=0.01, seed=SEED, module=model, rank=rank,
                       per_example=per_example, num_directions=k, orthogonalize=orthogonalize,
                       sparse_embeddings=True)
    assert opt.engine.sparse_rows == {0}
    before = model.embed.weight.detach().clone()
    opt.step(lambda: per_example_loss(model, ids) if per_example else per_example_loss(model, ids).mean())
    for p, w in zip(trainable(model), want):
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-4, atol=2e-6)
    moved = (model.embed.weight != before).any(dim=1).nonzero().flatten().tolist()
    assert moved == sorted(set(ids.flatten().tolist()))
    opt.close()


def test_a_weight_tied_to_an_output_layer_stays_dense():
    """The tied head reads every row, so each row's estimate carries signal: no masking."""
    model, ids = model_and_ids(tied=True)
    opt = zoptim.ZOSGD(trainable(model), lr=0.05, eps=0.01, module=model, rank=1, sparse_embeddings=True)
    assert opt.engine.sparse_rows == frozenset()
    before = model.embed.weight.detach().clone()
    opt.step(lambda: per_example_loss(model, ids).mean())
    assert bool((model.embed.weight != before).all(dim=1).all())
    opt.close()


def test_the_masked_estimate_is_unbiased_and_less_noisy():
    """Over 4,000 draws of per-example rank-1 directions, the masked estimate of the embedding's
    gradient and the dense one both average to the true gradient (within 5 standard errors per
    entry; the loss is linear in the embedding, so each delta is exact), and the masked one's total
    variance is a fraction of the dense one's: the 26 rows no example looks up carry only noise."""
    torch.manual_seed(0)
    vocab, width, n, draws, eps = 30, 4, 3, 4000, 1e-3
    weight = torch.randn(vocab, width, dtype=torch.float64)
    ids = torch.tensor([[1, 2], [2, 5], [7, 7]])
    target = torch.randn(n, width, dtype=torch.float64)

    def loss_i(w, i):  # example i: <the mean of its rows, target_i>; w is (draws, vocab, width)
        return (w[:, ids[i]].mean(1) * target[i]).sum(1)

    true = torch.zeros(vocab, width, dtype=torch.float64)
    for i in range(n):
        for v in ids[i].tolist():
            true[v] += target[i] / ids.shape[1] / n
    g = torch.Generator().manual_seed(3)
    dense = torch.zeros(draws, vocab, width, dtype=torch.float64)
    masked = torch.zeros_like(dense)
    for i in range(n):
        a = torch.randn(draws, vocab, 1, generator=g, dtype=torch.float64)
        b = torch.randn(draws, 1, width, generator=g, dtype=torch.float64)
        s = a * b
        delta = (loss_i(weight + eps * s, i) - loss_i(weight - eps * s, i)) / (2 * eps)
        mask = torch.zeros(vocab, 1, dtype=torch.float64)
        mask[ids[i]] = 1.0
        dense += delta[:, None, None] * s / n
        masked += delta[:, None, None] * s * mask / n
    for est in (dense, masked):
        err = (est.mean(0) - true).abs()
        assert bool((err <= 5 * est.std(0) / math.sqrt(draws) + 1e-9).all())
    assert float(masked.var(0).sum()) < 0.25 * float(dense.var(0).sum())


def test_per_example_steps_with_sparse_embeddings_train_the_network():
    model, ids = model_and_ids()
    opt = zoptim.ZOSGD(trainable(model), lr=0.02, eps=1e-3, module=model, rank=1, per_example=True,
                       orthogonalize=True, sparse_embeddings=True)
    with torch.no_grad():
        start = float(per_example_loss(model, ids).mean())
    for _ in range(60):
        opt.step(lambda: per_example_loss(model, ids))
    with torch.no_grad():
        assert float(per_example_loss(model, ids).mean()) < 0.8 * start


@pytest.mark.parametrize("options,message", [
    (dict(module=True), "sparse_embeddings=True needs rank=r"),
    (dict(module=True, rank=1, momentum=True), "does not combine with momentum > 0"),
    (dict(module=True, rank=1, distributed=True), "does not combine with zoptim.distributed.wrap"),
    (dict(module=True, rank=1, directions_mode=True), "does not combine with zoptim.distributed.wrap"),
    (dict(module=True, rank=1, shard=True), "does not combine with zoptim.distributed.wrap"),
])
def test_it_is_refused_where_the_looked_up_rows_are_not_known(options, message):
    with pytest.raises(OptionError, match=message):
        check_options(Options(sparse_embeddings=True, **options))


def test_the_optimizers_refuse_it_with_momentum_or_without_rank():
    model, _ = model_and_ids()
    with pytest.raises(ValueError, match="momentum"):
        zoptim.ZOSGD(trainable(model), module=model, rank=1, momentum=0.9, sparse_embeddings=True)
    with pytest.raises(ValueError, match="needs rank=r"):
        zoptim.AS2P(trainable(model), module=model, sparse_embeddings=True, total_steps=10)


def test_the_state_records_the_option():
    model, ids = model_and_ids()
    opt = zoptim.ZOSGD(trainable(model), module=model, rank=1, sparse_embeddings=True)
    opt.step(lambda: per_example_loss(model, ids).mean())
    state = opt.state_dict()
    opt.close()
    other = zoptim.ZOSGD(trainable(model), module=model, rank=1)
    with pytest.raises(ValueError, match="sparse_embeddings=True"):
        other.load_state_dict(state)
    other.close()


def test_as2p_takes_sparse_embedding_steps():
    model, ids = model_and_ids()
    before = model.embed.weight.detach().clone()
    opt = zoptim.AS2P(trainable(model), eps=1e-2, module=model, rank=1, per_example=True, sparse_embeddings=True,
                      total_steps=5)
    for _ in range(3):
        opt.step(lambda: per_example_loss(model, ids))
    moved = (model.embed.weight != before).any(dim=1).nonzero().flatten().tolist()
    assert moved == sorted(set(ids.flatten().tolist()))


def test_a_model_without_embeddings_is_unchanged_by_the_option():
    model, x = build("conv2d")
    twin = copy.deepcopy(model)
    a = zoptim.ZOSGD(trainable(model), lr=0.01, module=model, rank=1, sparse_embeddings=True)
    b = zoptim.ZOSGD(trainable(twin), lr=0.01, module=twin, rank=1)
    for _ in range(3):
        a.step(lambda: model(x).square().mean())
        b.step(lambda: twin(x).square().mean())
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
