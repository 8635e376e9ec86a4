#!/bin/bash
# The SmolLM2 rt-sentiment comparison of docs/finetune.md: zero-shot vs AS2P vs ZOSGD (MeZO) vs
# AdamW, LoRA, batch 4, equal forward passes (ZO: 60 steps x 2 queries; AdamW: 120 steps x 1).
# The three runs go in parallel; the report lands in $OUT/report.md.
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
OUT=${OUT:-runs/lm-rt}
mkdir -p "$OUT"
COMMON="--model smollm2 --task rt-sentiment --lora --batch-size 4 --max-length 64 --eval-every 20 --eval-examples 100 --test-examples 300 --no-progress --out $OUT"
.venv/bin/zoptim finetune $COMMON --method as2p --steps 60 > "$OUT/as2p.log" 2>&1 &
(while [ ! -f "$OUT/zero_shot.json" ]; do sleep 5; done; .venv/bin/zoptim finetune $COMMON --method zosgd --steps 60 > "$OUT/zosgd.log" 2>&1) &
(while [ ! -f "$OUT/zero_shot.json" ]; do sleep 5; done; .venv/bin/zoptim finetune $COMMON --method adamw --steps 120 --eval-every 40 > "$OUT/adamw.log" 2>&1) &
wait
