# Sourced by the GPU scripts: the repository root as working folder, the interpreter ($PY: PYTHON,
# else .venv/bin/python, else python3), the wheels of bench/wheels.sh installed when .whl/ is
# there (the GPU machine has no package index), the output folder ($OUT, default bench-out/), and
# a check that the interpreter sees a CUDA GPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=${SITE:-/tmp/rwkv-discord-site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
"$PY" -c 'import rwkv, tokenizers, numpy' || {
    echo "the interpreter $PY lacks the project's packages: run bash bench/wheels.sh where PyPI is reachable, and carry .whl" >&2
    exit 1
}
"$PY" -c '
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible (a CPU build of torch?)"
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))
'
