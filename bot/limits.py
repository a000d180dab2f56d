"""What every Discord process of one bot token shares: the gateway's identify slots and the REST
budget.

Discord lets a token IDENTIFY once per 5 seconds in each of ``max_concurrency`` buckets (shard id
modulo ``max_concurrency``), and make about 50 REST requests a second, counted over all its
processes. :class:`LocalLimits` keeps both in this process (one process: the default);
:class:`bot.ray_limits.RayLimits` keeps them in a Ray actor that every process of the Discord
tier shares (``RWKV_DISCORD_CLUSTER``). Both hand out times to wait, never a lock held across a
request, so a process that dies holds nothing.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

IDENTIFY_EVERY = 5.0  # seconds between two IDENTIFYs of one bucket
REST_WINDOW = 1.0  # the budget counts the writes of any such span of seconds
STREAMED_SHARE = 0.8  # streamed edits use at most this share of the budget; the rest is for
# final texts and new messages, which are never dropped


class RestWindow:
    """At most ``rate`` writes in any :data:`REST_WINDOW` seconds, the caller giving the time.

    A write that must go out (a final text, a new message) reserves the next free moment and is
    told how long to wait; writes keep their order. A streamed edit goes only at once and only
    while the budget has room beyond what it leaves to the others (none while any write waits).
    """

    def __init__(
        self, rate: int, *, window: float = REST_WINDOW, streamed_share: float = STREAMED_SHARE
    ) -> None:
        if rate < 1:
            raise ValueError(f"the REST budget must allow at least 1 request a second, not {rate}")
        self.rate = rate
        self.window = window
        self.streamed = max(0, min(rate - 1, int(rate * streamed_share)))
        self.times: collections.deque[float] = collections.deque()  # writes in the last window, and ahead

    def _forget(self, now: float) -> None:
        while self.times and self.times[0] <= now - self.window:
            self.times.popleft()

    def reserve(self, now: float) -> float:
        """Take the next moment a write may go out; seconds from ``now`` until then."""
        self._forget(now)
        at = now
        if self.times:
            at = max(at, self.times[-1])
        if len(self.times) >= self.rate:
            at = max(at, self.times[-self.rate] + self.window + 1e-3)
        self.times.append(at)
        return at - now

    def try_take(self, now: float) -> bool:
        """Take a write now if the budget has room for a streamed edit."""
        self._forget(now)
        if self.times and self.times[-1] > now:
            return False  # writes are waiting for their moment: they go first
        if len(self.times) >= self.streamed:
            return False
        self.times.append(now)
        return True


class IdentifySchedule:
    """One IDENTIFY per ``every`` seconds in each bucket, the caller giving the time."""

    def __init__(self, every: float = IDENTIFY_EVERY) -> None:
        self.every = every
        self.next_free: dict[int, float] = {}

    def reserve(self, bucket: int, now: float) -> float:
        """Take the bucket's next slot; seconds from ``now`` until it."""
        at = max(now, self.next_free.get(bucket, now))
        self.next_free[bucket] = at + self.every
        return at - now


class Limits(Protocol):
    """The identify slots and the REST budget, as the bot uses them."""

    async def identify(self, shard_id: int, max_concurrency: int) -> None:
        """Wait for this shard's turn to IDENTIFY (its bucket is ``shard_id % max_concurrency``)."""
        ...

    async def take(self) -> None:
        """Wait for a REST write that must go out (a final text, a new message)."""
        ...

    async def try_take(self) -> bool:
        """A REST write now if the budget has room for a streamed edit; False: skip it."""
        ...


class LocalLimits:
    """The limits of one process (the default: this process is the whole bot)."""

    def __init__(
        self,
        rate: int = 45,
        *,
        identify_every: float = IDENTIFY_EVERY,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.budget = RestWindow(rate)
        self.schedule = IdentifySchedule(identify_every)
        self.clock = clock
        self.sleep = sleep

    async def identify(self, shard_id: int, max_concurrency: int) -> None:
        """Wait for this shard's identify slot."""
        wait = self.schedule.reserve(shard_id % max(1, max_concurrency), self.clock())
        if wait > 0:
            await self.sleep(wait)

    async def take(self) -> None:
        """Wait for the next moment the budget allows."""
        wait = self.budget.reserve(self.clock())
        if wait > 0:
            await self.sleep(wait)

    async def try_take(self) -> bool:
        """A streamed edit, now or never."""
        return self.budget.try_take(self.clock())


def token_key(token: str) -> str:
    """A name for one bot token's limits that does not reveal the token."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]
