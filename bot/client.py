"""The Discord client: where the bot talks, queues per channel, streamed replies, shutdown.

Build it with :func:`create_bot` (no connection is made until ``start``); one-time set-up (the
database, the chat service, slash-command sync) happens in ``setup_hook``, never in ``on_ready``,
which fires again after every failed resume.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import discord
from discord import app_commands

from bot.app import build_service, load_faq
from bot.settings import Settings
from bot.splitting import split_message
from bot.streaming import NO_MENTIONS, ChannelPacer, ReplyStream
from chat.grammar import Command, GrammarError, Parsed, parse_message
from chat.outcome import Outcome, OutcomeKind
from chat.session import ChatService
from chat.settings import ChannelContext
from engine.interface import Engine, TextDelta
from faq import FaqIndex, is_question

log = logging.getLogger(__name__)

STOP_EMOJI = "⏹️"
QUEUED_EMOJI = "⏳"
FAQ_COLOUR = discord.Colour.from_rgb(88, 101, 242)
FAQ_AUTO_CONFIDENCE = 0.8  # automatic answers only for clear matches: a wrong one is worse than none
HOUSEKEEPING_EVERY = 3600.0  # seconds between retention / database budget passes


@dataclass
class Generation:
    """A reply being written: who asked, and how to stop it."""

    channel_key: str
    requester: int
    cancel: threading.Event = field(default_factory=threading.Event)


class RwkvBot(discord.Client):
    """The bot. Tests build it offline and feed it gateway payloads."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: enable it in the developer portal too
        super().__init__(intents=intents, allowed_mentions=NO_MENTIONS)
        self.settings = settings
        self.engine = engine
        self.clock = clock
        self.sleep = sleep
        self.tree = app_commands.CommandTree(self)
        self.service: ChatService | None = None
        self.enabled: set[int] = set()
        self.disabled: set[int] = set()  # threads switched off although their channel is on
        self.pacers: dict[int, ChannelPacer] = {}  # per channel: Discord's pace of writes there
        self.pending: collections.Counter[str] = collections.Counter()  # accepted, not yet answered
        self.generations: dict[str, list[Generation]] = {}  # per conversation, running one first
        self.channel_locks: dict[str, asyncio.Lock] = {}
        self.last_message_at: dict[int, float] = {}
        self.warned_at: dict[int, float] = {}
        self.running: dict[str, Generation] = {}
        self.by_reply: dict[int, Generation] = {}  # reply message id -> generation, for reactions
        self.speeds: collections.deque[tuple[int, float]] = collections.deque(maxlen=20)
        self._reply_tasks: set[asyncio.Task[None]] = set()
        self._side_tasks: set[asyncio.Future[Any]] = set()
        self._closing = False
        self._housekeeping: asyncio.Task[None] | None = None
        self._closed_once: asyncio.Future[None] | None = None
        self.faq: FaqIndex | None = None
        from bot.commands import register_commands

        register_commands(self)

    # ------------------------------------------------------------------ lifecycle

    async def setup_hook(self) -> None:
        """Open the database and the chat service; sync commands only when asked to."""
        self.faq, _ = load_faq(self.settings)
        self.service = await build_service(self.settings, self.engine, self.faq)
        self.enabled = {int(c) for c in await self.service.enabled_channels()}
        self.disabled = {int(c) for c in await self.service.disabled_threads()}
        self._housekeeping = asyncio.create_task(self._keep_house(), name="housekeeping")
        if self.settings.sync_commands:
            guild = discord.Object(self.settings.dev_guild) if self.settings.dev_guild else None
            if guild is not None:
                self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
            log.info("synced %d slash commands %s", len(synced), "to the dev server" if guild else "globally")

    async def on_ready(self) -> None:
        """Log the connection (this runs again after reconnects: no set-up here)."""
        log.info("connected as %s to %d servers", self.user, len(self.guilds))

    async def close(self) -> None:
        """Cut in-flight replies (each says so), wait for them to be stored, close the database.

        Waiting messages are not started; a second call (a second Ctrl-C) waits for the first.
        """
        if self._closed_once is None:
            self._closed_once = asyncio.ensure_future(self._shut_down())
        await asyncio.shield(self._closed_once)

    async def _shut_down(self) -> None:
        self._closing = True
        try:
            for generations in self.generations.values():
                for generation in generations:
                    generation.cancel.set()
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
            if self.service is not None:
                await self.service.close()
        finally:
            await super().close()

    async def _keep_house(self) -> None:
        """Retention and the database budget, shortly after start and then every hour."""
        await asyncio.sleep(60.0)
        while not self._closing:
            assert self.service is not None
            try:
                await self.service.housekeeping()
            except Exception:
                log.exception("housekeeping failed; trying again later")
            await asyncio.sleep(HOUSEKEEPING_EVERY)

    # ------------------------------------------------------------------ deleted channels

    async def on_guild_channel_delete(self, channel: discord.abc.GuildChannel) -> None:
        """A deleted channel's conversation and transcript are deleted too, and those of its
        threads: discord.py reports only the threads it holds, not the archived ones. (Looked
        for again after the channel: a thread may have talked meanwhile.) One purge that fails
        does not stop the others."""
        await self._forget_logged(channel.id)
        if self.service is None:
            return
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
        if self.service is None:
            return
        channels = await self.service.server_conversations(str(guild.id))
        for channel in channels:
            await self._forget(int(channel))
        await self.service.forget_server_settings(str(guild.id))
        log.info("removed from server %s: forgot %d conversations", guild.id, len(channels))

    async def _forget(self, channel_id: int) -> None:
        if self.service is None:
            return
        self.enabled.discard(channel_id)
        self.stop(str(channel_id), waiting_too=True)
        if await self.service.purge(str(channel_id)):
            log.info("channel %s deleted: its conversation and transcript were purged", channel_id)

    # ------------------------------------------------------------------ messages

    def conversation(self, message: discord.Message) -> str | None:
        """The conversation a message belongs to, or None when the bot should stay silent."""
        channel = message.channel
        if message.guild is None:
            return str(channel.id) if self.settings.allow_dms else None
        parent = getattr(channel, "parent_id", None)
        if channel.id in self.enabled or (
            parent is not None and parent in self.enabled and channel.id not in self.disabled
        ):
            return str(channel.id)
        if self.settings.respond_to_mentions and self.user is not None and self.user in message.mentions:
            return str(channel.id)
        return None

    def message_text(self, message: discord.Message) -> str:
        """The message without the bot's own mention."""
        text = message.content
        if self.user is not None:
            for form in (f"<@{self.user.id}>", f"<@!{self.user.id}>"):
                text = text.replace(form, "")
        return text.strip()

    async def on_message(self, message: discord.Message) -> None:
        """Answer a message in a channel where the bot talks."""
        if message.author.bot or self.user is None or message.author.id == self.user.id:
            return
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return  # joins, pins, boosts, thread notices...
        if self._closing or self.service is None:
            return
        key = self.conversation(message)
        if key is None:
            return
        text = self.message_text(message)
        mentioned = self.user in message.mentions
        if not text and not mentioned and message.guild is not None:
            return  # an image or sticker alone: nothing to answer
        # Everything up to the first await decides, so messages arriving together are counted.
        if not self._within_cooldown(message):
            return
        accepted = self.pending[key]
        if accepted > self.settings.max_queue:
            self._spawn(
                message.reply(
                    "I'm still answering earlier messages in this channel. Please try again in a moment.",
                    mention_author=False,
                )
            )
            return
        self.pending[key] += 1
        generation = Generation(key, message.author.id)
        self.generations.setdefault(key, []).append(generation)
        task = asyncio.current_task()
        if task is not None:
            self._reply_tasks.add(task)
        try:
            await self._serve(message, key, text, generation, queued=accepted > 0)
        except discord.HTTPException as exc:
            log.warning("could not answer message %s: %s", message.id, exc)
        finally:
            self.pending[key] -= 1
            if not self.pending[key]:
                del self.pending[key]
            waiting = self.generations.get(key, [])
            if generation in waiting:
                waiting.remove(generation)
            if not waiting:
                self.generations.pop(key, None)
            if task is not None:
                self._reply_tasks.discard(task)

    def _within_cooldown(self, message: discord.Message) -> bool:
        """False (and one reminder per cooldown) when the author writes again too soon."""
        now = self.clock()
        author = message.author.id
        last = self.last_message_at.get(author)
        cooldown = self.settings.user_cooldown
        if last is not None and now - last < cooldown:
            if self.warned_at.get(author, float("-inf")) < last:
                self.warned_at[author] = now
                self._spawn(
                    message.reply(
                        f"Please wait {cooldown - (now - last):.0f} s before your next message.",
                        mention_author=False,
                        delete_after=10,
                    )
                )
            return False
        self.last_message_at[author] = now
        if len(self.last_message_at) > 10_000:  # forget users whose cooldown is long over
            self.last_message_at = {a: t for a, t in self.last_message_at.items() if now - t < cooldown}
            self.warned_at = {a: t for a, t in self.warned_at.items() if a in self.last_message_at}
        return True

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Run a small Discord call in the background, keeping a reference and logging failures."""
        task = asyncio.ensure_future(coroutine)
        self._side_tasks.add(task)

        def done(finished: asyncio.Future[Any]) -> None:
            self._side_tasks.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                log.warning("a Discord call failed: %s", finished.exception())

        task.add_done_callback(done)

    async def _serve(
        self, message: discord.Message, key: str, text: str, generation: Generation, *, queued: bool
    ) -> None:
        # The message takes its place in the channel's line before anything else is awaited
        # (asyncio's lock serves its waiters in order), so messages sent together are answered
        # and stored in the order they arrived; the checks below run when its turn comes.
        lock = self.channel_locks.setdefault(key, asyncio.Lock())
        marked: asyncio.Task[None] | None = None
        if queued:
            marked = asyncio.ensure_future(self._mark_queued(message))
        async with lock:
            if marked is not None:
                await marked
                with contextlib.suppress(discord.HTTPException):
                    await message.remove_reaction(QUEUED_EMOJI, self.user)  # type: ignore[arg-type]
            if self._closing or generation.cancel.is_set():
                why = "the bot is restarting" if self._closing else "it was stopped"
                await message.reply(
                    f"Sorry, I did not answer this: {why}. Please send it again.", mention_author=False
                )
                return
            assert self.service is not None
            parsed = parse_message(text)
            context = await self.service.context(key)
            if (
                isinstance(parsed, Parsed)
                and parsed.command is Command.RESET
                and not await self._may_reset(message)
            ):
                await message.reply("Only moderators can reset the conversation here.", mention_author=False)
                return
            if (
                isinstance(parsed, Parsed)
                and parsed.command is Command.CHAT
                and context.faq_auto
                and await self._faq_answer(message, text)
            ):
                return
            self.running[key] = generation
            try:
                await self._answer(message, parsed, context, generation)
            finally:
                if self.running.get(key) is generation:
                    del self.running[key]
        if not lock.locked() and not self.pending.get(key, 0) > 1:
            self.channel_locks.pop(key, None)

    async def _mark_queued(self, message: discord.Message) -> None:
        with contextlib.suppress(discord.HTTPException):
            await message.add_reaction(QUEUED_EMOJI)

    async def _faq_answer(self, message: discord.Message, text: str) -> bool:
        """Answer a question from the FAQ before the model (for channels that asked for it)."""
        if self.faq is None or not is_question(text):
            return False
        found = self.faq.best(text)
        if found is None or found.confidence < FAQ_AUTO_CONFIDENCE:
            return False
        from bot.commands import faq_embed

        await message.reply(embed=faq_embed(found.topic), mention_author=False, allowed_mentions=NO_MENTIONS)
        return True

    async def _may_reset(self, message: discord.Message) -> bool:
        if message.guild is None or not isinstance(message.author, discord.Member):
            return True
        assert self.service is not None
        moderator = message.channel.permissions_for(message.author).manage_messages
        return await self.service.may_reset(str(message.guild.id), moderator)

    async def _answer(
        self,
        message: discord.Message,
        parsed: Parsed | GrammarError,
        context: ChannelContext,
        generation: Generation,
    ) -> None:
        assert self.service is not None
        key = context.channel_id
        stream = ReplyStream(
            message,
            thinking=context.thinking,
            interval=self.settings.edit_interval,
            clock=self.clock,
            on_give_up=generation.cancel.set,
            pacer=self.pacer(message.channel.id),
        )
        guild_id = str(message.guild.id) if message.guild else None
        parent = message.channel.parent_id if isinstance(message.channel, discord.Thread) else None
        typing = message.channel.typing()
        typing_on = False
        with contextlib.suppress(discord.HTTPException):
            await typing.__aenter__()  # shown while the prompt is read, until the first text
            typing_on = True
        started = self.clock()
        outcome: Outcome | None = None
        events = self.service.handle(
            key,
            parsed,
            cancel=generation.cancel,
            guild_id=guild_id,
            parent_id=None if parent is None else str(parent),
            context=context,
        )
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    if typing_on:
                        typing_on = False
                        await _stop_typing(typing)
                    if isinstance(event, TextDelta):
                        await stream.push(event.text)
                        if stream.messages:
                            self.by_reply.setdefault(stream.messages[0].id, generation)
                    else:
                        outcome = event
        except Exception:
            log.exception("the reply to message %s failed", message.id)
            outcome = Outcome(
                OutcomeKind.ERROR, "something went wrong on my side. The conversation is unchanged."
            )
        finally:
            if typing_on:
                await _stop_typing(typing)
            for reply in stream.messages[:1]:
                self.by_reply.pop(reply.id, None)
        if outcome is not None:
            await self._deliver(message, stream, outcome, started)

    async def _deliver(
        self, message: discord.Message, stream: ReplyStream, outcome: Outcome, started: float
    ) -> None:
        if outcome.kind.from_model:
            if not outcome.text.strip() and not stream.text.strip():
                stream.text = "*(the model wrote nothing)*"
            footer = " ".join(f"*{n}*" for n in outcome.notices)
            if self._closing and outcome.stop_reason == "cancelled":
                footer = "*(interrupted: the bot is shutting down)*"
            await stream.finish(footer)
            elapsed = max(self.clock() - started, 1e-6)
            self.speeds.append((len(outcome.tokens), elapsed))
            return
        if outcome.kind is OutcomeKind.ERROR and stream.messages:
            await stream.finish(f"**The reply failed:** {outcome.text}")
            return
        if not outcome.text and not outcome.notices:
            outcome = Outcome(outcome.kind, "*(no text)*")
        if outcome.kind is OutcomeKind.FAQ:
            embed = discord.Embed(description=outcome.text[:4096], colour=FAQ_COLOUR)
            await message.reply(embed=embed, mention_author=False, allowed_mentions=NO_MENTIONS)
            return
        body = "\n".join([*(f"*{n}*" for n in outcome.notices), outcome.text])
        for index, piece in enumerate(split_message(body)):
            if index == 0:
                await message.reply(piece, mention_author=False, allowed_mentions=NO_MENTIONS)
            else:
                await message.channel.send(piece, allowed_mentions=NO_MENTIONS)

    def pacer(self, channel_id: int) -> ChannelPacer:
        """The pace of writes in a channel, shared by all its replies (idle ones are dropped)."""
        pacer = self.pacers.get(channel_id)
        if pacer is None:
            now = self.clock()
            if len(self.pacers) > 1000:
                self.pacers = {c: p for c, p in self.pacers.items() if not p.idle(now)}
            pacer = self.pacers[channel_id] = ChannelPacer(
                self.settings.edit_interval, clock=self.clock, sleep=self.sleep
            )
        return pacer

    # ------------------------------------------------------------------ stopping

    async def reload_faq(self) -> list[str]:
        """Load the FAQ topics again; returns the problems of skipped files."""
        self.faq, problems = await asyncio.to_thread(load_faq, self.settings)
        if self.service is not None:
            self.service.faq = self.faq
        return problems

    def stop(self, key: str, *, waiting_too: bool = False) -> bool:
        """Stop the reply being written in a conversation (and, if asked, the waiting ones)."""
        stopped = False
        for generation in self.generations.get(key, []):
            if generation.cancel.is_set():
                continue
            if waiting_too or self.running.get(key) is generation:
                generation.cancel.set()
                stopped = True
        return stopped

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        """A stop reaction on a reply being written stops it (by its requester or a moderator)."""
        if str(payload.emoji) != STOP_EMOJI or self.user is None or payload.user_id == self.user.id:
            return
        generation = self.by_reply.get(payload.message_id)
        if generation is None:
            return
        allowed = payload.user_id == generation.requester
        if not allowed and payload.member is not None:
            channel = self.get_channel(payload.channel_id)
            if isinstance(channel, (discord.abc.GuildChannel, discord.Thread)):
                allowed = channel.permissions_for(payload.member).manage_messages
        if allowed:
            generation.cancel.set()

    def metrics(self) -> dict[str, float]:
        """The engine's numbers and the bot's: replies in flight, messages waiting, channels."""
        values = dict(self.engine.metrics())
        values["replies_in_flight"] = len(self.running)
        values["messages_waiting"] = sum(self.pending.values()) - len(self.running)
        values["channels_enabled"] = len(self.enabled)
        values["reply_tokens_per_s"] = self.tokens_per_second()
        if self.service is not None:
            for name, value in self.service.state_metrics().items():
                values[f"states_{name}"] = float(value)
        return values

    def device_metrics(self) -> dict[str, dict[str, float]]:
        """With several GPUs, each one's engine numbers and the bytes of conversation states on it
        (``states_bytes``); empty otherwise."""
        devices = {name: dict(numbers) for name, numbers in self.engine.device_metrics().items()}
        if devices and self.service is not None:
            used = self.service.device_state_bytes()
            for name, numbers in devices.items():
                numbers["states_bytes"] = float(used.get(name, 0))
        return devices

    def tokens_per_second(self) -> float:
        """Average speed of the recent replies."""
        tokens = sum(t for t, _ in self.speeds)
        seconds = sum(s for _, s in self.speeds)
        return tokens / seconds if seconds else 0.0


async def _stop_typing(typing: contextlib.AbstractAsyncContextManager[Any]) -> None:
    with contextlib.suppress(Exception):  # the indicator is cosmetic: never fail a reply for it
        await typing.__aexit__(None, None, None)


def create_bot(settings: Settings, engine: Engine, **options: Any) -> RwkvBot:
    """Build the bot without connecting (``await bot.start(token)`` connects)."""
    return RwkvBot(settings, engine, **options)
