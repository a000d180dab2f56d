"""A reply that grows while the model writes: sent once, then edited at most once per interval.

Long replies continue in new messages (split at paragraph, line, then word boundaries, code
blocks kept whole); ``<think>`` sections are shown, folded into a spoiler, or hidden.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import discord

from bot.limits import Limits
from bot.splitting import DISCORD_LIMIT, split_message
from engine.thinking import THINK_SECTION, visible_text

log = logging.getLogger(__name__)

NO_MENTIONS = discord.AllowedMentions.none()
FOLD_LIMIT = 1200  # folded thinking keeps its last characters, well inside one message
_UNCHANGED: Any = object()  # a write that leaves a message's buttons as they are
# Shown under a reply while the model writes, gone with the final edit (Discord's small grey text).
WRITING_MARK = "-# ✍️ still writing…"
PHRASE_WORDS = 4  # the first message waits for a few words, a line, ...
PHRASE_CHARS = 24  # ... or this many characters (scripts written without spaces)


def is_phrase(text: str) -> bool:
    """Whether a reply's beginning is worth a message of its own (not a lone letter or word)."""
    text = text.strip()
    return "\n" in text or len(text.split()) >= PHRASE_WORDS or len(text) >= PHRASE_CHARS


def render_thinking(text: str, display: str) -> str:
    """The reply as shown: ``show`` as written, ``fold`` thinking in a spoiler, ``hide`` without."""
    if display == "show" or "<think>" not in text:
        return text
    if display == "hide":
        shown = visible_text(text).strip()
        return shown or "*(thinking...)*"

    def fold(match: re.Match[str]) -> str:
        inner = match.group(1).strip().replace("||", "| |")
        if len(inner) > FOLD_LIMIT:  # a spoiler must not be cut by the split into messages
            inner = "..." + inner[-FOLD_LIMIT:]
        label = "thoughts" if match.group(2) else "thinking..."
        return f"> {label}: ||{inner}||\n" if inner else ""

    return THINK_SECTION.sub(fold, text)


CHANNEL_WRITES = 5  # Discord lets a channel take about 5 message sends and edits ...
CHANNEL_WINDOW = 5.0  # ... in any 5 seconds


class ChannelPacer:
    """The pace of one channel's message writes, shared by every reply written there.

    Writes (sends and edits) are at least ``interval`` apart and at most
    :data:`CHANNEL_WRITES` in any :data:`CHANNEL_WINDOW` seconds, across replies, final edits
    included, and each draws from the bot's REST ``budget`` when there is one: a streamed update
    that does not fit is skipped (a later one shows the text), a final one waits for its turn.
    """

    def __init__(
        self,
        interval: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        budget: Limits | None = None,
    ) -> None:
        self.interval = interval
        self.clock = clock
        self.sleep = sleep
        self.budget = budget
        self.writes: collections.deque[float] = collections.deque(maxlen=CHANNEL_WRITES)
        # held from the channel's check to the write's record, so that a write waiting for the
        # budget keeps its place in the channel
        self._writing = asyncio.Lock()

    def wait_time(self, now: float) -> float:
        """Seconds until the next write may go out (0: now)."""
        if not self.writes:
            return 0.0
        waits = [self.writes[-1] + self.interval - now]
        if len(self.writes) == CHANNEL_WRITES:
            # strictly more than the window after the oldest of the last five
            waits.append(self.writes[0] + CHANNEL_WINDOW + 1e-3 - now)
        return max(0.0, *waits)

    async def try_take(self) -> bool:
        """Take a write now if the pace and the budget allow a streamed update."""
        if self._writing.locked() or self.wait_time(self.clock()) > 0:
            return False
        async with self._writing:
            if self.budget is not None and not await self.budget.try_take():
                return False
            self.writes.append(self.clock())
            return True

    async def take(self) -> None:
        """Wait until the pace and then the budget allow a write, then take it."""
        async with self._writing:
            while (delay := self.wait_time(self.clock())) > 0:
                await self.sleep(delay)
            if self.budget is not None:
                await self.budget.take()
            self.writes.append(self.clock())

    def idle(self, now: float) -> bool:
        """True when the channel has written nothing for a whole window (the pacer can go)."""
        return not self.writes or now - self.writes[-1] > CHANNEL_WINDOW


