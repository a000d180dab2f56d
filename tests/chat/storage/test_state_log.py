"""The state log of every backend: the token log, checkpoints, heads, opening states, one
transaction per turn."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
import torch

from chat.storage import Backend, HeadName, NewRef, StateBase, Storage, StoreError, Turn
from engine.errors import StateMismatchError
from tests.chat.storage.helpers import logged, snapshot


async def test_states_round_trip_and_commit(storage: Storage) -> None:
    """Logged tokens and whole states come back bit for bit; a turn's writes land together."""
    log = storage.states
    ids = await log.write_states(
        "ch",
        [logged([1, 2, 70000]), logged([3], NewRef(0), meta={"mode": "chat"})],
        {HeadName.CHAT_PRE: NewRef(0), HeadName.CHAT: NewRef(1)},
        Turn("chat", "hi", "hello", 3),
    )
    assert await log.heads("ch") == {HeadName.CHAT_PRE: ids[0], HeadName.CHAT: ids[1]}
    chain = await log.chain(ids[1])
    assert [s.tokens for s in chain] == [[1, 2, 70000], [3]]
    assert chain[0].base == StateBase.ZERO and chain[1].parent_id == ids[0]
    assert chain[1].meta == {"mode": "chat"}
    assert (await log.state(ids[1])).tokens == [3]
    assert await storage.transcripts.turns("ch") == [Turn("chat", "hi", "hello", 3)]
    # A whole state: stored bit for bit, and the log before it is no longer needed.
    (whole,) = await log.write_states(
        "ch", [logged([4], ids[1], checkpoint=snapshot(1.0))], {"chat": NewRef(0), "chat_pre": None}
    )
    chain = await log.chain(whole)
    assert len(chain) == 1 and chain[0].base == StateBase.CHECKPOINT and chain[0].tokens == []
    snap = await log.load_checkpoint(whole, "fp")
    assert snap.last_token == 7 and snap.meta == {"mode": "chat"}
    assert torch.equal(snap.tensors[1], snapshot(1.0).tensors[1])
    assert snap.tensors[1].dtype == torch.bfloat16
    assert await log.heads("ch") == {HeadName.CHAT: whole}
    numbers = await storage.admin.stats()
    assert numbers["states"] == 1 and numbers["checkpoints"] == 1  # the log above was deleted
    with pytest.raises(StateMismatchError, match="belongs to model fp"):
        await log.load_checkpoint(whole, "other")


async def test_missing_states_are_refused(storage: Storage) -> None:
    """A state, chain or checkpoint that is not stored raises StateMismatchError."""
    with pytest.raises(StateMismatchError, match="missing"):
        await storage.states.state(12345)
    with pytest.raises(StateMismatchError):
        await storage.states.chain(12345)
    with pytest.raises(StateMismatchError, match="missing"):
        await storage.states.load_checkpoint(12345, "fp")


async def test_a_logged_state_needs_a_parent(storage: Storage) -> None:
    """A PARENT state without a parent is refused, and nothing of the call is stored."""
    bad = logged([1])
    orphan = type(bad)(StateBase.PARENT, bad.preset_key, [1], 1, "fp")
    with pytest.raises(StoreError, match="needs a parent"):
        await storage.states.write_states("ch", [orphan], {"chat": NewRef(0)}, Turn("chat", "a", "b", 1))
    assert await storage.states.heads("ch") == {}
    assert await storage.transcripts.turns("ch") == []


async def test_failed_commit_changes_nothing(storage: Storage) -> None:
    """A write that fails midway (here: a head of no known kind) is rolled back whole."""
    (first,) = await storage.states.write_states(
        "ch", [logged([1])], {"chat": NewRef(0)}, Turn("chat", "a", "b", 1)
    )
    with pytest.raises(StoreError):
        await storage.states.write_states(
            "ch",
            [logged([2], checkpoint=snapshot(5.0))],
            {"chat": NewRef(0), "not-a-head": NewRef(0)},
            Turn("chat", "c", "d", 1),
        )
    assert await storage.states.heads("ch") == {"chat": first}
    assert (await storage.admin.stats())["checkpoints"] == 0
    assert len(await storage.transcripts.turns("ch")) == 1


