#!/bin/bash
# `zoptim finetune --lora` at its defaults (SmolLM2, rt-sentiment, 200 steps, batch 8, lr 1e-4,
# eps 1e-2) with the default directions (rank 4 per example; this script spells them out, as the
# session that measured it ran the code before the default changed) against --in-place, seeds 0
# and 1; report in $OUT/report.md. Records: docs/results/lm/finetune-lora-default.
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
OUT=${OUT:-runs/finetune-lora-default}
for seed in ${SEEDS:-0 1}; do
  .venv/bin/zoptim finetune --lora --in-place --seed $seed --run-name inplace-s$seed --no-progress --out "$OUT"
  .venv/bin/zoptim finetune --lora --rank 4 --per-example --seed $seed --run-name r4pe-s$seed --no-progress --out "$OUT"
done
