# rwkv-discord on an NVIDIA GPU (the default), or on the CPU:
#   docker build -t rwkv-discord .
#   docker build -t rwkv-discord:cpu --build-arg TORCH_SPEC=torch==2.13.0 \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu --build-arg STRATEGY="cpu fp32" .
# See compose.yaml for the volumes (database, read-only model) and the settings.
FROM python:3.11-slim

ARG TORCH_SPEC="torch>=2.4"
ARG TORCH_INDEX=""
ARG STRATEGY="cuda fp16"
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    RWKV_DISCORD_DB=/data/rwkv-discord.sqlite3 \
    RWKV_DISCORD_STRATEGY=${STRATEGY}

WORKDIR /app
RUN if [ -n "$TORCH_INDEX" ]; then pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX"; \
    else pip install "$TORCH_SPEC"; fi
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY chat ./chat
COPY engine ./engine
COPY faq ./faq
COPY migrations ./migrations
RUN pip install . && useradd --create-home --uid 10001 rwkv && mkdir /data && chown rwkv /data

USER rwkv
VOLUME ["/data"]
# Healthy while the bot is connected: it touches a heartbeat file beside the database.
HEALTHCHECK --interval=60s --timeout=10s --start-period=300s --retries=3 \
    CMD ["rwkv-discord", "health"]
# Exec form: the bot is PID 1 and gets Docker's SIGTERM, finishes in-flight replies and exits 0.
ENTRYPOINT ["rwkv-discord"]
CMD ["run"]
