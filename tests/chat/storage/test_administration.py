"""Administration of every backend: counts, purging a channel, housekeeping's queries."""

from __future__ import annotations

import asyncio
import time

from chat.storage import NewRef, Storage, Turn
from tests.chat.storage.helpers import logged, snapshot


async def test_purge_deletes_everything_of_a_channel(storage: Storage) -> None:
    """A deleted channel leaves nothing behind; other channels are untouched."""
    for channel in ("gone", "kept"):
        await storage.states.write_states(
            channel,
            [logged([1]), logged([2], NewRef(0), checkpoint=snapshot(1.0))],
            {"chat_pre": NewRef(0), "chat": NewRef(1)},
            Turn("chat", "a", "b", 1),
        )
    await storage.channels.set_enabled("gone", "g", True, "mod")
    await storage.channels.set_settings("gone", {"temperature": 0.5})
    assert await storage.admin.purge_channel("gone")
    assert await storage.states.heads("gone") == {} and await storage.transcripts.turns("gone") == []
    assert "gone" not in await storage.channels.enabled()
    assert await storage.channels.settings("gone") == {}
    numbers = await storage.admin.stats()
    assert numbers["channels"] == 1 and numbers["states"] == 2 and numbers["checkpoints"] == 1
    assert numbers["turns"] == 1 and numbers["heads"] == 2
    assert not await storage.admin.purge_channel("never-seen")


async def test_idle_channels_are_those_with_more_than_their_chat_state(storage: Storage) -> None:
    """Channels unused since the cut-off that keep more than ``chat``, oldest first."""
    await storage.states.write_states("only-chat", [logged([1])], {"chat": NewRef(0)})
    await storage.states.write_states("older", [logged([1])], {"chat": NewRef(0), "gen_1": NewRef(0)})
    await asyncio.sleep(0.01)
    await storage.states.write_states("old", [logged([1])], {"chat": NewRef(0), "chat_pre": NewRef(0)})
    await asyncio.sleep(0.01)
    cutoff = time.time()
    await asyncio.sleep(0.01)
    await storage.states.write_states("busy", [logged([1])], {"chat": NewRef(0), "gen_0": NewRef(0)})
    assert await storage.admin.idle_channels(cutoff, 10) == ["older", "old"]
    assert await storage.admin.idle_channels(cutoff, 1) == ["older"]


async def test_checkpoint_usage_by_channel_least_recent_first(storage: Storage) -> None:
    """Checkpoint bytes in all (opening states not counted) and per channel, by last use."""
    assert await storage.admin.checkpoint_usage() == 0
    await storage.states.save_opening("preset:1", snapshot(1.0))
    await storage.states.write_states("a", [logged([1], checkpoint=snapshot(1.0))], {"chat": NewRef(0)})
    await asyncio.sleep(0.01)
    await storage.states.write_states(
        "b",
        [logged([1], checkpoint=snapshot(1.0)), logged([2], checkpoint=snapshot(2.0))],
        {"chat": NewRef(0), "gen_1": NewRef(1)},
    )
    await storage.states.write_states("c", [logged([1])], {"chat": NewRef(0)})
    usage = await storage.admin.checkpoint_usage()
    listed = await storage.admin.checkpointed_channels(10)
    assert [c for c, _, _ in listed] == ["a", "b"]
    assert listed[1][1] == 2 * listed[0][1] and usage == 3 * listed[0][1] > 0
    assert listed[0][2] <= listed[1][2] <= time.time()
    assert await storage.admin.checkpointed_channels(1) == listed[:1]


async def test_stats_count_what_is_stored(storage: Storage) -> None:
    """The counts every backend gives, on an empty store and after a turn."""
    numbers = await storage.admin.stats()
    assert numbers["schema_version"] == await storage.admin.schema_version() > 0
    assert {k: numbers[k] for k in ("channels", "states", "turns", "heads", "log_tokens")} == dict.fromkeys(
        ("channels", "states", "turns", "heads", "log_tokens"), 0
    )
    await storage.states.write_states(
        "a", [logged([1, 2, 3])], {"chat": NewRef(0)}, Turn("chat", "a", "b", 1)
    )
    await storage.admin.flush()
    numbers = await storage.admin.stats()
    assert numbers["log_tokens"] == 3 and numbers["heads"] == 1 and numbers["rebuild_pending"] == 0
