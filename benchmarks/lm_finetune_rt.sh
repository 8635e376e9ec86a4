#!/bin/bash
# The SmolLM2 rt-sentiment comparison of README.md / docs/finetune.md at 1,000 forward passes per
# method: zero-shot vs AS2P vs ZOSGD (MeZO) vs AdamW, LoRA, batch 4, test on all 1,000 sampled test
# examples. ZO methods: 500 steps x 2 queries, at the per-method defaults (ZOSGD lr 1e-4 / eps 1e-2,
# MeZO's LoRA setting; AS2P rho_0 1e-2, eta_b 50, the S2P paper's LLM setting) and at a 10x larger
# step (ZOSGD lr 1e-3, AS2P eta_b 5). AdamW: 1,000 steps x 1 forward (+ backward).
# The report (all runs, cost ratio of the last AS2P/ZOSGD pair) lands in $OUT/report.md.
# ZOSGD runs --in-place, as when the recorded results were made: zosgd with --lora now defaults to
# rank-4 per-example directions in the forward.
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
OUT=${OUT:-runs/lm-rt2}
mkdir -p "$OUT"
COMMON="--model smollm2 --task rt-sentiment --lora --batch-size 4 --max-length 64 --eval-every 100 --eval-examples 100 --test-examples 1000 --no-progress --out $OUT"
.venv/bin/zoptim finetune $COMMON --method as2p --steps 500 > "$OUT/as2p.log" 2>&1 &
(while [ ! -f "$OUT/zero_shot.json" ]; do sleep 5; done; .venv/bin/zoptim finetune $COMMON --method zosgd --in-place --steps 500 > "$OUT/zosgd.log" 2>&1) &
(while [ ! -f "$OUT/zero_shot.json" ]; do sleep 5; done; .venv/bin/zoptim finetune $COMMON --method adamw --steps 1000 --eval-every 200 > "$OUT/adamw.log" 2>&1) &
wait
.venv/bin/zoptim finetune $COMMON --method zosgd --in-place --lr 1e-3 --steps 500 --run-name zosgd-lr1e-3 > "$OUT/zosgd-lr1e-3.log" 2>&1 &
.venv/bin/zoptim finetune $COMMON --method as2p --eta-b 5 --steps 500 --run-name as2p-etab5 > "$OUT/as2p-etab5.log" 2>&1 &
wait
.venv/bin/python -c "from zoptim.lm.report import write_report; write_report('$OUT')"
