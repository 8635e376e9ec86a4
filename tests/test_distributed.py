"""Distributed zeroth-order training: every mode equals its single-process run, and replicas agree.

Two gloo processes on this machine run 20 steps in each mode of ``zoptim.distributed.wrap``;
the parent process runs the single-process equivalent and compares:

* ``batch``: each rank half of the minibatch, the same direction -> one process on the whole batch;
* ``directions``: each rank its own direction on the same batch -> ZOSGD / AS2P with
  ``num_directions = 2`` in one process (k-SPSA), bit for bit;
* ``sharded``: the model sharded with FSDP2 -> one unsharded process on the whole batch.

Methods: ZOSGD and AS2P in place, with rank-1 directions applied in the forward (``-forward``),
and ZOSGD's orthogonalised update (``-orth``: the factors are functions of the step's keys, so
every rank forms the same update); per-example directions in batch mode.
"""

from __future__ import annotations

import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import zoptim
from zoptim.distributed import replicas_in_sync, wrap

WORLD = 2
STEPS = 20
METHODS = ["zosgd", "as2p", "zosgd-forward", "as2p-forward", "zosgd-orth"]

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")


def make_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)


def make_model():
    torch.manual_seed(0)  # the tests' own model init; the library never seeds the global RNG
    return torch.nn.Sequential(torch.nn.Linear(8, 9), torch.nn.Tanh(), torch.nn.Linear(9, 1))


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def build(method, model, num_directions=1):
    """``method``: zosgd or as2p, with ``-forward`` for rank-1 directions applied in the forward;
    zosgd-orth: those directions and the orthogonalised update."""
    forward = dict(module=model, rank=1) if method.endswith(("-forward", "-orth")) else {}
    if method == "zosgd-orth":
        return zoptim.ZOSGD(model.parameters(), lr=2e-3, eps=1e-2, num_directions=num_directions, seed=7,
                            orthogonalize=True, **forward)
    if method.startswith("zosgd"):
        return zoptim.ZOSGD(model.parameters(), lr=5e-3, eps=1e-2, num_directions=num_directions, seed=7, **forward)
    return zoptim.AS2P(model.parameters(), eps=1e-2, total_steps=STEPS, num_directions=num_directions, seed=7,
                       **forward)


def close(opt):
    """Remove a forward optimizer's hooks before the test builds another one over the same model."""
    getattr(opt, "optimizer", opt).close()


def batch_rows(k):
    return torch.arange(8 * (k % 4), 8 * (k % 4) + 8)


def train(opt, model, rows_of=batch_rows):
    x, y = make_data()
    for k in range(STEPS):
        rows = rows_of(k)
        opt.step(lambda r=rows: torch.nn.functional.mse_loss(model(x[r]), y[r]))
    return model


PER_EXAMPLE = ["zosgd", "as2p", "zosgd-orth"]
#: the same method with one direction shared by the minibatch
SHARED = {"zosgd": "zosgd-forward", "as2p": "as2p-forward", "zosgd-orth": "zosgd-orth"}


def build_per_example(method, model):
    """``per_example=True``: each example of the minibatch at its own rank-1 direction."""
    if method == "zosgd-orth":
        return zoptim.ZOSGD(model.parameters(), lr=2e-3, eps=1e-2, seed=7, module=model, rank=1, per_example=True,
                            orthogonalize=True)
    if method == "zosgd":
        return zoptim.ZOSGD(model.parameters(), lr=5e-3, eps=1e-2, seed=7, module=model, rank=1, per_example=True)
    return zoptim.AS2P(model.parameters(), eps=1e-2, total_steps=STEPS, seed=7, module=model, rank=1, per_example=True)


def per_example_losses(model, x, y):
    return ((model(x) - y) ** 2).mean(1)


def train_per_example(opt, model, rows_of=batch_rows):
    x, y = make_data()
    for k in range(STEPS):
        rows = rows_of(k)
        opt.step(lambda r=rows: per_example_losses(model, x[r], y[r]))
    return model


