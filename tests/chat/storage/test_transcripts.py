"""Transcripts of every backend: written with the turn's states, read in order, deleted by age."""

from __future__ import annotations

import asyncio
import time

from chat.storage import Storage, Turn


async def test_turns_come_back_in_order_per_channel(storage: Storage) -> None:
    """Each channel's turns, oldest first; a turn can be stored without states."""
    for index in range(3):
        await storage.states.write_states("a", [], {}, Turn("chat", f"q{index}", f"r{index}", index))
    await storage.states.write_states("b", [], {}, Turn("+reset", "", "", 0))
    assert [t.user_text for t in await storage.transcripts.turns("a")] == ["q0", "q1", "q2"]
    assert await storage.transcripts.turns("b") == [Turn("+reset", "", "", 0)]
    assert await storage.transcripts.turns("never-seen") == []
    assert (await storage.admin.stats())["turns"] == 4


async def test_old_lines_are_deleted_in_batches(storage: Storage) -> None:
    """Lines written before the cut-off go (in several transactions); later ones stay."""
    for index in range(5):
        await storage.states.write_states("old", [], {}, Turn("chat", f"old {index}", "noted", 1))
    await asyncio.sleep(0.01)
    cutoff = time.time()
    await asyncio.sleep(0.01)
    await storage.states.write_states("new", [], {}, Turn("chat", "recent", "fine", 1))
    assert await storage.transcripts.delete_before(cutoff, batch=2) == 5
    assert await storage.transcripts.turns("old") == []
    assert [t.user_text for t in await storage.transcripts.turns("new")] == ["recent"]
    assert await storage.transcripts.delete_before(cutoff) == 0
