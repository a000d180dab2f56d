"""The message path: where the bot talks, each conversation's line, streamed replies, stopping.

``on_message -> _serve -> _answer -> _deliver``: a message joins its conversation's line on
arrival (:mod:`bot.lines`), takes its turn, is handed to the chat service with the channel's
context read once, and its reply is streamed into Discord at the channel's pace of writes.
:class:`~bot.client.RwkvBot` adds the lifecycle and the events of channels and servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import discord
from discord.ext import commands

from bot.buttons import COMMANDS, ended_view, writing_view
from bot.checks import is_moderator
from bot.embeds import DISCORD_HELP, faq_embed, faq_text_embed
from bot.limits import Limits, LocalLimits
from bot.lines import ChannelLines, Generation
from bot.settings import Settings
from bot.splitting import split_message
from bot.streaming import NO_MENTIONS, ChannelPacer, ReplyStream
from bot.tree import BotTree
from chat.grammar import Command, GrammarError, Parsed, parse_message
from chat.outcome import Outcome, OutcomeKind
from chat.session import ChatService
from chat.settings import ChannelContext
from chat.storage import StoreError
from engine.interface import TextDelta
from faq import FaqIndex, is_question

log = logging.getLogger(__name__)

STOP_EMOJI = "⏹️"
QUEUED_EMOJI = "⏳"
FAQ_AUTO_CONFIDENCE = 0.8  # automatic answers only for clear matches: a wrong one is worse than none
QUEUE_FULL = "I'm still answering earlier messages in this channel. Please try again in a moment."
HINT_EVERY = 600.0  # seconds between two hints of one kind to one member or channel
DMS_OFF = "I don't answer direct messages here: talk to me in a server channel where I'm enabled."
ATTACHMENTS_UNREAD = "I can only read text, not attachments or stickers: please write your message."
ROLE_REFUSED = "Your roles don't include talking to me in this channel; the moderators decide who may."


def cooldown_notice(left: float) -> str:
    """The reminder of the cooldown, with the time left rounded up (never "0 s")."""
    return f"Please wait {math.ceil(left)} s before your next message."


class ReplyingBot(commands.Bot):
    """A Discord bot that answers messages through the chat service (no prefix commands: every
    message goes to ``on_message``, and the slash commands live in cogs)."""

    def __init__(
        self,
        settings: Settings,
        service: ChatService,
        faq: FaqIndex,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        limits: Limits | None = None,
        **shards: Any,
    ) -> None:
        """``limits``: the identify slots and the REST budget (by default this process's own);
        ``shards``: ``shard_ids`` and ``shard_count`` for a sharded bot."""
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: enable it in the developer portal too
        super().__init__(
            command_prefix=commands.when_mentioned,
            help_command=None,
            tree_cls=BotTree,
            intents=intents,
            allowed_mentions=NO_MENTIONS,
            **shards,
        )
        self.settings = settings
        self.limits: Limits = limits or LocalLimits(settings.rest_rate, clock=clock, sleep=sleep)
        self.service = service
        self.faq = faq
        self.clock = clock
        self.sleep = sleep
        self.enabled: set[int] = set()
        self.disabled: set[int] = set()  # threads switched off although their channel is on
        self.lines = ChannelLines()
        self.pacers: dict[int, ChannelPacer] = {}  # per channel: Discord's pace of writes there
        self.last_message_at: dict[int, float] = {}
        self.warned_at: dict[int, float] = {}
        self.hinted: dict[tuple[str, int], float] = {}  # (what, whom or where) -> when last hinted
        self.by_reply: dict[int, Generation] = {}  # reply message id -> generation, for reactions
        self.buttoned: dict[int, discord.Message] = {}  # channel -> its newest reply with buttons
        self.speeds: deque[tuple[int, float]] = deque(maxlen=20)
        self._reply_tasks: set[asyncio.Task[None]] = set()
        self._side_tasks: set[asyncio.Future[Any]] = set()
        self._closing = False

    # ------------------------------------------------------------------ where it talks

    def conversation(self, message: discord.Message) -> str | None:
        """The conversation a message belongs to, or None when the bot should stay silent."""
        channel = message.channel
        if message.guild is None:
            return str(channel.id) if self.settings.allow_dms else None
        if self.enabled_in(channel):
            return str(channel.id)
        if self.settings.respond_to_mentions and self.mentioned(message):
            return str(channel.id)
        return None

    def mentioned(self, message: discord.Message) -> bool:
        """The bot, or its own managed role (which members often pick from the list), is mentioned."""
        if self.user is not None and self.user in message.mentions:
            return True
        role = message.guild.self_role if message.guild is not None else None
        return role is not None and role in message.role_mentions

    def enabled_in(self, channel: Any) -> bool:
        """Whether moderators enabled the bot in this channel (or in the channel of this thread,
        unless the thread was switched off on its own)."""
        parent = getattr(channel, "parent_id", None)
        return channel.id in self.enabled or (
            parent is not None and parent in self.enabled and channel.id not in self.disabled
        )

    def message_text(self, message: discord.Message) -> str:
        """The message without the bot's own mention."""
        text = message.content
        role = message.guild.self_role if message.guild is not None else None
        forms = [f"<@&{role.id}>"] if role is not None else []
        if self.user is not None:
            forms += [f"<@{self.user.id}>", f"<@!{self.user.id}>"]
        for form in forms:
            text = text.replace(form, "")
        return text.strip()

    # ------------------------------------------------------------------ messages

    async def on_message(self, message: discord.Message) -> None:
        """Answer a message in a channel where the bot talks."""
        if message.author.bot or self.user is None or message.author.id == self.user.id:
            return
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return  # joins, pins, boosts, thread notices...
        if self._closing:
            return
        key = self.conversation(message)
        if key is None:
            if message.guild is None:  # DMs are off
                self._hint(message, ("dm", message.author.id), DMS_OFF)
            return
        text = self.message_text(message)
        if not text and not self.mentioned(message) and message.guild is not None:
            if message.attachments or message.stickers:  # nothing the model could read
                self._hint(message, ("attachment", message.channel.id), ATTACHMENTS_UNREAD)
            return
        # Everything up to the first await decides, so messages arriving together are counted.
        if not self._within_cooldown(message):
            return
        accepted = self.lines.length(key)
        if accepted > self.settings.max_queue:
            self._spawn(self._write(lambda: message.reply(QUEUE_FULL, mention_author=False)))
            return
        generation = self.lines.join(key, message.author.id)
        await self._take_turn(message, text, generation, queued=accepted > 0)

    async def press(self, interaction: discord.Interaction, action: str, channel_id: int) -> None:
        """A reply's button (see :mod:`bot.buttons`): Stop follows the rule of ``/rwkv stop``;
        Retry and Continue are the text commands ``+``, ``++`` and ``+++``, with their rules
        (where the bot talks, the cooldown, the queue limit), answered below the reply."""
        key = str(channel_id)
        if action == "stop":
            text = self.stop_reply(key, interaction.user.id, is_moderator(interaction))
            await interaction.response.send_message(text, ephemeral=True)
            return
        refusal = self._press_refusal(interaction, channel_id)
        if not refusal and not await self.roles_permit(interaction.user, interaction.channel, key):
            refusal = ROLE_REFUSED
        left = 0.0 if refusal else self._cooldown_left(interaction.user.id)
        if left > 0:
            refusal = cooldown_notice(left)
        elif not refusal and self.lines.length(key) > self.settings.max_queue:
            refusal = QUEUE_FULL
        if refusal or interaction.message is None:
            await interaction.response.send_message(refusal, ephemeral=True)
            return
        # The press is taken before it joins the line: a failed acknowledgement (Discord's
        # 3-second deadline) then leaves nothing behind in the line.
        await interaction.response.defer()
        accepted = self.lines.length(key)
        generation = self.lines.join(key, interaction.user.id)
        await self._take_turn(
            interaction.message, COMMANDS[action], generation, queued=accepted > 0, roles_checked=True
        )

    def _press_refusal(self, interaction: discord.Interaction, channel_id: int) -> str:
        """Why a Retry or Continue press is not taken ("" when it is)."""
        message, channel = interaction.message, interaction.channel
        if message is None or channel is None or channel.id != channel_id:
            return "This button does not belong to this channel."
        if self._closing:
            return "The bot is restarting; please try again in a moment."
        newest = self.buttoned.get(channel_id)
        if newest is not None and newest.id != message.id:
            return "A newer reply has its own buttons; this one no longer applies."
        if message.guild is None:
            return "" if self.settings.allow_dms else "I don't answer direct messages here."
        if not self.enabled_in(channel) and not self.settings.respond_to_mentions:
            return "I no longer answer in this channel."
        return ""

    async def _take_turn(
        self,
        message: discord.Message,
        text: str,
        generation: Generation,
        *,
        queued: bool,
        roles_checked: bool = False,
    ) -> None:
        """Answer in the message's line (it has joined), keeping the task for a clean shutdown.
        ``roles_checked``: a button press, whose presser (not the message's author, the bot) was
        checked already."""
        task = asyncio.current_task()
        if task is not None:
            self._reply_tasks.add(task)
        try:
            await self._serve(message, text, generation, queued=queued, roles_checked=roles_checked)
        except discord.HTTPException as exc:
            log.warning("could not answer message %s: %s", message.id, exc)
        except StoreError as exc:  # the database failed before the reply began (context, roles)
            log.error("could not answer message %s: %s", message.id, exc)
            with contextlib.suppress(discord.HTTPException):
                await self.limits.take()
                await message.reply(
                    "Sorry, my database failed, so I could not answer this; nothing was changed. "
                    "The bot's log says why.",
                    mention_author=False,
                )
        finally:
            self.lines.leave(generation)
            if task is not None:
                self._reply_tasks.discard(task)

    def _hint(self, message: discord.Message, key: tuple[str, int], text: str) -> None:
        """A short hint instead of silence, at most once per :data:`HINT_EVERY` for each key."""
        now = self.clock()
        if now - self.hinted.get(key, float("-inf")) < HINT_EVERY:
            return
        self.hinted[key] = now
        if len(self.hinted) > 10_000:
            self.hinted = {k: t for k, t in self.hinted.items() if now - t < HINT_EVERY}
        self._spawn(
            self._write(lambda: message.reply(text, mention_author=False, allowed_mentions=NO_MENTIONS))
        )

    async def _may_talk(self, message: discord.Message, channel_key: str) -> bool:
        """Whether the author's roles let them talk to the bot here (a hint now and then if not)."""
        if await self.roles_permit(message.author, message.channel, channel_key):
            return True
        self._hint(message, ("roles", message.author.id), ROLE_REFUSED)
        return False

    async def roles_permit(self, member: Any, channel: Any, channel_key: str) -> bool:
        """The roles allowed and denied here (server and channel) let this member talk to the bot;
        moderators always may, and outside a server there are no roles."""
        if not isinstance(member, discord.Member) or not hasattr(channel, "permissions_for"):
            return True
        if channel.permissions_for(member).manage_messages:
            return True
        rules = await self.service.role_rules(str(member.guild.id), channel_key)
        return rules.permits({str(role.id) for role in member.roles})

    def _within_cooldown(self, message: discord.Message) -> bool:
        """False (and one reminder per cooldown) when the author writes again too soon."""
        author = message.author.id
        left = self._cooldown_left(author)
        if left <= 0:
            return True
        if self.warned_at.get(author, float("-inf")) < self.last_message_at[author]:
            self.warned_at[author] = self.clock()
            notice = cooldown_notice(left)
            self._spawn(self._write(lambda: message.reply(notice, mention_author=False, delete_after=10)))
        return False

    def _cooldown_left(self, author: int) -> float:
        """Seconds the author must still wait; 0 when they may write now (which is recorded)."""
        now = self.clock()
        last = self.last_message_at.get(author)
        cooldown = self.settings.user_cooldown
        if last is not None and now - last < cooldown:
            return cooldown - (now - last)
        self.last_message_at[author] = now
        if len(self.last_message_at) > 10_000:  # forget users whose cooldown is long over
            self.last_message_at = {a: t for a, t in self.last_message_at.items() if now - t < cooldown}
            self.warned_at = {a: t for a, t in self.warned_at.items() if a in self.last_message_at}
        return 0.0

    async def _write(self, write: Callable[[], Awaitable[Any]]) -> None:
        """A REST write that must go out (a new message), when the REST budget allows it."""
        await self.limits.take()
        await write()

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
        self,
        message: discord.Message,
        text: str,
        generation: Generation,
        *,
        queued: bool,
        roles_checked: bool = False,
    ) -> None:
        # The message took its place in the line on arrival (asyncio's lock serves its waiters in
        # order), so messages sent together are answered and stored in the order they arrived;
        # the checks below run when its turn comes.
        marked: asyncio.Task[None] | None = None
        if queued:
            marked = asyncio.ensure_future(self._mark_queued(message))
        async with self.lines.turn(generation):
            if marked is not None:
                await marked
                with contextlib.suppress(discord.HTTPException):
                    await self.limits.take()
                    await message.remove_reaction(QUEUED_EMOJI, self.user)  # type: ignore[arg-type]
            if self._closing or generation.cancel.is_set():
                why = "the bot is restarting" if self._closing else "it was stopped"
                await self.limits.take()
                await message.reply(
                    f"Sorry, I did not answer this: {why}. Please send it again.", mention_author=False
                )
                return
            if not roles_checked and not await self._may_talk(message, generation.channel_key):
                return
            parsed = parse_message(text)
            context = await self.service.context(generation.channel_key)
            command = parsed.command if isinstance(parsed, Parsed) else None
            if command is Command.RESET and not await self._may_reset(message):
                await self.limits.take()
                await message.reply("Only moderators can reset the conversation here.", mention_author=False)
                return
            if command is Command.CHAT and context.faq_auto and await self._faq_answer(message, text):
                return
            with self.lines.writing(generation):
                await self._answer(message, parsed, context, generation)

    async def _mark_queued(self, message: discord.Message) -> None:
        with contextlib.suppress(discord.HTTPException):
            await self.limits.take()
            await message.add_reaction(QUEUED_EMOJI)

    async def _faq_answer(self, message: discord.Message, text: str) -> bool:
        """Answer a question from the FAQ before the model (for channels that asked for it)."""
        if not is_question(text):
            return False
        found = self.faq.best(text)
        if found is None or found.confidence < FAQ_AUTO_CONFIDENCE:
            return False
        await self.limits.take()
        await message.reply(embed=faq_embed(found.topic), mention_author=False, allowed_mentions=NO_MENTIONS)
        return True

    async def _may_reset(self, message: discord.Message) -> bool:
        if message.guild is None or not isinstance(message.author, discord.Member):
            return True
        moderator = message.channel.permissions_for(message.author).manage_messages
        return await self.service.may_reset(str(message.guild.id), moderator)

    async def _answer(
        self,
        message: discord.Message,
        parsed: Parsed | GrammarError,
        context: ChannelContext,
        generation: Generation,
    ) -> None:
        stream = ReplyStream(
            message,
            thinking=context.thinking,
            interval=self.settings.edit_interval,
            clock=self.clock,
            on_give_up=generation.cancel.set,
            pacer=self.pacer(message.channel.id),
            live_view=writing_view(message.channel.id),
        )
        guild_id = str(message.guild.id) if message.guild else None
        parent = message.channel.parent_id if isinstance(message.channel, discord.Thread) else None
        typing = message.channel.typing()
        typing_on = False
        if await self.limits.try_take():  # cosmetic: skipped when the REST budget runs low
            with contextlib.suppress(discord.HTTPException):
                await typing.__aenter__()  # shown while the prompt is read, until the first text
                typing_on = True
        started = self.clock()
        outcome: Outcome | None = None
        events = self.service.handle(
            context.channel_id,
            parsed,
            cancel=generation.cancel,
            guild_id=guild_id,
            parent_id=None if parent is None else str(parent),
            context=context,
            speaker=message.author.display_name,
        )
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, TextDelta):
                        await stream.push(event.text)
                        if stream.messages:  # the first phrase is shown: typing ends
                            if typing_on:
                                typing_on = False
                                await _stop_typing(typing)
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
            elif outcome.kind is OutcomeKind.REPLY and outcome.stop_reason == "length":
                footer = " ".join([footer, "*(cut: the reply reached its length limit)*"]).strip()
            generated = outcome.kind is OutcomeKind.GENERATION
            await stream.finish(footer, ended_view(message.channel.id, generation=generated))
            self._move_buttons(message.channel.id, stream)
            elapsed = max(self.clock() - started, 1e-6)
            self.speeds.append((len(outcome.tokens), elapsed))
            return
        if outcome.kind is OutcomeKind.ERROR and stream.messages:
            await stream.finish(f"**The reply failed:** {outcome.text}")  # and Stop goes
            return
        if not outcome.text and not outcome.notices:
            outcome = Outcome(outcome.kind, "*(no text)*")
        if outcome.kind is OutcomeKind.FAQ:
            embed = faq_text_embed(outcome.text)
            await self.limits.take()
            await message.reply(embed=embed, mention_author=False, allowed_mentions=NO_MENTIONS)
            return
        text = f"{outcome.text}\n\n{DISCORD_HELP}" if outcome.kind is OutcomeKind.HELP else outcome.text
        body = "\n".join([*(f"*{n}*" for n in outcome.notices), text])
        for index, piece in enumerate(split_message(body)):
            await self.limits.take()
            if index == 0:
                await message.reply(piece, mention_author=False, allowed_mentions=NO_MENTIONS)
            else:
                await message.channel.send(piece, allowed_mentions=NO_MENTIONS)

    def _move_buttons(self, channel_id: int, stream: ReplyStream) -> None:
        """The newest reply of a channel has the buttons: the one before loses its own (an older
        reply's Retry would retry the newest, which is not what it says)."""
        if stream.failed or not stream.messages:
            return
        previous = self.buttoned.get(channel_id)
        self.buttoned[channel_id] = stream.messages[-1]
        if len(self.buttoned) > 1000:  # forget the oldest channels (their buttons stay valid)
            del self.buttoned[next(iter(self.buttoned))]
        if previous is not None and previous.id != stream.messages[-1].id:
            self._spawn(self._clear_buttons(previous))

    async def _clear_buttons(self, message: discord.Message) -> None:
        await self.pacer(message.channel.id).take()
        await message.edit(view=None)

    def pacer(self, channel_id: int) -> ChannelPacer:
        """The pace of writes in a channel, shared by all its replies (idle ones are dropped),
        within the REST budget of the whole bot."""
        pacer = self.pacers.get(channel_id)
        if pacer is None:
            now = self.clock()
            if len(self.pacers) > 1000:
                self.pacers = {c: p for c, p in self.pacers.items() if not p.idle(now)}
            pacer = self.pacers[channel_id] = ChannelPacer(
                self.settings.edit_interval, clock=self.clock, sleep=self.sleep, budget=self.limits
            )
        return pacer

    # ------------------------------------------------------------------ stopping

    def stop(self, key: str, *, waiting_too: bool = False) -> bool:
        """Stop the reply being written in a conversation (and, if asked, the waiting ones)."""
        return self.lines.stop(key, waiting_too=waiting_too)

    def stop_reply(self, key: str, user_id: int, moderator: bool) -> str:
        """Stop the reply being written in a conversation if this member may (see
        :meth:`~bot.lines.Generation.may_stop`); the answer to show them."""
        generation = self.lines.running_in(key)
        if generation is None or generation.cancel.is_set():
            return "No reply is being written here."
        if not generation.may_stop(user_id, moderator):
            return "Only the member who asked for this reply, or a moderator, can stop it."
        generation.cancel.set()
        return "Stopping the reply."

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        """A stop reaction on a reply being written stops it (by its requester or a moderator)."""
        if str(payload.emoji) != STOP_EMOJI or self.user is None or payload.user_id == self.user.id:
            return
        generation = self.by_reply.get(payload.message_id)
        if generation is None:
            return
        moderator = False
        channel = self.get_channel(payload.channel_id)
        if payload.member is not None and isinstance(channel, (discord.abc.GuildChannel, discord.Thread)):
            moderator = channel.permissions_for(payload.member).manage_messages
        if generation.may_stop(payload.user_id, moderator):
            generation.cancel.set()

    def tokens_per_second(self) -> float:
        """Average speed of the recent replies."""
        tokens = sum(t for t, _ in self.speeds)
        seconds = sum(s for _, s in self.speeds)
        return tokens / seconds if seconds else 0.0


async def _stop_typing(typing: contextlib.AbstractAsyncContextManager[Any]) -> None:
    with contextlib.suppress(Exception):  # the indicator is cosmetic: never fail a reply for it
        await typing.__aexit__(None, None, None)
