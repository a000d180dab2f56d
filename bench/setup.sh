# Sourced by the GPU scripts: the repository root as working folder, the interpreter ($PY: PYTHON,
# else .venv/bin/python, else python3), the output folder ($OUT, default bench-out/), and a check
# that the interpreter sees a CUDA GPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
"$PY" -c '
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible (a CPU build of torch?)"
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))
'
