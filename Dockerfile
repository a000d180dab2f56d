# rwkv-discord on an NVIDIA GPU. CPU variant: docker build --build-arg TORCH_SPEC=torch==2.13.0 \
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .  and RWKV_DISCORD_STRATEGY="cpu fp32".
# Run: docker run --gpus all -v /models:/models:ro -v rwkv-data:/data \
#   -e RWKV_DISCORD_MODEL=/models/model.pth IMAGE chat
FROM python:3.11-slim

ARG TORCH_SPEC="torch>=2.4"
ARG TORCH_INDEX=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    RWKV_DISCORD_DB=/data/rwkv-discord.sqlite3 \
    RWKV_DISCORD_STRATEGY="cuda fp16"

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
ENTRYPOINT ["rwkv-discord"]
CMD ["chat"]
