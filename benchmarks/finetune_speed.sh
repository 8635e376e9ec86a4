#!/bin/bash
# Wall-clock time per step of `zoptim finetune` on SmolLM2-135M with all 134.5M weights tuned
# (float32, batch 8 x 64 tokens, rt-sentiment, ZOSGD): full-rank directions in place (today's
# default) against rank-1 directions applied in the forward (--rank 1). STEPS steps each (default
# 20; the time per 100 steps is printed, scaled from the logged training time), run one after the
# other at torch's default threads, nothing else running.
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
STEPS=${STEPS:-20}
OUT=${OUT:-runs/finetune-speed}
rm -rf "$OUT"
COMMON="--model smollm2 --task rt-sentiment --method zosgd --lr 1e-6 --steps $STEPS --batch-size 8 --max-length 64 \
  --eval-every $STEPS --eval-examples 8 --test-examples 8 --no-save-model --no-progress --out $OUT"
.venv/bin/zoptim finetune $COMMON --run-name in-place > "$OUT.in-place.log" 2>&1
.venv/bin/zoptim finetune $COMMON --rank 1 --run-name forward-rank1 > "$OUT.forward.log" 2>&1
.venv/bin/python - "$OUT" "$STEPS" <<'PY'
import json, sys
out, steps = sys.argv[1], int(sys.argv[2])
for run in ("in-place", "forward-rank1"):
    log = [json.loads(line) for line in open(f"{out}/{run}/log.jsonl")]
    seconds = log[-1]["time"]
    print(f"{run:14s} {steps} steps in {seconds:7.1f} s: {100 * seconds / steps:7.1f} s per 100 steps")
PY
