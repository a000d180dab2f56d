"""The scheduler's decisions: slots, prompt chunks within the budget, and turns at decoding."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.scheduler import Scheduler, by_slot


@dataclass(eq=False)
class Req:
    """Just what the scheduler reads and writes of a request."""

    prompt: list[int] = field(default_factory=lambda: [1])
    slot: int = -1
    fed: int = 0
    abandoned: bool = False


def scheduler(slots: int = 4, max_batch: int = 4, chunk: int = 8, budget: int = 16) -> Scheduler[Req]:
    """A scheduler of small limits."""
    return Scheduler(slots, max_batch=max_batch, prefill_chunk=chunk, prefill_budget=budget)


def test_admission_is_fifo_onto_the_lowest_free_slot() -> None:
    """Queued requests get the lowest free slots in order; abandoned ones are dropped; a full
    engine admits nobody."""
    s = scheduler(slots=2)
    a, gone, b, c = Req(), Req(abandoned=True), Req(), Req()
    queue = deque([a, gone, b, c])
    assert s.admit(queue) is a and a.slot == 0
    assert s.admit(queue) is b and b.slot == 1
    assert s.admit(queue) is None and list(queue) == [c] and s.resident == 2
    assert s.release(a) == 0 and a.slot == -1 and s.release(a) is None
    assert s.admit(queue) is c and c.slot == 0


def test_prefill_takes_whole_chunks_within_the_budget_grouped_by_length() -> None:
    """Chunks are cut at fixed boundaries; the first prompt always reads; the others while the
    budget lasts; a group holds chunks of one length and end, in slot order."""
    s = scheduler(slots=4, chunk=8, budget=16)
    long_, short, other, late = (
        Req(list(range(20)), slot=3),
        Req([1, 2, 3], slot=1),
        Req(list(range(8)), slot=0),
        Req([5] * 8, slot=2),
    )
    for req in (long_, short, other, late):
        s.read_prompt(req)
    groups = s.prefill_groups()
    got = [(g.last, [(r.slot, len(c)) for r, c in g.items]) for g in groups]
    assert got == [(False, [(3, 8)]), (True, [(1, 3)])]  # 8 + 3, then 8 more would pass 16
    for group in groups:
        for req, chunk in group.items:
            req.fed += len(chunk)
            if group.last:
                s.prompt_read(req)
    turn = s.prefill_groups()  # the next turn starts one prompt further: the long one waits
    assert [(g.last, [(r.slot, len(c)) for r, c in g.items]) for g in turn] == [(True, [(0, 8), (2, 8)])]


def test_decoding_takes_turns_when_more_are_resident_than_a_batch() -> None:
    """With 3 decoding and a batch of 2, the batches go round."""
    s = scheduler(slots=3, max_batch=2)
    reqs = [Req(slot=i) for i in range(3)]
    for req in reqs:
        s.start_decoding(req)
    batches = [[r.slot for r in s.decode_batch()] for _ in range(3)]
    assert batches == [[0, 1], [2, 0], [1, 2]]
    assert [r.slot for r in by_slot([reqs[2], reqs[0]])] == [0, 2]
    assert s.drain() == reqs and not s.busy()
