"""How the rank of the directions shapes the descent on MiniLM TREC with all weights.

GA (full-rank directions, in place, or in the forward with ``rank=None``: the same numbers) against
rank-r directions applied in the forward, shared by the minibatch or one per example, each at the
same constant lr and eps for 100 steps on the bench problem ``lm-minilm-trec-full`` (minibatch 4,
the batches and the optimizer's seed of the bench's seed ``--seed``); prints the full loss (32
training examples) every 25 steps. A probe behind docs/benchmarks.md's orth-lm section: within a
seed a row differs from another by its directions alone.

    python benchmarks/lm_rank_probe.py [--lr 1e-5] [--steps 100] [--seed 0] [--rows ga shared4 pe4 ...] [--freeze-embeddings]

``--freeze-embeddings``: the embedding layer (word, position and token-type matrices and its LayerNorm) is
not trained.

Rows: ``ga`` (in place), ``gafwd`` (``module=model, rank=None``), ``sharedR`` (``rank=R``), ``peR``
(``rank=R, per_example=True``), ``peRs`` (and ``sparse_embeddings=True``), ``sharedRfe`` (``rank=R``
but the embedding matrices' directions full rank: drawn at the looked-up rows in the forward as
``rank=None`` draws them, and updated in full; the engine's layout is patched for this script only).
"""

from __future__ import annotations

import argparse

import torch

import zoptim
from zoptim.engine import forward
from zoptim.engine.layers import EmbeddingHandler
from zoptim.lm import models as lm_models
from zoptim.problems import get_problem

_register_hooks = forward.ForwardPerturbation._register_hooks


def _full_rank_embeddings(engine, index):
    """The engine's hook registration, then every matrix only ``nn.Embedding`` uses marked full rank."""
    hooked = _register_hooks(engine, index)
    for j, handlers in engine._handlers.items():
        if handlers == {EmbeddingHandler}:
            engine.kind[j] = "full"
    return hooked


def run(row: str, lr: float, steps: int, freeze_embeddings: bool = False, seed: int = 0) -> list[float]:
    problem = get_problem("lm-minilm-trec-full")
    model = problem.make_model(0)
    if freeze_embeddings:
        lm_models.freeze_embeddings(model)
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=lr, eps=1e-3, seed=seed)
    per_example = row.startswith("pe")
    if row == "ga":
        opt = zoptim.ZOSGD(params, **kw)
    elif row == "gafwd":
        opt = zoptim.ZOSGD(params, module=model, rank=None, **kw)
    elif row.startswith("shared") and row.endswith("fe"):
        forward.ForwardPerturbation._register_hooks = _full_rank_embeddings
        try:
            opt = zoptim.ZOSGD(params, module=model, rank=int(row[6:-2]), **kw)
        finally:
            forward.ForwardPerturbation._register_hooks = _register_hooks
    elif row.startswith("shared"):
        opt = zoptim.ZOSGD(params, module=model, rank=int(row[6:]), **kw)
    elif per_example:
        sparse = row.endswith("s")
        opt = zoptim.ZOSGD(params, module=model, rank=int(row[2:].rstrip("s")), per_example=True,
                           sparse_embeddings=sparse, **kw)
    else:
        raise ValueError(f"unknown row {row!r}")
    batches = torch.Generator().manual_seed(1_000_003 * (seed + 1))  # the bench's batch stream of this seed
    losses = []
    for step in range(steps):
        opt.step(problem.closure(model, problem.sample_batch(batches), per_example=per_example))
        if (step + 1) % 25 == 0:
            losses.append(round(problem.full_loss(model), 4))
    opt.close()
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rows", nargs="+", default=["ga", "shared4", "shared16", "shared64", "pe4", "pe4s", "pe16"])
    ap.add_argument("--seed", type=int, default=0, help="the bench seed whose batches and optimizer seed to use")
    ap.add_argument("--freeze-embeddings", action="store_true")
    args = ap.parse_args()
    frozen = ", embeddings frozen" if args.freeze_embeddings else ""
    print(f"# MiniLM TREC full{frozen}, seed {args.seed}, lr {args.lr}, eps 1e-3, full loss every 25 steps "
          "(start 1.369)")
    for row in args.rows:
        print(f"{row:10s} {run(row, args.lr, args.steps, args.freeze_embeddings, args.seed)}", flush=True)


if __name__ == "__main__":
    main()
