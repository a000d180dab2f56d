# rwkv-discord images, in two variants (compose.yaml builds the CPU one, compose.gpu.yaml the GPU one):
#   docker build -t rwkv-discord:cpu --build-arg VARIANT=cpu .    # CPU-only torch, about 1.3 GB
#   docker build -t rwkv-discord:gpu --build-arg VARIANT=gpu .    # CUDA 12.8 torch, about 7.5 GB
# The GPU image needs an NVIDIA driver 525.60.13 or newer (CUDA 12 minor-version compatibility;
# 570 or newer for RTX 50xx/Blackwell cards) and the NVIDIA Container Toolkit on the host.
#
# BuildKit is required (the default builder since Docker 23). Everything below installs from the
# public indexes. Where pip needs other settings (a mirror, a proxy's CA), give them as optional
# build secrets; nothing ends up in the image:
#   --secret id=pip_conf,src=/etc/pip.conf                  a pip.conf (index-url, find-links, ...)
#   --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt  the CA bundle pip should trust
# and override the torch index with --build-arg TORCH_INDEX=URL (a mirror of it).
# See compose.yaml for the volumes (database, read-only model) and the settings.
ARG BASE=python:3.11-slim
ARG VARIANT=cpu

FROM ${BASE} AS base
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RWKV_DISCORD_DB=/data/rwkv-discord.sqlite3 \
    RWKV_DISCORD_MODEL=/models/model.pth
# tini is PID 1: it passes Docker's signals on and reaps zombies.
RUN apt-get update && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 rwkv && mkdir /data /models && chown rwkv /data
# pip with the optional build secrets (see the top of this file).
RUN printf '%s\n' '#!/bin/sh' \
        '[ -s /run/secrets/pip_conf ] && export PIP_CONFIG_FILE=/run/secrets/pip_conf' \
        '[ -s /run/secrets/pip_ca ] && export PIP_CERT=/run/secrets/pip_ca' \
        'exec pip "$@"' > /usr/local/bin/pip-build \
    && chmod 755 /usr/local/bin/pip-build
WORKDIR /app

# torch, the largest layer, first: it changes only when the pin does.
FROM base AS torch-cpu
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV RWKV_DISCORD_STRATEGY="auto"
# A C compiler: the CPU step in C (engine/csrc) is built at the first start, for the CPU it runs on
# (about 2 s; cached in the user's ~/.cache), and PyTorch runs the model without it.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN --mount=type=secret,id=pip_conf --mount=type=secret,id=pip_ca \
    pip-build install "$TORCH_SPEC" --index-url "$TORCH_INDEX"

# PyPI's Linux build of torch 2.9.1 is the CUDA 12.8 one (driver 525.60.13 or newer, see above).
FROM base AS torch-gpu
ARG TORCH_SPEC=torch==2.9.1
ARG TORCH_INDEX=https://pypi.org/simple
ENV RWKV_DISCORD_STRATEGY="cuda fp16"
RUN --mount=type=secret,id=pip_conf --mount=type=secret,id=pip_ca \
    pip-build install "$TORCH_SPEC" --index-url "$TORCH_INDEX"

FROM torch-${VARIANT} AS app
# The other dependencies, from pyproject.toml alone: this layer is kept while only code changes.
# EXTRAS names optional dependency groups to add, e.g. --build-arg EXTRAS=cluster (Ray Serve,
# Postgres, the object store: the deployment across machines in the README).
ARG EXTRAS=""
COPY pyproject.toml ./
RUN --mount=type=secret,id=pip_conf --mount=type=secret,id=pip_ca \
    EXTRAS="$EXTRAS" python -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [e for e in os.environ['EXTRAS'].replace(',', ' ').split() if e]; \
print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" \
        > /tmp/requirements.txt \
    && pip-build install -r /tmp/requirements.txt && rm /tmp/requirements.txt
# Then the code: everything .dockerignore lets through (the packages listed in pyproject.toml).
COPY . ./
RUN --mount=type=secret,id=pip_conf --mount=type=secret,id=pip_ca \
    pip-build install --no-deps . && rm -rf build *.egg-info

USER rwkv
VOLUME ["/data"]
# Healthy while the bot is connected: it touches a heartbeat file beside the database.
HEALTHCHECK --interval=60s --timeout=10s --start-period=300s --retries=3 \
    CMD ["rwkv-discord", "health"]
# tini -g sends Docker's SIGTERM to the bot, which finishes in-flight replies and exits 0. For `run`,
# scripts/docker-entrypoint holds a configuration error (exit 78) instead of letting it restart in a loop.
ENTRYPOINT ["tini", "-g", "--", "/app/scripts/docker-entrypoint"]
CMD ["run"]
