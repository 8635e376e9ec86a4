"""What per-example directions cost an encoder prompt classifier (issue 33): MiniLM on TREC.

The encoder formulation scores each example against the label sentences' embeddings. With one
direction shared by the batch those are embedded once per forward (B + C sequences); with one
direction per example (``per_example=True``) each example embeds its own copy, so that its
directions reach its own logits only (B (1 + C) sequences). Prints the two forwards' medians (15
interleaved repetitions, the unperturbed model) and their ratio, at torch's thread count.

    python benchmarks/encoder_per_example_cost.py
"""

import torch, time, statistics
from zoptim.problems.registry import get_problem
p = get_problem("lm-minilm-trec-full")
model = p.make_model(0)
g = torch.Generator().manual_seed(0)
batch = p.sample_batch(g)
print("classes", len(model.prompt.label_sentences), "batch", p.batch_size)
with torch.no_grad():
    shared = p.closure(model, batch); each = p.closure(model, batch, per_example=True)
    for f in (shared, each): f()
    ts = {"shared": [], "per-example": []}
    for _ in range(15):
        for name, f in (("shared", shared), ("per-example", each)):
            a = time.perf_counter(); f(); ts[name].append(time.perf_counter() - a)
m = {k: statistics.median(v) for k, v in ts.items()}
print({k: round(v * 1e3, 1) for k, v in m.items()}, "ratio", round(m["per-example"] / m["shared"], 2), "threads", torch.get_num_threads())