def shard(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def faulty_run(opt, model, rank, mode):
    """10 steps in which rank 1's loss is NaN at step 3 and its closure raises at step 6 (after its forward)."""
    x, y = make_data()
    errors = []
    for k in range(10):
        rows = batch_rows(k) if mode == "directions" else batch_rows(k)[rank::WORLD]

        def closure(r=rows, k=k):
            # after the forward: in sharded mode the forward itself all-gathers the shards
            loss = torch.nn.functional.mse_loss(model(x[r]), y[r])
            if rank == 1 and k == 3:
                return loss * float("nan")
            if rank == 1 and k == 6:
                raise RuntimeError("boom on rank 1")
            return loss

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", zoptim.NonFiniteLossWarning)
                opt.step(closure)
        except RuntimeError as err:
            errors.append((k, str(err)))
    params = torch.cat([(p.full_tensor() if mode == "sharded" else p.detach()).reshape(-1) for p in model.parameters()])
    return params, opt.nonfinite_steps, errors, opt.steps


def worker(rank, init_file, out_file):
    # a short timeout: a rank left waiting in a collective fails the test in a minute, not 30
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    mine = lambda k: batch_rows(k)[rank::WORLD]  # noqa: E731 - this rank's half of the batch
    results = {}
    for method in METHODS:
        model = make_model()
        opt = wrap(build(method, model), mode="batch")
        train(opt, model, mine)
        results[f"batch-{method}"] = (flat(model), replicas_in_sync(model.parameters()), opt.stats.bytes_sent)

        model = make_model()
        opt = wrap(build(method, model), mode="directions")
        train(opt, model)
        results[f"directions-{method}"] = (flat(model), replicas_in_sync(model.parameters()), opt.stats.bytes_sent)

    for method in ("zosgd", "zosgd-forward"):
        model = shard(make_model())
        opt = wrap(build(method, model), mode="sharded", module=model)
        local = sum(p.to_local().numel() for p in model.parameters())
        x, y = make_data()
        written = 0  # queries at which this rank's shard differed from the step's start
        for k in range(STEPS):
            rows = mine(k)
            start = [p.to_local().clone() for p in model.parameters()]

            def closure(r=rows, start=start, model=model, x=x, y=y):
                nonlocal written
                written += any(not torch.equal(p.to_local(), s) for p, s in zip(model.parameters(), start))
                return torch.nn.functional.mse_loss(model(x[r]), y[r])

            opt.step(closure)
        held_after = [type(p).__name__ for p in model.parameters()]
        full = torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])
        results[f"sharded-{method}"] = (full, local, held_after, opt.stats.bytes_sent, written, opt.released_memory)
        close(opt)
    for method in PER_EXAMPLE:
        model = make_model()
        opt = wrap(build_per_example(method, model), mode="batch")
        train_per_example(opt, model, mine)
        results[f"per-example-{method}"] = (flat(model), replicas_in_sync(model.parameters()), opt.stats.bytes_sent)
        close(opt)
    model = make_model()  # unequal shares: rank 0 five examples, rank 1 three
    opt = wrap(build_per_example("zosgd", model), mode="batch")
    x, y = make_data()
    rows = torch.arange(5) if rank == 0 else torch.arange(5, 8)
    try:
        opt.step(lambda: per_example_losses(model, x[rows], y[rows]))
        results["per-example-uneven"] = (None, flat(model))
    except ValueError as err:
        results["per-example-uneven"] = (str(err), flat(model))
    close(opt)
    for mode in ("batch", "directions", "sharded"):
        model = shard(make_model()) if mode == "sharded" else make_model()
        opt = wrap(build("zosgd", model), mode=mode, module=model if mode == "sharded" else None)
        results[f"faults-{mode}"] = faulty_run(opt, model, rank, mode)
    torch.save(results, f"{out_file}.{rank}")
    dist.barrier()  # neither rank tears gloo down while the other still talks to it
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    out = str(tmp / "result.pt")
    mp.spawn(worker, args=(str(tmp / "init"), out), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.{r}") for r in range(WORLD)]


@pytest.mark.parametrize("method", METHODS)
def test_batch_mode_equals_one_process_on_the_whole_batch(two_ranks, method):
    (a, in_sync, sent), (b, *_) = two_ranks[0][f"batch-{method}"], two_ranks[1][f"batch-{method}"]
    assert in_sync and torch.equal(a, b)
    model = make_model()
    single = flat(train(build(method, model), model))
    assert torch.allclose(a, single, atol=1e-5)
    assert not torch.allclose(single, flat(make_model()), atol=1e-3)  # the run did move
    assert sent == STEPS * 2 * 16  # the loss and a failure flag, float64, per query


@pytest.mark.parametrize("method", PER_EXAMPLE)
def test_per_example_batch_mode_equals_one_process_on_the_whole_batch(two_ranks, method):
    """Rank r holds examples r, r + 2, ... of each minibatch at those examples' directions; the
    ranks all-gather their per-example losses, so the run is the one-process per-example run."""
    (a, in_sync, sent), (b, *_) = two_ranks[0][f"per-example-{method}"], two_ranks[1][f"per-example-{method}"]
    assert in_sync and torch.equal(a, b)
    model = make_model()
    opt = build_per_example(method, model)
    single = flat(train_per_example(opt, model))
    close(opt)
    assert torch.allclose(a, single, atol=1e-5)
    model = make_model()  # not the run whose ranks evaluate their examples at the same directions
    opt = build(SHARED[method], model)
    assert not torch.allclose(a, flat(train(opt, model)), atol=1e-4)
    close(opt)
    assert sent == STEPS * 2 * (16 + 8 * 4)  # per query: shares' sizes and flags, then 4 losses, float64


def test_per_example_batch_mode_with_unequal_shares_is_refused_on_every_rank(two_ranks):
    for r in range(WORLD):
        error, params = two_ranks[r]["per-example-uneven"]
        assert error is not None and "as many examples" in error and "[5, 3]" in error
        assert torch.equal(params, flat(make_model()))  # restored, on every rank


@pytest.mark.parametrize("method", METHODS)
def test_directions_mode_equals_k_directions_in_one_process(two_ranks, method):
    (a, in_sync, sent), (b, *_) = two_ranks[0][f"directions-{method}"], two_ranks[1][f"directions-{method}"]
    assert in_sync and torch.equal(a, b)
    model = make_model()
    opt = build(method, model, num_directions=WORLD)
    single = flat(train(opt, model))
    close(opt)
    # bit for bit: each rank's exact undo of its own direction lands on the same point, and every
    # rank applies the directions' terms in the order one process does
    assert torch.equal(a, single)
    # and not the one-direction run: the second rank's direction was applied too
    model = make_model()  # a fresh model: no hooks of the run above
    assert not torch.allclose(a, flat(train(build(method, model), model)), atol=1e-4)
    assert sent == STEPS * 4 * 8  # (gamma, f+, f-) per direction and the rank's status, float64


@pytest.mark.parametrize("method", ["zosgd", "zosgd-forward"])
def test_sharded_mode_equals_one_unsharded_process_and_never_holds_the_whole_model(two_ranks, method):
    """In place (each rank moves its shard) or with rank-1 directions applied in the forward (the
    queries write no shard; each rank's update writes its rows of A B^T)."""
    (a, local0, held, sent, written, released), (b, local1, *_) = (two_ranks[r][f"sharded-{method}"] for r in range(WORLD))
    assert torch.equal(a, b)
    model = make_model()
    opt = build(method, model)
    single = flat(train(opt, model))
    close(opt)
    assert torch.allclose(a, single, atol=1e-5)
    # on Linux (glibc) the wrapper fixed the mmap threshold: gathered buffers go back when freed
    import sys

    assert released == sys.platform.startswith("linux")
    # in place every query writes the shard; in the forward none does
    assert written == (0 if method.endswith("-forward") else 2 * STEPS)
    total = single.numel()
    assert local0 + local1 == total and max(local0, local1) < total  # each rank moved only its shard
    assert held == ["DTensor"] * 4  # after the run the module holds its shards, not gathered tensors
    assert sent == STEPS * 2 * 16


@pytest.mark.parametrize("mode", ["batch", "directions", "sharded"])
def test_a_nan_or_an_exception_on_one_rank_makes_every_rank_skip_or_abandon_the_same_step(two_ranks, mode):
    """Rank 1's loss is NaN at step 3 and its closure raises at step 6: both ranks skip step 3 and
    abandon step 6 together (rank 0 with a RuntimeError naming the cause), nobody waits for the
    process group's timeout, and the replicas stay bit-identical through the 10 steps."""
    (a, skipped0, errors0, steps0), (b, skipped1, errors1, steps1) = (two_ranks[r][f"faults-{mode}"] for r in range(WORLD))
    assert torch.equal(a, b)
    assert not torch.equal(a, flat(make_model()))  # the other steps trained
    assert skipped0 == skipped1 == 1 and steps0 == steps1 == 10
    assert [k for k, _ in errors1] == [6] and "boom on rank 1" in errors1[0][1]
    assert [k for k, _ in errors0] == [6] and "raised" in errors0[0][1] and "abandons the step too" in errors0[0][1]


def test_without_a_process_group_the_wrapper_says_what_to_do():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="init_process_group"):
        zoptim.distributed.data_parallel(lambda: 1.0)
    model = make_model()
    with pytest.raises(RuntimeError, match="init_process_group"):
        wrap(build("zosgd", model), mode="batch")


