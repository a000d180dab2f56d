#!/usr/bin/env bash
# GPU check of state storage (chat/states.py), prepared to run in about two minutes on one CUDA
# GPU: a random RWKV-7 of the 1.5B shape in fp16, then bench-states with it in 'cuda fp16' —
# hot against cold restore (a checkpoint read back from SQLite, then 8,192 logged tokens re-read
# on the GPU), bytes written per turn, and 1,000 channels restored under tier budgets.
# Usage, from the repository root: bash bench/gpu-states.sh   (PYTHON=... for the interpreter,
# OUT=... for where the JSON goes; default bench-out/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
MODEL="$OUT/random-1.5B-fp16.pth"
[ -f "$MODEL" ] || timeout 120 "$PY" -m bot make-model --version 7 --size 1.5B --dtype fp16 "$MODEL"
timeout 240 "$PY" -m bot bench-states --model "$MODEL" --strategy "cuda fp16" --replay 8192 \
    --turns 500 --channels 1000 --scale-model "$MODEL" --json "$OUT/states-1.5B-cuda-fp16.json"
rm -f "$MODEL"