class ReplyStream:
    """The Discord messages of one streamed reply."""

    def __init__(
        self,
        reply_to: discord.Message,
        *,
        thinking: str = "fold",
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        limit: int = DISCORD_LIMIT,
        on_give_up: Callable[[], None] | None = None,
        pacer: ChannelPacer | None = None,
        live_view: discord.ui.View | None = None,
    ) -> None:
        self.reply_to = reply_to
        self.live_view = live_view  # buttons while writing (Stop), on the first message
        self.pacer = pacer or ChannelPacer(interval, clock=clock)
        self.on_give_up = on_give_up  # called when Discord refuses the reply for good
        self.thinking = thinking
        self.interval = interval
        self.clock = clock
        self.limit = limit
        self.text = ""
        self.messages: list[discord.Message] = []
        self.shown: list[str] = []
        self.last_sync = float("-inf")
        self.failed = False  # Discord refused a send: stop trying, never retry in a loop

    async def push(self, delta: str) -> None:
        """Add model text; the messages are updated when the channel's pace allows it."""
        self.text += delta
        if self.clock() - self.last_sync >= self.interval:
            await self.sync()

    async def finish(self, footer: str = "", view: discord.ui.View | None = None) -> None:
        """Show the final text (and a footer line such as a notice), waiting for the channel's
        pace if need be. The buttons while writing go; ``view`` (the buttons of a finished
        reply) goes on the last message, in the same edit as its final text."""
        await self.sync(footer, final=True, view=view)

    async def sync(
        self, footer: str = "", *, final: bool = False, view: discord.ui.View | None = None
    ) -> None:
        """Bring the Discord messages in line with the text so far (a streamed update that the
        channel's pace does not allow now is left for later; a final one waits, and sets the
        buttons: ``view`` on the last message, none on the others)."""
        if self.failed:
            return
        shown = render_thinking(self.text, self.thinking).strip()
        if not final and not (self.messages or is_phrase(shown)):
            return  # the typing indicator goes on until there is a phrase to show
        if footer:
            shown = f"{shown}\n\n{footer}" if shown else footer
        if not shown:
            return
        if not final:
            shown = f"{shown}\n{WRITING_MARK}"
        pieces = split_message(shown, self.limit)
        try:
            for index, piece in enumerate(pieces):
                # a final edit also changes the buttons: Stop goes, the finished reply's come
                buttons = self._final_buttons(index, len(pieces), view) if final else _UNCHANGED
                if index < len(self.messages) and self.shown[index] == piece and buttons is _UNCHANGED:
                    continue
                if final:
                    await self.pacer.take()
                elif not await self.pacer.try_take():
                    return
                self.last_sync = self.clock()
                extra: dict[str, Any] = {} if buttons is _UNCHANGED else {"view": buttons}
                if index < len(self.messages):
                    await self.messages[index].edit(content=piece, allowed_mentions=NO_MENTIONS, **extra)
                    self.shown[index] = piece
                    continue
                if index == 0:
                    if not final and self.live_view is not None:
                        extra = {"view": self.live_view}
                    sent = await self.reply_to.reply(
                        piece, mention_author=False, allowed_mentions=NO_MENTIONS, **extra
                    )
                else:
                    sent = await self.reply_to.channel.send(piece, allowed_mentions=NO_MENTIONS, **extra)
                self.messages.append(sent)
                self.shown.append(piece)
        except discord.HTTPException as exc:
            self._failed_write(exc)

    def _final_buttons(self, index: int, count: int, view: discord.ui.View | None) -> Any:
        """The buttons a final write gives message ``index`` of ``count``: the finished reply's on
        the last one; none on a first message that showed Stop; else left as they are."""
        if index == count - 1 and view is not None:
            return view
        if index == 0 and self.live_view is not None:
            return None
        return _UNCHANGED

    def _failed_write(self, exc: discord.HTTPException) -> None:
        log.warning("reply in channel %s could not be sent: %s", self.reply_to.channel.id, exc)
        if exc.status >= 500:
            return  # Discord's trouble: the next update tries again
        # Refused (no permission, message deleted...): never retry, and stop the model.
        self.failed = True
        if self.on_give_up is not None:
            self.on_give_up()
