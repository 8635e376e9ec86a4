#!/bin/bash
# SmolLM2-135M full-parameter fine-tuning on rt-sentiment, issue 11: float32 and bfloat16, AS2P and
# ZOSGD (MeZO) at 1,000 forward passes (500 steps x 2 queries), the bf16 runs also with
# exact_restore=False (--no-exact-restore: MeZO's arithmetic undo) as the control, and AdamW
# (1,000 steps, float32) as the first-order reference. Batch 4, prompts up to 64 tokens, MeZO's
# 1,000 / 500 / 1,000 sampling; test accuracy on all 1,000 test examples. Method defaults for
# full-parameter tuning (zoptim.lm.train): ZOSGD lr 1e-6, eps 1e-3 (MeZO); AS2P rho_0 1e-3,
# eta_b 50 (S2P paper Table 4); AdamW lr 1e-5. One run at a time.
#   DEVICE=cuda SEEDS="0 1 2" OUT=runs/lm-smollm2-full benchmarks/lm_smollm2_full.sh
# Subsets: DTYPES="bf16" METHODS="zosgd" CONTROLS="zosgd" (rerun with --no-exact-restore; "" for
# none) SEEDS="0"; the AdamW run only with fp32.
# A run whose result.json exists is skipped, so the script resumes where it stopped.
# Results: $OUT/<fp32|bf16>/seed<k>/<run>/result.json (+ log.jsonl); summary: benchmarks/lm_summary.py.
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
OUT=${OUT:-runs/lm-smollm2-full}
SEEDS=${SEEDS:-"0 1 2"}
DEVICE=${DEVICE:-auto}
DTYPES=${DTYPES:-"fp32 bf16"}
METHODS=${METHODS-"zosgd as2p"}
CONTROLS=${CONTROLS-"zosgd as2p"}
ZO=${ZOPTIM:-.venv/bin/zoptim}
NICE=${NICE:-nice -n 15}
for seed in $SEEDS; do
  for dtype in $DTYPES; do
    D="$OUT/$dtype/seed$seed"
    mkdir -p "$D"
    COMMON="--model smollm2 --task rt-sentiment --dtype $dtype --device $DEVICE --batch-size 4 --max-length 64 --eval-every 100 --eval-examples 100 --seed $seed --no-progress --no-save-model --out $D"
    for method in $METHODS; do
      [ -f "$D/$method/result.json" ] || $NICE $ZO finetune $COMMON --method $method --steps 500 > "$D/$method.log" 2>&1
    done
    if [ "$dtype" = bf16 ]; then
      for method in $CONTROLS; do
        R=$method-no-exact-restore
        [ -f "$D/$R/result.json" ] || $NICE $ZO finetune $COMMON --method $method --steps 500 --no-exact-restore --run-name $R > "$D/$R.log" 2>&1
      done
    else
      [ -f "$D/adamw/result.json" ] || $NICE $ZO finetune $COMMON --method adamw --steps 1000 --eval-every 200 > "$D/adamw.log" 2>&1
    fi
  done
done
