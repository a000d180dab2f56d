#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels that the GPU machine's image lacks, into .whl/ (git
# ignores it); bench/setup.sh installs them there (pip --no-index) before the GPU scripts run.
# The image has torch, triton, numpy, tokenizers, aiohttp, einops and prometheus-client; the
# project also needs the packages below, and fla-core for the fused RWKV-7 kernel.
# Usage, from the repository root: bash bench/wheels.sh   (PYVER=3.12 by default: the image's
# Python; the versions are those the project's tests run with).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
rm -rf .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl \
    rwkv==0.8.32 fla-core==0.6.0 discord.py==2.7.1 aiosqlite==0.22.1 \
    pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
    annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 rapidfuzz==3.14.6
ls .whl
du -sh .whl
