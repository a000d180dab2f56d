#!/usr/bin/env bash
# GPU check of state storage (chat/states.py), prepared to run in about two minutes on one CUDA
# GPU: a random RWKV-7 of the 1.5B shape in fp16 (in a temporary folder, removed at exit), then
# bench-states with it in 'cuda fp16': bytes written per chat turn, hot against cold restore (a
# checkpoint read back from SQLite, then 8,192 logged tokens re-read on the GPU), and 400
# channels with 400 restores under tier budgets, then a database-budget pass.
# Usage, from the repository root: bash bench/gpu-states.sh   (PYTHON=... for the interpreter,
# OUT=... for where the JSON goes; default bench-out/). Without a package index there, see
# bench/wheels.sh.
source "$(dirname "$0")/setup.sh"
"$PY" -c 'import aiosqlite, discord, pydantic_settings, rwkv'  # what the bot needs besides torch

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
timeout 120 "$PY" -m bot make-model --version 7 --size 1.5B --dtype fp16 "$WORK/random-1.5B.pth"
timeout 300 "$PY" -m bot bench-states --model "$WORK/random-1.5B.pth" --strategy "cuda fp16" \
    --replay 8192 --channels 400 --scale-model "$WORK/random-1.5B.pth" \
    --json "$OUT/states-1.5B-cuda-fp16.json"
