"""The Discord bot: its lifecycle, the events of channels and servers, and its numbers.

Build it with :func:`bot.runner.create_bot` on a ready chat service (no connection is made until
``start``). One-time Discord work (the channels where it talks, housekeeping, the slash-command
sync) happens in ``setup_hook``, never in ``on_ready``, which fires again after every failed
resume. The message path is :class:`~bot.replies.ReplyingBot`'s.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import discord
from discord.ext import commands

from bot.app import load_faq
from bot.buttons import ReplyButton
from bot.replies import ReplyingBot
from bot.settings import Settings
from chat.session import ChatService
from faq import FaqIndex

log = logging.getLogger(__name__)

HOUSEKEEPING_EVERY = 3600.0  # seconds between retention / database budget passes


class EngineNumbers(Protocol):
    """What the bot shows of the model: an engine in this process (:class:`engine.interface.Engine`)
    or the chat tier's replicas."""

    def describe(self) -> str: ...

    def metrics(self) -> dict[str, float]: ...

    def device_metrics(self) -> dict[str, dict[str, float]]: ...


class RwkvBot(ReplyingBot):
    """The bot. Tests build it offline and feed it gateway payloads.

    The chat service is the caller's: it is open before the bot is built and closed after the
    bot has closed (replies in flight are stored first)."""

    def __init__(
        self,
        settings: Settings,
        engine: EngineNumbers,
        service: ChatService,
        faq: FaqIndex,
        **options: Any,
    ) -> None:
        """``options``: ``clock`` and ``sleep`` (tests pass a fake clock)."""
        super().__init__(settings, service, faq, **options)
        self.engine = engine
        self._housekeeping: asyncio.Task[None] | None = None
        self._closed_once: asyncio.Future[None] | None = None
        self._max_concurrency: int | None = None

    # ------------------------------------------------------------------ lifecycle

    async def setup_hook(self) -> None:
        """Read where the bot talks, listen for the buttons of replies sent before a restart,
        start housekeeping; sync commands only when asked to."""
        self.add_dynamic_items(ReplyButton)
        self.enabled = {int(c) for c in await self.service.enabled_channels()}
        self.disabled = {int(c) for c in await self.service.disabled_threads()}
        self._housekeeping = asyncio.create_task(self._keep_house(), name="housekeeping")
        if self.settings.sync_commands:
            guild = discord.Object(self.settings.dev_guild) if self.settings.dev_guild else None
            if guild is not None:
                self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
            log.info("synced %d slash commands %s", len(synced), "to the dev server" if guild else "globally")

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """Wait for this shard's IDENTIFY slot, shared with the bot's other processes (in place of
        discord.py's 5-second pause before every IDENTIFY but the first)."""
        await self.limits.identify(shard_id or 0, await self.max_concurrency())

    async def max_concurrency(self) -> int:
        """The IDENTIFYs Discord allows at once (``session_start_limit.max_concurrency`` of
        GET /gateway/bot), asked once; 1 for an unsharded bot, or when Discord does not say."""
        if self._max_concurrency is None:
            if self.shard_count is None:
                return 1
            try:
                _, _, limits = await self.http.get_bot_gateway()
                self._max_concurrency = max(1, int(limits["max_concurrency"]))
            except (discord.DiscordException, KeyError, TypeError, ValueError) as exc:
                log.warning("the gateway's session start limit is unknown (%s): one IDENTIFY at a time", exc)
                self._max_concurrency = 1
        return self._max_concurrency

    async def on_ready(self) -> None:
        """Log the connection (this runs again after reconnects: no set-up here)."""
        log.info("connected as %s to %d servers", self.user, len(self.guilds))

    async def close(self) -> None:
        """Cut in-flight replies (each says so) and wait for them to be stored.

        Waiting messages are not started; a second call (a second Ctrl-C) waits for the first.
        """
        if self._closed_once is None:
            self._closed_once = asyncio.ensure_future(self._shut_down())
        await asyncio.shield(self._closed_once)

    async def _shut_down(self) -> None:
        self._closing = True
        try:
            self.lines.stop_all()
            if self._reply_tasks:
                _, pending = await asyncio.wait(set(self._reply_tasks), timeout=self.settings.shutdown_grace)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=1.0)
            if self._side_tasks:
                await asyncio.wait(set(self._side_tasks), timeout=1.0)
            if self._housekeeping is not None:
                self._housekeeping.cancel()
                await asyncio.wait({self._housekeeping}, timeout=5.0)
        finally:
            await super().close()

    async def _keep_house(self) -> None:
        """Retention and the database budget, shortly after start and then every hour."""
        await asyncio.sleep(60.0)
        while not self._closing:
            try:
                await self.service.housekeeping()
            except Exception:
                log.exception("housekeeping failed; trying again later")
            await asyncio.sleep(HOUSEKEEPING_EVERY)

    async def reload_faq(self) -> list[str]:
        """Load the FAQ topics again; returns the problems of skipped files."""
        self.faq, problems = await asyncio.to_thread(load_faq, self.settings)
        self.service.faq = self.faq
        return problems

    async def on_shard_ready(self, shard_id: int) -> None:
        """Log each shard's connection (a sharded bot)."""
        log.info("shard %d of %s connected", shard_id, self.shard_count)

    # ------------------------------------------------------------------ deleted channels

    async def on_guild_channel_delete(self, channel: discord.abc.GuildChannel) -> None:
        """A deleted channel's conversation and transcript are deleted too, and those of its
        threads: discord.py reports only the threads it holds, not the archived ones. (Looked
        for again after the channel: a thread may have talked meanwhile.) One purge that fails
        does not stop the others."""
        await self._forget_logged(channel.id)
        done: set[str] = set()
        for _ in range(2):
            try:
                threads = [t for t in await self.service.threads_of(str(channel.id)) if t not in done]
            except Exception:
                log.exception("the threads of deleted channel %s could not be looked up", channel.id)
                return
            for thread in threads:
                done.add(thread)
                await self._forget_logged(int(thread))

    async def _forget_logged(self, channel_id: int) -> None:
        try:
            await self._forget(channel_id)
        except Exception:
            log.exception("the conversation of deleted channel %s could not be purged", channel_id)

    async def on_raw_thread_delete(self, payload: discord.RawThreadDeleteEvent) -> None:
        """A deleted thread's conversation and transcript are deleted too."""
        await self._forget(payload.thread_id)

    async def on_guild_remove(self, guild: discord.Guild) -> None:
        """Removed from a server (kicked, or the server deleted): forget its conversations."""
        channels = await self.service.server_conversations(str(guild.id))
        for channel in channels:
            await self._forget(int(channel))
        await self.service.forget_server_settings(str(guild.id))
        log.info("removed from server %s: forgot %d conversations", guild.id, len(channels))

    async def _forget(self, channel_id: int) -> None:
        self.enabled.discard(channel_id)
        self.stop(str(channel_id), waiting_too=True)
        if await self.service.purge(str(channel_id)):
            log.info("channel %s deleted: its conversation and transcript were purged", channel_id)

    # ------------------------------------------------------------------ numbers

    def metrics(self) -> dict[str, float]:
        """The engine's numbers and the bot's: replies in flight, messages waiting, channels."""
        values = dict(self.engine.metrics())
        values["replies_in_flight"] = len(self.lines.running())
        values["messages_waiting"] = self.lines.waiting()
        values["channels_enabled"] = len(self.enabled)
        values["reply_tokens_per_s"] = self.tokens_per_second()
        for name, value in self.service.state_metrics().items():
            values[f"states_{name}"] = float(value)
        return values

    def device_metrics(self) -> dict[str, dict[str, float]]:
        """With several GPUs (or replicas), each one's engine numbers and the bytes of conversation
        states on it (``states_bytes``); empty otherwise."""
        devices = {name: dict(numbers) for name, numbers in self.engine.device_metrics().items()}
        if devices:
            used = self.service.device_state_bytes()
            for name, numbers in devices.items():
                numbers.setdefault("states_bytes", float(used.get(name, 0)))
        return devices


class ShardedRwkvBot(RwkvBot, commands.AutoShardedBot):
    """The bot as some shards (``shard_ids`` of ``shard_count``) of a sharded bot: one gateway
    connection per shard in this process, the other shards in other processes."""