async def test_cancelled_writes_leave_whole_turns(storage: Storage) -> None:
    """Cancelling the task that writes stores the turn whole or not at all, and the store goes on."""
    for delay in (0, 0.0005, 0.002, 0.01):
        task = asyncio.ensure_future(
            storage.states.write_states(
                "ch", [logged([1], checkpoint=snapshot(1.0))], {"chat": NewRef(0)}, Turn("chat", "a", "b", 1)
            )
        )
        await asyncio.sleep(delay)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)  # a transaction that started finishes on its own
        heads = await storage.states.heads("ch")
        stored = len(await storage.transcripts.turns("ch"))
        assert (await storage.admin.stats())["checkpoints"] == (1 if heads else 0)
        assert stored == 0 or heads
    (last,) = await storage.states.write_states(
        "ch", [logged([2], checkpoint=snapshot(2.0))], {"chat": NewRef(0)}
    )
    assert (await storage.states.load_checkpoint(last, "fp")).tensors[0][0].item() == 2.0
    assert (await storage.admin.stats())["checkpoints"] == 1  # the replaced ones were collected


async def test_heads_share_states_and_unneeded_ones_go(storage: Storage) -> None:
    """Heads may point at one state; moving and removing heads deletes what no head needs."""
    log = storage.states
    ids = await log.write_states(
        "ch", [logged([1]), logged([2], NewRef(0))], {"chat_pre": NewRef(0), "chat": NewRef(1)}
    )
    await log.write_states("ch", [], {"undo_chat": ids[1], "undo_chat_pre": ids[0]})
    (fresh,) = await log.write_states("ch", [logged([9])], {"chat": NewRef(0), "chat_pre": None})
    assert await log.heads("ch") == {"chat": fresh, "undo_chat": ids[1], "undo_chat_pre": ids[0]}
    assert (await storage.admin.stats())["states"] == 3
    await log.write_states("ch", [], {"undo_chat": None, "undo_chat_pre": None})
    assert (await storage.admin.stats())["states"] == 1
    assert [s.tokens for s in await log.chain(fresh)] == [[9]]


async def test_drop_states_keeps_what_it_is_told_and_marks_a_rebuild(storage: Storage) -> None:
    """drop_states spares a channel used since the cut-off; otherwise keeps only ``keep``; with
    ``rebuild`` the channel waits for a re-read until its chat head is set again."""
    log = storage.states
    await log.write_states(
        "ch", [logged([1]), logged([2], NewRef(0))], {"chat": NewRef(0), "gen_1": NewRef(1)}
    )
    assert not await log.drop_states("ch", keep=("chat",), unused_since=0.0)
    assert set(await log.heads("ch")) == {"chat", "gen_1"}
    assert await log.drop_states("ch", keep=(HeadName.CHAT,), unused_since=float("inf"))
    assert set(await log.heads("ch")) == {"chat"} and not await log.rebuild_pending("ch")
    assert await log.drop_states("ch", unused_since=float("inf"), rebuild=True)
    assert await log.heads("ch") == {} and await log.rebuild_pending("ch")
    assert (await storage.admin.stats())["states"] == 0
    await log.write_states("ch", [logged([3])], {"chat": NewRef(0)})
    assert not await log.rebuild_pending("ch")
    assert not await log.drop_states("never-seen", unused_since=float("inf"))


async def test_opening_states_are_shared_by_model(storage: Storage) -> None:
    """A preset's opening state is kept per model fingerprint and replaced when saved again."""
    log = storage.states
    assert await log.load_opening("preset:1", "fp") is None
    await log.save_opening("preset:1", snapshot(1.0))
    await log.save_opening("preset:1", snapshot(3.0))
    await log.save_opening("preset:1", snapshot(2.0, fingerprint="other"))
    opening = await log.load_opening("preset:1", "fp")
    assert opening is not None and opening.tensors[0][0].item() == 3.0
    other = await log.load_opening("preset:1", "other")
    assert other is not None and other.tensors[0][0].item() == 2.0
    assert (await storage.admin.stats())["shared_snapshots"] == 2


async def test_everything_is_there_after_reopening(backend: tuple[Backend, Path]) -> None:
    """What was written is read back by a new opening of the same store."""
    kind, location = backend
    store = await kind.open(location)
    try:
        ids = await store.states.write_states(
            "ch", [logged([5], checkpoint=snapshot(4.0)), logged([6], NewRef(0))], {"chat": NewRef(1)}
        )
        await store.channels.set_settings("ch", {"temperature": 0.5})
    finally:
        await store.close()
    store = await kind.open(location)
    try:
        assert await store.states.heads("ch") == {"chat": ids[1]}
        chain = await store.states.chain(ids[1])
        assert [s.base for s in chain] == [StateBase.CHECKPOINT, StateBase.PARENT]
        assert (await store.states.load_checkpoint(ids[0], "fp")).tensors[0][0].item() == 4.0
        assert await store.channels.settings("ch") == {"temperature": 0.5}
    finally:
        await store.close()
