#!/usr/bin/env bash
# Reproduce examples/preference: data, four models, one table (examples/preference/README.md).
# Run from the repository root:  bash examples/preference/run_all.sh
# Everything runs one after the other (one training at a time); results in runs/preference/.
set -euo pipefail

FS=${FINESMITH:-.venv/bin/finesmith}
PY=${PYTHON:-.venv/bin/python}
HERE=examples/preference
OUT=runs/preference
mkdir -p "$OUT"

# 1. data: 60 SFT rows, 240 pairs, 80 held-out prompts (seeded, so the same files every time)
"$PY" "$HERE/make_data.py"

# 2. the base model, untrained
"$PY" "$HERE/measure.py" smollm2-135m-instruct --label "base (no training)" --output "$OUT/base.json"

# 3 + 4. SFT, then DPO from the merged SFT weights, in one staged config
"$FS" train "$HERE/sft_dpo.yaml" --overwrite
"$PY" "$HERE/measure.py" "$OUT/sft_dpo/sft" --label "SFT only (60 rows, 1 epoch, lr 1e-4)" --output "$OUT/sft.json"
"$PY" "$HERE/measure.py" "$OUT/sft_dpo/dpo" --label "SFT, then DPO (240 pairs, 1 epoch)" --output "$OUT/sft_dpo.json"

# 5. ORPO straight from the base model: no SFT stage, no reference model
"$FS" train --model smollm2-135m-instruct --data "$HERE/data/pairs.jsonl" --output "$OUT/orpo" \
  --epochs 1 --max-length 128 --batch-size 8 --lr 2e-4 --seed 42 objective=orpo preference.orpo_lambda=0.1 --overwrite
"$PY" "$HERE/measure.py" "$OUT/orpo" --label "ORPO from base (240 pairs, 1 epoch)" --output "$OUT/orpo.json"

# 6. for comparison: the same SFT trained harder (lr 2e-4) instead of adding a preference stage
"$FS" train --model smollm2-135m-instruct --data "$HERE/data/sft.jsonl" --output "$OUT/sft_strong" \
  --epochs 1 --max-length 128 --batch-size 8 --lr 2e-4 --seed 42 --overwrite
"$PY" "$HERE/measure.py" "$OUT/sft_strong" --label "SFT only, lr 2e-4 (stronger)" --output "$OUT/sft_strong.json"

"$PY" "$HERE/measure.py" --table "$OUT/base.json" "$OUT/sft.json" "$OUT/sft_dpo.json" "$OUT/orpo.json" \
  "$OUT/sft_strong.json" | tee "$OUT/table.md"
echo "run_all.sh: ${SECONDS}s in all"
