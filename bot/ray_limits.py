"""The limits of one bot token kept in a Ray actor, shared by the Discord processes of a cluster.

The actor is named after the token (:func:`bot.limits.token_key`) and detached, so the first
process creates it, the others find it, and it outlives any one of them. It needs no CPU of its
own. Each call is a few milliseconds; the actor answers with a time to wait, which the process
sleeps on its own clock (the machines' clocks need not agree). While the actor cannot be reached,
a process falls back to limits of its own and says so once in its log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray
from ray.exceptions import RayError

from bot.limits import IDENTIFY_EVERY, IdentifySchedule, LocalLimits, RestWindow

log = logging.getLogger(__name__)

NAMESPACE = "rwkv-discord"
ANSWER_WITHIN = 2.0  # seconds the shared limits may take to answer before this process uses its own


class SharedLimits:
    """The actor's side: the identify schedule and the REST budget, on the actor's clock."""

    def __init__(self, rate: int, identify_every: float) -> None:
        self.budget = RestWindow(rate)
        self.schedule = IdentifySchedule(identify_every)

    def configure(self, rate: int, identify_every: float) -> int:
        """Take the settings of the newest process (they should agree); returns the old rate."""
        old = self.budget.rate
        if rate != old:
            self.budget = RestWindow(rate)
        self.schedule.every = identify_every
        return old

    def identify_wait(self, bucket: int) -> float:
        """Seconds until the bucket's next IDENTIFY slot, which is taken."""
        return self.schedule.reserve(bucket, time.monotonic())

    def reserve(self) -> float:
        """Seconds until the next moment a write may go out, which is taken."""
        return self.budget.reserve(time.monotonic())

    def try_take(self) -> bool:
        """A streamed edit now, if the budget has room for it."""
        return self.budget.try_take(time.monotonic())


class RayLimits:
    """:class:`~bot.limits.Limits` over the shared actor."""

    def __init__(self, actor: Any, fallback: LocalLimits) -> None:
        self.actor = actor
        self.fallback = fallback
        self.unreachable = False

    @classmethod
    def connect(
        cls, address: str, key: str, rate: int, *, identify_every: float = IDENTIFY_EVERY
    ) -> RayLimits:
        """Join the Ray cluster at ``address`` (unless this process has already) and find or
        create the actor of the token ``key``. Blocks for a moment: call it before serving."""
        if not ray.is_initialized():
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        remote: Any = ray.remote(num_cpus=0, max_restarts=-1)(SharedLimits)
        actor: Any = remote.options(
            name=f"discord-limits-{key}", namespace=NAMESPACE, lifetime="detached", get_if_exists=True
        ).remote(rate, identify_every)
        old = int(ray.get(actor.configure.remote(rate, identify_every)))
        if old != rate:
            log.warning("the shared REST budget was %d requests a second; now %d", old, rate)
        return cls(actor, LocalLimits(rate, identify_every=identify_every))

    @staticmethod
    async def _ask(reference: Any) -> Any:
        """An answer of the actor, or TimeoutError after :data:`ANSWER_WITHIN` seconds (an actor
        whose node cannot be reached hangs rather than fails: the writes must not wait on it)."""
        return await asyncio.wait_for(reference, ANSWER_WITHIN)

    def _lost(self, exc: BaseException) -> None:
        if not self.unreachable:
            self.unreachable = True
            why = (str(exc).splitlines() or [type(exc).__name__])[0]
            log.warning("the shared Discord limits cannot be reached (%s); using this process's own", why)

    def _found(self) -> None:
        if self.unreachable:
            self.unreachable = False
            log.info("the shared Discord limits answer again")

    async def identify(self, shard_id: int, max_concurrency: int) -> None:
        """Wait for this shard's identify slot, across the cluster."""
        try:
            wait = float(await self._ask(self.actor.identify_wait.remote(shard_id % max(1, max_concurrency))))
        except (RayError, TimeoutError) as exc:
            self._lost(exc)
            await self.fallback.identify(shard_id, max_concurrency)
            return
        self._found()
        if wait > 0:
            await asyncio.sleep(wait)

    async def take(self) -> None:
        """Wait for the next moment the shared budget allows."""
        try:
            wait = float(await self._ask(self.actor.reserve.remote()))
        except (RayError, TimeoutError) as exc:
            self._lost(exc)
            await self.fallback.take()
            return
        self._found()
        if wait > 0:
            await asyncio.sleep(wait)

    async def try_take(self) -> bool:
        """A streamed edit, now or never, from the shared budget."""
        try:
            taken = bool(await self._ask(self.actor.try_take.remote()))
        except (RayError, TimeoutError) as exc:
            self._lost(exc)
            return await self.fallback.try_take()
        self._found()
        return taken
