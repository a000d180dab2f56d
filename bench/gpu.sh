#!/usr/bin/env bash
# GPU check of the batched engine (engine/models/rwkv7.py, engine/runner.py, engine/kernels.py), in under five minutes on
# one CUDA GPU (H100/H200 class): the script, set-up included, keeps to a 295-second budget; each
# step has a cap and leaves a reserve for the steps after it (each step prints its numbers as it
# goes, so a step cut short still shows what it measured).
#   0. fla-core's fused kernel: compile, autotune and self-check (compiled kernels are cached on
#      disk for the steps after; tuned configurations too, where Triton supports it);
#   1. logits parity with the rwkv package in fp32 (limit 1e-5) on a small random RWKV-7, and the
#      CUDA-graph step (in place, padded, and gathered by index) against the same model eager;
#   2. a random RWKV-7 of the 1.5B shape (L24 D2048) written in fp16, then the bench at
#      concurrency 1, 8, 32 and 128 in 'cuda fp16' against the reference engine (measured up to 8:
#      it runs one sequence at a time, so higher levels repeat its c=8 number, marked so), with
#      parity checked one step at a time in fp16 (limit 2e-2); then the engine's description, whose
#      "path: ..." names the configuration the start-up self-test (engine/selftest.py) chose, what
#      it checked and how long it took, and why a faster one fell back, if one did;
#   3. the same bench on a model too small to matter: what the host's per-token work allows.
# Usage, from the repository root: bash bench/gpu.sh      (PYTHON=... to pick the interpreter,
# OUT=... for where the JSON goes; default bench-out/). Exit status 0 only if every step passed.
# On a machine without a package index, run bash bench/wheels.sh first where PyPI is reachable
# and bring the .whl/ folder along: setup.sh installs it (rwkv, fla-core, ...).
# The reference engine runs as the rwkv package sets itself up by default (RWKV_CUDA_ON=0: its
# CUDA kernel needs a compiler toolchain and a minute to build); set RWKV_CUDA_ON=1 to compare
# against the kernel where the image can build it (the budget then runs tight).
source "$(dirname "$0")/setup.sh"

END=295  # $SECONDS counts from the script's start
limit() {  # seconds for a step: at most $1, leaving $2 for the steps after it (and at least 10)
    local t=$((END - SECONDS - $2))
    ((t > $1)) && t=$1
    ((t < 10)) && t=10
    echo "$t"
}

# The 1.5B model of step 2 is written meanwhile (3 GB of random fp16 weights, tens of seconds).
MODEL_DIR=$(mktemp -d)
trap 'rm -rf "$MODEL_DIR"' EXIT
"$PY" -m bot make-model "$MODEL_DIR/1.5B.pth" --version 7 --size 1.5B --dtype fp16 >"$MODEL_DIR/log" 2>&1 &
MODEL_PID=$!

echo "== 0/3 fla-core's fused kernel: compile, autotune and self-check (cached for the steps after) =="
timeout "$(limit 80 150)" "$PY" - <<'PYEOF' || echo "!! the fused-kernel check did not finish; the steps below say which path they use"
import logging, time, torch
logging.basicConfig(level=logging.WARNING)
from engine.kernels import load_fla
from engine.models.rwkv7 import DECAY_SCALE, recurrent_plain
started = time.perf_counter()
try:
    import fla
    version = getattr(fla, "__version__", "?")
except Exception as exc:
    print("fla-core not importable, the plain PyTorch recurrence serves:", exc)
else:
    loaded = load_fla(torch.device("cuda"), 32, 64, plain=recurrent_plain, log_decay_scale=DECAY_SCALE)  # 1.5B heads
    if loaded is None:
        verdict = "NOT in use (see the warning above)"
    else:
        verdict = "in use, " + ("updating the states in place" if loaded[1] else "through its own function")
    print(f"fla-core {version}: {verdict}, {time.perf_counter() - started:.1f} s")
PYEOF

FAILED=0
step() {  # run every step even when one fails, so one run on a lent GPU shows everything
    "$@" || { echo "!! step failed (exit status $?): $*"; FAILED=1; }
}

echo "== 1/3 parity in fp32 (small model), CUDA graphs against eager =="
step timeout "$(limit 50 120)" "$PY" -m tools.bench --layers 4 --embd 512 --strategy "cuda fp32" --concurrency 1,4 \
    --tokens 8 --prompt-tokens 16 --parity --graph-parity --json "$OUT/parity-cuda-fp32.json"

echo "== 2/3 bench, 1.5B shape, fp16 =="
MODEL=(--size 1.5B)  # written by the bench itself if the one written meanwhile is not there
if wait "$MODEL_PID" && [ -s "$MODEL_DIR/1.5B.pth" ]; then
    MODEL=(--model "$MODEL_DIR/1.5B.pth")
else
    echo "!! the 1.5B model could not be written ahead: $(tail -1 "$MODEL_DIR/log")"
fi
step timeout "$(limit 130 40)" "$PY" -m tools.bench "${MODEL[@]}" --strategy "cuda fp16" --concurrency 1,8,32,128 \
    --tokens 64 --prompt-tokens 64 --reference-max 8 --parity --json "$OUT/bench-1.5B-cuda-fp16.json"
"$PY" -c 'import json, sys; print("engine:", json.load(open(sys.argv[1])).get("batched_engine"))' \
    "$OUT/bench-1.5B-cuda-fp16.json" 2>/dev/null || echo "!! no engine description (the bench did not finish)"

echo "== 3/3 host work per token: a 1-layer model with a 1,024-token head, so the GPU idles =="
step timeout "$(limit 40 0)" "$PY" -m tools.bench --layers 1 --embd 64 --vocab 1024 --strategy "cuda fp16" \
    --concurrency 1,32,128 --tokens 64 --prompt-tokens 16 --reference-max 1 --json "$OUT/host-cuda.json"

echo "took $SECONDS s; results: $OUT/parity-cuda-fp32.json $OUT/bench-1.5B-cuda-fp16.json $OUT/host-cuda.json"
exit $FAILED
