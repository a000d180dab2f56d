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
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import discord
from discord.http import Route

from bot.app import check_database, load_engine, load_faq, open_service
from bot.client import EngineNumbers, RwkvBot, ShardedRwkvBot
from bot.cogs import add_cogs
from bot.limits import Limits, LocalLimits, token_key
from bot.metrics import serve_metrics
from bot.settings import ConfigError, Settings, heartbeat_path, require_model, shard_list
from chat.session import ChatService
from engine.interface import Engine
from faq import FaqIndex

if TYPE_CHECKING:
    from cluster.client import RemoteChat

log = logging.getLogger(__name__)
HEARTBEAT_EVERY = 30.0
LOGIN_RETRY_FIRST = 5.0  # seconds before the second login attempt; doubled up to the most below
LOGIN_RETRY_MOST = 300.0
PORTAL = "https://discord.com/developers/applications"


async def create_bot(
    settings: Settings, engine: EngineNumbers, service: ChatService, faq: FaqIndex, **options: Any
) -> RwkvBot:
    """Build the bot on a ready chat service, with its slash commands, without connecting
    (``await bot.start(token)`` connects): a sharded bot (discord.py's ``AutoShardedBot``) when
    ``shard_count`` is set. ``options``: ``limits`` (shared by the bot's processes; by default
    this process's own), ``clock`` and ``sleep``, for tests."""
    # The bot never joins voice: no warnings at every start about voice libraries it lacks.
    discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
    shards = shard_list(settings)
    if shards is None:
        bot = RwkvBot(settings, engine, service, faq, **options)
    else:
        bot = ShardedRwkvBot(
            settings, engine, service, faq, shard_ids=shards, shard_count=settings.shard_count, **options
        )
    await add_cogs(bot)
    return bot


def open_limits(settings: Settings) -> Limits:
    """The identify slots and the REST budget: this process's own, or with ``cluster`` set, the
    Ray actor that every process of the bot's token shares."""
    if settings.cluster is None:
        return LocalLimits(settings.rest_rate)
    assert settings.token is not None
    from bot.ray_limits import RayLimits

    try:
        limits = RayLimits.connect(
            settings.cluster, token_key(settings.token.get_secret_value()), settings.rest_rate
        )
    except ConnectionError as exc:
        raise _no_cluster(settings, exc) from exc
    log.info("identify slots and the REST budget are shared through the Ray cluster at %s", settings.cluster)
    return limits


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


@contextlib.asynccontextmanager
async def chat_service(
    settings: Settings, engine: Engine | None, faq: FaqIndex
) -> AsyncIterator[tuple[EngineNumbers, ChatService]]:
    """The chat service the bot talks to, and what it shows of the model: a service on
    ``engine``, loaded in this process; or, with ``cluster`` set (``engine`` None), the chat
    tier's replicas on Ray Serve (:class:`cluster.client.RemoteChat`, which has the service's
    methods that front ends call)."""
    if engine is not None:
        async with open_service(settings, engine, faq, check=False) as service:
            yield engine, service
        return
    from cluster.client import RemoteChat

    try:
        remote = await RemoteChat.connect(settings.cluster, app=settings.cluster_app)
    except ConnectionError as exc:
        raise _no_cluster(settings, exc) from exc
    except LookupError as exc:
        raise ConfigError(
            f"RWKV_DISCORD_CLUSTER_APP is wrong ({exc}): start it with `rwkv-discord replicas start`, "
            "or name the one that runs"
        ) from exc
    try:
        await remote.prepare()
        log.info("chat tier: %s, on the Ray cluster at %s", remote.describe(), settings.cluster)
        yield ReplicaNumbers(remote), cast(ChatService, remote)
    finally:
        await remote.close()


class ReplicaNumbers:
    """What the bot shows of the model when the chat tier's replicas hold it: their numbers as
    last gathered, summed, and each replica's as a device of its own."""

    def __init__(self, remote: RemoteChat) -> None:
        self.remote = remote

    def describe(self) -> str:
        return self.remote.describe()

    def metrics(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for numbers in self.remote.replica_numbers().values():
            for name, value in numbers["engine"].items():
                total[name] = total.get(name, 0.0) + float(value)
        return total

    def device_metrics(self) -> dict[str, dict[str, float]]:
        devices: dict[str, dict[str, float]] = {}
        for replica, numbers in self.remote.replica_numbers().items():
            devices[replica] = {name: float(value) for name, value in numbers["engine"].items()}
            devices[replica]["states_bytes"] = float(sum(numbers["device_state_bytes"].values()))
        return devices


def _no_cluster(settings: Settings, exc: BaseException) -> ConfigError:
    return ConfigError(
        f"RWKV_DISCORD_CLUSTER is wrong (no Ray cluster answers at {settings.cluster}: {exc}): "
        "give the address of a running Ray cluster (`ray status` on its head says it)"
    )


async def run_bot(settings: Settings) -> int:
    """Load the model and open the chat service (or join the chat tier of a cluster), connect,
    serve until SIGTERM or Ctrl-C, then close cleanly (the bot, then the service, then the
    engine). Returns 0."""
    assert settings.token is not None
    loop = asyncio.get_running_loop()
    holder: dict[str, Any] = {}
    stopping = asyncio.Event()
    closing: set[asyncio.Future[None]] = set()

    def shut_down(name: str) -> None:
        if "engine" not in holder:
            # Still loading the model: nothing is open or stored yet, so leave at once (as PID 1
            # in a container, ignoring the signal would mean being killed 10 s later).
            log.info("%s received while loading the model: exiting", name)
            os._exit(0)
        if stopping.is_set():
            return
        log.info("%s received: finishing in-flight replies and closing", name)
        stopping.set()
        bot = holder.get("bot")
        if bot is not None:
            closing.add(asyncio.ensure_future(bot.close()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shut_down, sig.name)
    if settings.rest_url is not None:  # a REST proxy (nirn-proxy) in front of Discord's API
        Route.BASE = settings.rest_url
    try:
        engine: Engine | None = None  # with a cluster, the chat tier's replicas hold the model
        if settings.cluster is None:
            require_model(settings)
            await check_database(settings)  # a database fault is said before minutes of loading
            engine = await load_engine(settings)
        holder["engine"] = engine
    except BaseException:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        raise
    try:
        faq, _ = load_faq(settings)
        async with chat_service(settings, engine, faq) as (numbers, service):
            if not stopping.is_set():  # a SIGTERM while the database opened: nothing to serve
                limits = open_limits(settings)
                bot = holder["bot"] = await create_bot(settings, numbers, service, faq, limits=limits)
                await _serve(bot, settings, stopping)
            if closing:
                await asyncio.wait(closing, timeout=10)
    finally:
        if engine is not None:
            await engine.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0


async def _serve(bot: RwkvBot, settings: Settings, stopping: asyncio.Event) -> None:
    """Log in and stay connected until the bot is closed."""
    assert settings.token is not None
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
