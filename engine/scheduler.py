"""The continuous-batching scheduler: it decides, and touches no tensor.

Each step of the batched engine asks it, in this order,
1. which queued requests get a state slot (FIFO, the lowest free slot first, while slots are
   free): :meth:`Scheduler.admit`;
2. which prompt chunks to read, within a token budget per step, so that a long prompt never
   stalls the others (prompts are cut at fixed ``prefill_chunk`` boundaries, so the state after a
   read does not depend on the load), grouped by length: :meth:`Scheduler.prefill_groups`;
3. which decoding sequences get a token (at most ``max_batch``, taken round-robin when more are
   resident): :meth:`Scheduler.decode_batch`.

The lowest free slot first keeps a busy batch on the slots 0..n-1, which the runner steps in
place; :func:`by_slot` orders a batch so that consecutive slots run in place.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class Schedulable(Protocol):
    """What the scheduler reads and writes of a request."""

    slot: int  # -1: none
    prompt: list[int]
    fed: int  # prompt tokens read so far
    abandoned: bool  # the caller stopped listening


J = TypeVar("J", bound=Schedulable)


@dataclass
class PrefillGroup(Generic[J]):
    """Prompt chunks of one length, read together: ``last`` when they end their prompts."""

    last: bool
    items: list[tuple[J, list[int]]] = field(default_factory=list)


def by_slot(jobs: Iterable[J]) -> list[J]:
    """The jobs in slot order (consecutive slots run in place)."""
    return sorted(jobs, key=lambda job: job.slot)


class Scheduler(Generic[J]):
    """Slots, the requests reading their prompts and those decoding, and whose turn it is."""

    def __init__(self, slots: int, *, max_batch: int, prefill_chunk: int, prefill_budget: int) -> None:
        self.slots = slots
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget
        self.free = list(range(slots))  # a heap: the lowest free slot first
        self.prefilling: list[J] = []
        self.decoding: list[J] = []
        self._prefill_turn = 0
        self._decode_turn = 0

    @property
    def resident(self) -> int:
        """Requests holding a slot."""
        return self.slots - len(self.free)

    def busy(self) -> bool:
        """Whether any request is reading its prompt or decoding."""
        return bool(self.prefilling or self.decoding)

    def abandoned(self) -> list[J]:
        """The running requests whose callers stopped listening (to be released)."""
        return [job for jobs in (self.prefilling, self.decoding) for job in jobs if job.abandoned]

    def admit(self, queue: deque[J]) -> J | None:
        """The next queued request, given the lowest free slot; None when no slot is free or
        nobody waits. Abandoned requests leave the queue on the way."""
        while self.free and queue:
            job = queue.popleft()
            if job.abandoned:
                continue
            job.slot = heapq.heappop(self.free)
            return job
        return None

    def read_prompt(self, job: J) -> None:
        """An admitted request starts reading its prompt."""
        self.prefilling.append(job)

    def prompt_read(self, job: J) -> None:
        """A request has read its whole prompt."""
        self.prefilling.remove(job)

    def start_decoding(self, job: J) -> None:
        """A request starts generating."""
        self.decoding.append(job)

    def prefill_groups(self) -> list[PrefillGroup[J]]:
        """One chunk of as many waiting prompts as the budget allows (the first always, taken in
        turns), grouped by chunk length and whether it ends the prompt, each group by slot."""
        budget = self.prefill_budget
        count = len(self.prefilling)
        first = self._prefill_turn % count
        self._prefill_turn += 1
        groups: dict[tuple[int, bool], PrefillGroup[J]] = {}
        for offset in range(count):
            job = self.prefilling[(first + offset) % count]
            # Whole chunks only: where a prompt is cut never depends on what else is waiting, so
            # a read gives the same state whatever the load (the state log relies on it).
            take = min(self.prefill_chunk, len(job.prompt) - job.fed)
            if offset and take > budget:
                break
            budget -= take
            last = job.fed + take == len(job.prompt)
            group = groups.setdefault((take, last), PrefillGroup(last))
            group.items.append((job, job.prompt[job.fed : job.fed + take]))
        for group in groups.values():
            group.items.sort(key=lambda item: item[0].slot)  # consecutive slots run in place
        return list(groups.values())

    def decode_batch(self) -> list[J]:
        """The decoding requests that get a token this step: all, or ``max_batch`` in turns."""
        count = len(self.decoding)
        if count <= self.max_batch:
            return list(self.decoding)
        first = self._decode_turn % count
        self._decode_turn += self.max_batch
        return [self.decoding[(first + i) % count] for i in range(self.max_batch)]

    def drain(self) -> list[J]:
        """Take every running request out (the worker is stopping)."""
        running = self.prefilling + self.decoding
        self.prefilling, self.decoding = [], []
        return running

    def release(self, job: J) -> int | None:
        """Take a request out; returns the slot it gave back, if it held one."""
        for jobs in (self.prefilling, self.decoding):
            if job in jobs:
                jobs.remove(job)
        if job.slot < 0:
            return None
        slot, job.slot = job.slot, -1
        heapq.heappush(self.free, slot)
        return slot