def test_methods_that_cannot_split_their_directions_say_so():
    model = make_model()
    with pytest.raises(ValueError, match="supports ZOSGD and AS2P"):
        zoptim.STP(model.parameters()).shard_directions(0, 2, lambda v: [v, v])


@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
def test_a_shard_moves_with_the_values_of_the_global_direction_at_its_elements(distribution):
    """What sharded mode rests on: rows [4, 10) of a (10, 3) parameter, offset 12, move exactly as
    those rows move in the whole tensor, temporary moves, exact undo and update included."""
    from zoptim.engine.inplace import SeededPerturbation

    g = torch.Generator().manual_seed(0)
    whole = torch.randn(10, 3, generator=g)
    top, bottom = whole[:4].clone(), whole[4:].clone()
    engines = [SeededPerturbation([whole], distribution=distribution),
               SeededPerturbation([top], distribution=distribution),
               SeededPerturbation([bottom], distribution=distribution, offsets=[12])]
    for e in engines:
        e.move(123, 0.3)
    assert torch.equal(torch.cat([top, bottom]), whole)
    for e in engines:
        e.update([(123, -0.01), (456, 0.02)])
    assert torch.equal(torch.cat([top, bottom]), whole)
    assert not torch.equal(whole, torch.randn(10, 3, generator=torch.Generator().manual_seed(0)))


def test_a_mode_that_does_not_exist_is_named():
    with pytest.raises(ValueError, match="mode must be one of 'batch', 'directions', 'sharded'"):
        wrap(build("zosgd", make_model()), mode="pipeline")
