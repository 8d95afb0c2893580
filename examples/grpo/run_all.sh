#!/usr/bin/env bash
# Reproduce examples/grpo: data, base / SFT / SFT-then-GRPO measured on 80 held-out problems.
# Run from the repository root:  bash examples/grpo/run_all.sh   (results in runs/grpo/)
set -euo pipefail

FS=${FINESMITH:-.venv/bin/finesmith}
PY=${PYTHON:-.venv/bin/python}
HERE=examples/grpo
OUT=runs/grpo
mkdir -p "$OUT"

"$PY" "$HERE/make_data.py"
"$PY" "$HERE/measure.py" smollm2-135m-instruct --label "base (no training)" --output "$OUT/base.json"
"$FS" train "$HERE/sft_grpo.yaml" --overwrite
"$PY" "$HERE/measure.py" "$OUT/sft_grpo/sft" --label "SFT (40 rows, 2 epochs)" --output "$OUT/sft.json"
"$PY" "$HERE/measure.py" "$OUT/sft_grpo/grpo" --label "SFT, then GRPO (160 prompts, 1 epoch)" --output "$OUT/sft_grpo.json"
"$PY" "$HERE/measure.py" --table "$OUT/base.json" "$OUT/sft.json" "$OUT/sft_grpo.json" | tee "$OUT/table.md"
echo "run_all.sh: ${SECONDS}s in all"
