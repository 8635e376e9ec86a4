"""Data-parallel zeroth-order training: replicas stay identical and match one process on all the data."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import zoptim
from zoptim.distributed import data_parallel, replicas_in_sync

WORLD = 2


def make_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)


def make_model():
    torch.manual_seed(0)  # the tests' own model init; the library never seeds the global RNG
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def train(model, x, y, steps, loss_of=None):
    opt = zoptim.AS2P(model.parameters(), eps=1e-2, total_steps=steps, seed=7)
    for k in range(steps):
        idx = slice(8 * (k % 4), 8 * (k % 4) + 8)
        closure = (lambda i=idx: torch.nn.functional.mse_loss(model(x[i]), y[i]))
        opt.step(loss_of(closure) if loss_of else closure)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])




def sharded_worker(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    x, y = make_data()
    model = make_model()
    opt = zoptim.AS2P(model.parameters(), eps=1e-2, total_steps=20, seed=7)
    for k in range(20):
        rows = torch.arange(8 * (k % 4), 8 * (k % 4) + 8)[rank::WORLD]  # this rank's half of the batch
        opt.step(data_parallel(lambda r=rows: torch.nn.functional.mse_loss(model(x[r]), y[r])))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ok = replicas_in_sync(model.parameters())
    torch.save({"flat": flat, "in_sync": ok}, f"{out_file}.{rank}")
    dist.barrier()  # neither rank tears gloo down while the other still talks to it
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_data_parallel_replicas_stay_identical_and_match_one_process(tmp_path):
    out = str(tmp_path / "result.pt")
    mp.spawn(sharded_worker, args=(str(tmp_path / "init"), out), nprocs=WORLD, join=True)
    results = [torch.load(f"{out}.{r}") for r in range(WORLD)]
    assert all(r["in_sync"] for r in results)
    assert torch.equal(results[0]["flat"], results[1]["flat"])
    # one process on the whole batch: the mean of the two half-batch means is the full mean
    x, y = make_data()
    single = train(make_model(), x, y, 20)
    assert torch.allclose(results[0]["flat"], single, atol=1e-5)
    assert not torch.equal(single, torch.cat([p.detach().reshape(-1) for p in make_model().parameters()]))


def test_without_a_process_group_the_wrapper_says_what_to_do():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="init_process_group"):
        data_parallel(lambda: 1.0)
