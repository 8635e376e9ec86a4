"""What per-example directions cost an encoder prompt classifier (issue 33): MiniLM on TREC.

The encoder formulation scores each example against the label sentences' embeddings. With one
direction shared by the batch those are embedded once per forward (B + C sequences); with one
direction per example (``per_example=True``) each example embeds its own copy, so that its
directions reach its own logits only (B (1 + C) sequences). Prints the two forwards' medians (15
interleaved repetitions, the unperturbed model) and their ratio, at torch's thread count.

    python benchmarks/encoder_per_example_cost.py
"""

from __future__ import annotations

import statistics
import time

import torch

from zoptim.problems.registry import get_problem


def main() -> None:
    problem = get_problem("lm-minilm-trec-full")
    model = problem.make_model(0)
    batch = problem.sample_batch(torch.Generator().manual_seed(0))
    print("classes", len(model.prompt.label_sentences), "batch", problem.batch_size)
    closures = {"shared": problem.closure(model, batch), "per-example": problem.closure(model, batch, per_example=True)}
    times: dict[str, list[float]] = {name: [] for name in closures}
    with torch.no_grad():
        for f in closures.values():  # warm-up
            f()
        for _ in range(15):
            for name, f in closures.items():
                start = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    print({name: round(t * 1e3, 1) for name, t in med.items()}, "ratio", round(med["per-example"] / med["shared"], 2),
          "threads", torch.get_num_threads())


if __name__ == "__main__":
    main()
