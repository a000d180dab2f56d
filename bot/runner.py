"""Running the Discord bot: signals, the login, a heartbeat for health checks, and a clean exit.

A wrong token or a missing Message Content intent ends the bot with one line (a
:class:`~bot.settings.ConfigError`: exit 78, which a restart cannot fix); Discord being
unreachable at start is tried again with a growing pause until it answers or a SIGTERM comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

import aiohttp
import discord

from bot.app import load_engine
from bot.client import RwkvBot, create_bot
from bot.metrics import serve_metrics
from bot.settings import ConfigError, Settings, heartbeat_path

log = logging.getLogger(__name__)
HEARTBEAT_EVERY = 30.0
LOGIN_RETRY_FIRST = 5.0  # seconds before the second login attempt; doubled up to the most below
LOGIN_RETRY_MOST = 300.0
PORTAL = "https://discord.com/developers/applications"


async def _heartbeat(bot: RwkvBot, path: Path) -> None:
    while not bot.is_closed():
        if bot.is_ready():
            with contextlib.suppress(OSError):
                path.touch()
        await asyncio.sleep(HEARTBEAT_EVERY)


def _unreachable(exc: BaseException) -> bool:
    """Errors that mean Discord could not be reached (worth trying again), not a refusal."""
    if isinstance(exc, discord.HTTPException):
        return exc.status >= 500 or exc.status == 429
    return isinstance(exc, aiohttp.ClientError | OSError | asyncio.TimeoutError | discord.GatewayNotFound)


async def _log_in(bot: RwkvBot, token: str, stopping: asyncio.Event) -> bool:
    """Log in, trying again while Discord is unreachable; False when stopped meanwhile."""
    pause = LOGIN_RETRY_FIRST
    while not stopping.is_set():
        try:
            await bot.login(token)
            return True
        except discord.LoginFailure as exc:
            raise ConfigError(
                "RWKV_DISCORD_TOKEN is wrong: Discord refused it. Copy the bot token again from "
                f"{PORTAL} (your application > Bot > Reset Token) into RWKV_DISCORD_TOKEN"
            ) from exc
        except Exception as exc:
            if not _unreachable(exc) or stopping.is_set():
                raise
            log.warning(
                "Discord cannot be reached (%s); trying again in %.0f s", exc or type(exc).__name__, pause
            )
            await bot.http.close()  # a new session (and connector) for the next attempt
            bot.http.connector = discord.utils.MISSING
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=pause)
        pause = min(pause * 2, LOGIN_RETRY_MOST)
    return False


async def run_bot(settings: Settings) -> int:
    """Load the model, connect, serve until SIGTERM or Ctrl-C, then close cleanly. Returns 0."""
    assert settings.token is not None
    loop = asyncio.get_running_loop()
    holder: dict[str, RwkvBot] = {}
    stopping = asyncio.Event()
    closing: set[asyncio.Future[None]] = set()

    def shut_down(name: str) -> None:
        bot = holder.get("bot")
        if bot is None:
            # Still loading the model: nothing is open or stored yet, so leave at once (as PID 1
            # in a container, ignoring the signal would mean being killed 10 s later).
            log.info("%s received while loading the model: exiting", name)
            os._exit(0)
        if stopping.is_set():
            return
        log.info("%s received: finishing in-flight replies and closing", name)
        stopping.set()
        closing.add(asyncio.ensure_future(bot.close()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shut_down, sig.name)
    try:
        engine = await load_engine(settings)
    except BaseException:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        raise
    bot = create_bot(settings, engine)
    holder["bot"] = bot
    if settings.metrics_port is not None:
        serve_metrics(settings.metrics_port, bot.metrics, by_device=bot.device_metrics)
    beat = asyncio.ensure_future(_heartbeat(bot, heartbeat_path(settings)))
    try:
        async with bot:
            if await _log_in(bot, settings.token.get_secret_value(), stopping):
                await bot.connect(reconnect=True)
    except discord.PrivilegedIntentsRequired as exc:
        raise ConfigError(
            "the bot's Message Content Intent is off: switch it on in the developer portal "
            f"({PORTAL}, your application > Bot > Privileged Gateway Intents), then start again"
        ) from exc
    except Exception:
        if not stopping.is_set():
            raise
        # A SIGTERM during the login or the connection: the login's requests fail as the bot
        # closes. That is the stop that was asked for, not an error.
        log.debug("the connection ended while stopping", exc_info=True)
    finally:
        beat.cancel()
        if closing:
            await asyncio.wait(closing, timeout=10)
        await engine.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0
