#!/bin/bash
# Step time of `zoptim finetune --lora` with its default directions (rank 4 per example, applied in
# the forward) against --in-place (MeZO's), SmolLM2 on rt-sentiment, batch 8 x 64, torch's default
# thread count: 40 steps a run, two runs of each, interleaved; the median step time of each run
# (steps 6-40, training only: log.jsonl's "time"), and the ratio of their means. Run it on a quiet
# machine. Records: docs/results/lm/lora-timing.
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
OUT=${OUT:-runs/lora-timing}
rm -rf "$OUT"
for i in 1 2; do
  for cfg in pe inplace; do
    if [ $cfg = inplace ]; then extra="--in-place"; else extra=""; fi
    .venv/bin/zoptim finetune --lora $extra --steps 40 --eval-every 1000 --eval-examples 8 --test-examples 8 \
      --no-save-model --no-progress --run-name $cfg-$i --out "$OUT" > /dev/null 2>&1
  done
done
OUT="$OUT" .venv/bin/python - <<'PY'
import glob, json, os, statistics
rows = {}
for f in sorted(glob.glob(os.path.join(os.environ["OUT"], "*", "log.jsonl"))):
    t = [json.loads(line)["time"] for line in open(f)]
    steps = [b - a for a, b in zip(t[5:], t[6:])]
    rows.setdefault(os.path.basename(os.path.dirname(f)).rsplit("-", 1)[0], []).append(statistics.median(steps))
for k, v in rows.items():
    print(k, "median s/step per run:", [round(x, 3) for x in v])
print(f"per-example rank 4 / in place: {statistics.mean(rows['pe']) / statistics.mean(rows['inplace']):.2f}x")
PY
