"""Running the Discord bot: signals, heartbeat for health checks, and a clean exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from bot.app import load_engine
from bot.client import RwkvBot, create_bot
from bot.metrics import serve_metrics
from bot.settings import Settings

log = logging.getLogger(__name__)
HEARTBEAT_EVERY = 30.0


def heartbeat_path(settings: Settings) -> Path:
    """The file a connected bot touches regularly (read by ``rwkv-discord health``)."""
    return settings.db.with_name(settings.db.name + ".heartbeat")


async def _heartbeat(bot: RwkvBot, path: Path) -> None:
    while not bot.is_closed():
        if bot.is_ready():
            with contextlib.suppress(OSError):
                path.touch()
        await asyncio.sleep(HEARTBEAT_EVERY)


async def run_bot(settings: Settings) -> int:
    """Load the model, connect, serve until SIGTERM or Ctrl-C, then close cleanly. Returns 0."""
    assert settings.token is not None
    loop = asyncio.get_running_loop()
    holder: dict[str, RwkvBot] = {}
    closing: set[asyncio.Future[None]] = set()

    def shut_down(name: str) -> None:
        bot = holder.get("bot")
        if bot is None:
            # Still loading the model: nothing is open or stored yet, so leave at once (as PID 1
            # in a container, ignoring the signal would mean being killed 10 s later).
            log.info("%s received while loading the model: exiting", name)
            os._exit(0)
        log.info("%s received: finishing in-flight replies and closing", name)
        closing.add(asyncio.ensure_future(bot.close()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shut_down, sig.name)
    engine = await load_engine(settings)
    bot = create_bot(settings, engine)
    holder["bot"] = bot
    if settings.metrics_port is not None:
        serve_metrics(settings.metrics_port, bot.metrics, by_device=bot.device_metrics)
    beat = asyncio.ensure_future(_heartbeat(bot, heartbeat_path(settings)))
    try:
        async with bot:
            await bot.start(settings.token.get_secret_value())
    finally:
        beat.cancel()
        await engine.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0
