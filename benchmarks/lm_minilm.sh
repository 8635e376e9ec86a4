#!/bin/bash
# MiniLM (all-MiniLM-L6-v2, 22.7M parameters, all tuned) on TREC and rt-sentiment, issue 11:
# zero-shot vs ZOSGD (MeZO) vs AS2P vs AdamW at 1,000 forward passes per method, batch 4,
# MeZO's 1,000 / 500 / 1,000 sampling, seeds 0 1 2 (the seed draws the data split, the batches
# and the directions). ZOSGD: lr 1e-5, eps 1e-3 (the top of MeZO's full-parameter grid; the
# default 1e-6 barely moves in 500 steps); AS2P: the S2P paper's defaults (rho_0 1e-3, eta_b 50);
# AdamW: lr 1e-5 (MeZO's full fine-tuning grid). One run at a time, one thread, nice'd.
# Results: $OUT/<task>/seed<k>/report.md; summary: benchmarks/lm_summary.py.
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
OUT=${OUT:-runs/lm-minilm}
SEEDS=${SEEDS:-"0 1 2"}
TASKS=${TASKS:-"trec rt-sentiment"}
ZO=${ZOPTIM:-.venv/bin/zoptim}
for seed in $SEEDS; do
  for task in $TASKS; do
    D="$OUT/$task/seed$seed"
    mkdir -p "$D"
    COMMON="--model minilm --task $task --batch-size 4 --max-length 64 --eval-every 100 --eval-examples 200 --test-examples 1000 --seed $seed --no-progress --no-save-model --out $D"
    # a run whose result.json exists is skipped: the script resumes where it stopped
    [ -f "$D/zosgd/result.json" ] || nice -n 15 $ZO finetune $COMMON --method zosgd --lr 1e-5 --eps 1e-3 --steps 500 > "$D/zosgd.log" 2>&1
    [ -f "$D/as2p/result.json" ] || nice -n 15 $ZO finetune $COMMON --method as2p --eps 1e-3 --steps 500 > "$D/as2p.log" 2>&1
    [ -f "$D/adamw/result.json" ] || nice -n 15 $ZO finetune $COMMON --method adamw --lr 1e-5 --steps 1000 --eval-every 200 > "$D/adamw.log" 2>&1
  done
done
