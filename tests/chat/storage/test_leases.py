"""Leases and fencing of every backend: a take bumps the channel's epoch, and a write under an
epoch that is no longer the channel's stores nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from chat.storage import Backend, FencedError, NewRef, Storage, Turn
from tests.chat.storage.helpers import logged, snapshot


async def test_take_bumps_the_epoch(storage: Storage) -> None:
    """Each take makes its owner the holder under the next epoch; channels count on their own."""
    leases = storage.leases
    assert await leases.holder("ch") is None
    assert await leases.take("ch", "replica-a") == 1
    assert await leases.take("ch", "replica-b") == 2
    assert await leases.take("ch", "replica-b") == 3
    assert await leases.holder("ch") == ("replica-b", 3)
    assert await leases.take("other", "replica-a") == 1
    assert await leases.holder("other") == ("replica-a", 1)


async def test_a_stale_epoch_stores_nothing(storage: Storage) -> None:
    """After another replica took the channel, the old holder's turn is refused whole (heads,
    states, checkpoints and transcript as they were), and so are its drop and purge."""
    log = storage.states
    old = await storage.leases.take("ch", "replica-a")
    (first,) = await log.write_states(
        "ch",
        [logged([1], checkpoint=snapshot(1.0))],
        {"chat": NewRef(0)},
        Turn("chat", "a", "b", 1),
        epoch=old,
    )
    new = await storage.leases.take("ch", "replica-b")
    before = await storage.admin.stats()
    with pytest.raises(FencedError, match=rf"channel ch .*epoch {new}.*epoch {old}") as caught:
        await log.write_states(
            "ch",
            [logged([2], first), logged([3], checkpoint=snapshot(2.0))],
            {"chat": NewRef(0), "gen_1": NewRef(1)},
            Turn("chat", "stale", "reply", 1),
            epoch=old,
        )
    assert (caught.value.epoch, caught.value.current) == (old, new)
    assert await log.heads("ch") == {"chat": first}
    assert await storage.transcripts.turns("ch") == [Turn("chat", "a", "b", 1)]
    after = await storage.admin.stats()
    assert {k: after[k] for k in ("states", "checkpoints", "heads", "turns", "log_tokens")} == {
        k: before[k] for k in ("states", "checkpoints", "heads", "turns", "log_tokens")
    }
    with pytest.raises(FencedError):
        await log.drop_states("ch", unused_since=float("inf"), rebuild=True, epoch=old)
    with pytest.raises(FencedError):
        await storage.admin.purge_channel("ch", epoch=old)
    assert await log.heads("ch") == {"chat": first} and not await log.rebuild_pending("ch")
    assert (await log.load_checkpoint(first, "fp")).tensors[0][0].item() == 1.0


async def test_the_current_epoch_writes(storage: Storage) -> None:
    """The holder's writes, drops and purge under its own epoch are stored; without an epoch
    nothing is checked, as before leases."""
    log = storage.states
    await storage.leases.take("ch", "replica-a")
    epoch = await storage.leases.take("ch", "replica-b")
    ids = await log.write_states(
        "ch", [logged([1]), logged([2], NewRef(0))], {"chat": NewRef(1), "gen_1": NewRef(0)}, epoch=epoch
    )
    assert await log.heads("ch") == {"chat": ids[1], "gen_1": ids[0]}
    assert await log.drop_states("ch", keep=("chat",), unused_since=float("inf"), epoch=epoch)
    assert set(await log.heads("ch")) == {"chat"}
    (unfenced,) = await log.write_states("ch", [logged([3])], {"chat": NewRef(0)}, Turn("chat", "x", "y", 1))
    assert await log.heads("ch") == {"chat": unfenced}
    assert await storage.admin.purge_channel("ch", epoch=epoch)
    assert await log.heads("ch") == {} and await storage.transcripts.turns("ch") == []
    assert await storage.leases.holder("ch") == ("replica-b", epoch)  # the purge kept the lease


async def test_an_epoch_for_a_channel_never_taken_is_refused(storage: Storage) -> None:
    """A write under an epoch for a channel without a lease is refused and stores nothing."""
    with pytest.raises(FencedError, match="never taken"):
        await storage.states.write_states("ch", [logged([1])], {"chat": NewRef(0)}, epoch=1)
    assert await storage.states.heads("ch") == {} and (await storage.admin.stats())["states"] == 0


async def test_concurrent_takers_get_distinct_epochs(backend: tuple[Backend, Path]) -> None:
    """Replicas taking a channel at once (two opened stores, several takes each) each get an
    epoch of their own, and the lease ends at the highest."""
    kind, location = backend
    first = await kind.open(location)
    second = await kind.open(location)
    try:
        takes = [store.leases.take("ch", f"replica-{n}") for n, store in enumerate([first, second] * 6)]
        epochs = await asyncio.gather(*takes)
        assert sorted(epochs) == list(range(1, 13))
        holder = await first.leases.holder("ch")
        assert holder is not None and holder[1] == 12
        assert holder[0] == f"replica-{epochs.index(12)}"
    finally:
        await first.close()
        await second.close()
