"""Each conversation's line of messages on Discord: who waits, who is answered, how to stop them.

A message joins its conversation's line when it arrives (before anything is awaited), so messages
sent together are counted against the queue limit and answered in the order they came. The chat
service keeps its own lock per channel as well (every front end gets one message at a time per
channel); this line adds what only Discord needs: arrival order before the channel's settings are
read, the queue limit, and who asked for each reply (a stop reaction is theirs or a moderator's).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field


@dataclass(eq=False)
class Generation:
    """A reply being written or waiting its turn: who asked, and how to stop it."""

    channel_key: str
    requester: int
    cancel: threading.Event = field(default_factory=threading.Event)

    def may_stop(self, user_id: int, moderator: bool) -> bool:
        """The one rule for who may stop a reply, whatever the way (``/rwkv stop``, the Stop
        button, the stop reaction): the member who asked for it, or a moderator."""
        return moderator or user_id == self.requester


@dataclass
class _Line:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # asyncio serves its waiters in order
    waiting: list[Generation] = field(default_factory=list)  # arrival order, the running one first
    running: Generation | None = None


class ChannelLines:
    """The lines of every conversation with a message in hand (an empty line is dropped)."""

    def __init__(self) -> None:
        self._lines: dict[str, _Line] = {}

    def __len__(self) -> int:
        """Conversations with a message accepted and not yet answered."""
        return len(self._lines)

    def length(self, key: str) -> int:
        """Messages of a conversation accepted and not yet answered (the running one included)."""
        line = self._lines.get(key)
        return 0 if line is None else len(line.waiting)

    def join(self, key: str, requester: int) -> Generation:
        """A message takes its place at the end of its conversation's line."""
        generation = Generation(key, requester)
        self._lines.setdefault(key, _Line()).waiting.append(generation)
        return generation

    def leave(self, generation: Generation) -> None:
        """A message leaves its line, answered or not."""
        line = self._lines.get(generation.channel_key)
        if line is None:
            return
        if generation in line.waiting:
            line.waiting.remove(generation)
        if not line.waiting:
            del self._lines[generation.channel_key]

    @asynccontextmanager
    async def turn(self, generation: Generation) -> AsyncIterator[None]:
        """Wait for the messages ahead in the line; the line is this message's meanwhile."""
        line = self._lines[generation.channel_key]
        async with line.lock:
            yield

    @contextmanager
    def writing(self, generation: Generation) -> Iterator[None]:
        """Mark the message as the one being answered (``/rwkv stop`` stops this one)."""
        line = self._lines[generation.channel_key]
        line.running = generation
        try:
            yield
        finally:
            if line.running is generation:
                line.running = None

    def running(self) -> dict[str, Generation]:
        """The reply being written in each conversation."""
        return {key: line.running for key, line in self._lines.items() if line.running is not None}

    def waiting(self) -> int:
        """Messages accepted and not yet started."""
        return sum(len(line.waiting) - (line.running is not None) for line in self._lines.values())

    def running_in(self, key: str) -> Generation | None:
        """The reply being written in a conversation, if any."""
        line = self._lines.get(key)
        return None if line is None else line.running

    def stop(self, key: str, *, waiting_too: bool = False) -> bool:
        """Stop the reply being written in a conversation (and, if asked, the waiting ones)."""
        line = self._lines.get(key)
        if line is None:
            return False
        stopped = False
        for generation in line.waiting:
            if generation.cancel.is_set():
                continue
            if waiting_too or line.running is generation:
                generation.cancel.set()
                stopped = True
        return stopped

    def stop_all(self) -> None:
        """Stop every reply, written or waiting (at shutdown)."""
        for line in self._lines.values():
            for generation in line.waiting:
                generation.cancel.set()
