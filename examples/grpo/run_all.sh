#!/usr/bin/env bash
# Reproduce examples/grpo: base / SFT / SFT-then-GRPO on the preference demo's 80 held-out prompts.
# Run from the repository root:  bash examples/grpo/run_all.sh   (results in runs/grpo/)
set -euo pipefail

FS=${FINESMITH:-.venv/bin/finesmith}
PY=${PYTHON:-.venv/bin/python}
HERE=examples/grpo
MEASURE=examples/preference/measure.py   # the same measurement as the preference demo
OUT=runs/grpo
mkdir -p "$OUT"

"$PY" "$HERE/make_data.py"
"$PY" "$MEASURE" smollm2-135m-instruct --label "base (no training)" --output "$OUT/base.json"
"$FS" train "$HERE/sft_grpo.yaml" --overwrite
"$PY" "$MEASURE" "$OUT/sft_grpo/sft" --label "SFT (60 rows, 1 epoch, lr 1e-4)" --output "$OUT/sft.json"
"$PY" "$MEASURE" "$OUT/sft_grpo/grpo" --label "SFT, then GRPO (30 steps × 4 prompts × 4 samples)" --output "$OUT/sft_grpo.json"
"$PY" "$MEASURE" --table "$OUT/base.json" "$OUT/sft.json" "$OUT/sft_grpo.json" | tee "$OUT/table.md"
echo "run_all.sh: ${SECONDS}s in all"
