"""What only the Postgres backend has: its location, its errors in one line, whole states in the
object store written before their rows and collected when no row names them, migrations under a
lock, and the ``db`` commands."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest

from chat.housekeeping import OBJECT_GRACE_S, keep_house
from chat.outcome import OutcomeKind
from chat.presets import load_presets
from chat.session import ChatConfig, ChatService
from chat.storage import FencedError, NewRef, StoreError, Turn, backend_for
from chat.storage._pg_db import Server, migrations
from chat.storage.postgres import BACKEND, PgBackend, PgStorage
from engine.errors import StateMismatchError
from engine.inprocess import ReferenceEngine
from tests.chat.storage.helpers import logged, snapshot
from tests.chat.storage.servers import Servers

pytest.importorskip("asyncpg")


def test_locations_name_the_database_and_the_object_store() -> None:
    """The ``objects`` parameter is taken off before connecting; ``postgres://`` is served too;
    a location without an object store is refused with what to add."""
    server = Server.parse("postgresql://bot@db.internal:6543/rwkv?objects=s3://states/prod&sslmode=disable")
    assert server.dsn == "postgresql://bot@db.internal:6543/rwkv?sslmode=disable"
    assert (server.host, server.port, server.database, server.user) == ("db.internal", 6543, "rwkv", "bot")
    assert server.objects == "s3://states/prod"
    assert isinstance(backend_for("postgres://bot@db/rwkv?objects=s3://b/p"), PgBackend)
    with pytest.raises(StoreError, match=r"\?objects=s3://bucket/prefix"):
        Server.parse("postgresql://bot@db/rwkv")


async def test_a_wrong_port_is_one_line_naming_host_and_port() -> None:
    """Nothing listening at the port: one line that names the host and port, nothing else."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    with pytest.raises(StoreError) as caught:
        await BACKEND.open(f"postgresql://bot@127.0.0.1:{port}/rwkv?objects=s3://bucket/p")
    message = str(caught.value)
    assert f"cannot connect to Postgres at 127.0.0.1:{port}" in message and "\n" not in message
    assert caught.value.problem == "unreachable"  # may pass: exit 1, restarted


@pytest.fixture
def location(servers: Servers, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh Postgres database and bucket prefix, the AWS variables pointing at the store."""
    for name, value in servers.environment.items():
        monkeypatch.setenv(name, value)
    return servers.fresh_location()


@pytest.fixture
async def store(location: str) -> AsyncIterator[PgStorage]:
    """An open Postgres store."""
    opened = await BACKEND.open(location)
    assert isinstance(opened, PgStorage)
    try:
        yield opened
    finally:
        await opened.close()


async def _objects(store: PgStorage) -> list[str]:
    return sorted(o.key for page in await store.database.objects.listing("checkpoints/") for o in page)


async def _named(store: PgStorage) -> list[str]:
    return sorted(str(r[0]) for r in await store.database.fetch("SELECT object_key FROM checkpoints"))


@pytest.mark.cluster
async def test_missing_database_and_unknown_user_are_said(servers: Servers, location: str) -> None:
    """A database that does not exist, and a user the server refuses, each in one line."""
    missing = location.replace("/t", "/nosuch_t", 1)
    with pytest.raises(StoreError, match=r"the database nosuch_t\S* does not exist .*createdb") as caught:
        await BACKEND.open(missing)
    assert caught.value.problem == "cannot-open"
    with pytest.raises(StoreError, match=r"refused the user intruder") as caught:
        await BACKEND.open(location.replace("postgres@", "intruder@"))
    assert "\n" not in str(caught.value)


@pytest.mark.cluster
async def test_a_checkpoint_object_is_written_before_its_row(store: PgStorage) -> None:
    """When the object is put, no row names it yet; once the turn is stored, its row does."""
    puts: list[tuple[str, int]] = []
    put = store.database.objects.put

    async def watched(key: str, data: bytes) -> None:
        await put(key, data)
        rows = await store.database.fetchval("SELECT count(*) FROM checkpoints WHERE object_key = $1", key)
        puts.append((key, int(rows)))

    store.database.objects.put = watched  # type: ignore[method-assign]
    (whole,) = await store.states.write_states(
        "ch", [logged([1], checkpoint=snapshot(1.0))], {"chat": NewRef(0)}, Turn("chat", "a", "b", 1)
    )
    assert len(puts) == 1 and puts[0][1] == 0
    assert puts[0][0].startswith("checkpoints/ch/") and await _named(store) == [puts[0][0]]
    assert await _objects(store) == [puts[0][0]]
    assert (await store.states.load_checkpoint(whole, "fp")).tensors[0][0].item() == 1.0


@pytest.mark.cluster
async def test_an_object_whose_row_never_committed_is_collected(store: PgStorage) -> None:
    """The connection dies between the put and the commit: the turn is not stored, its object
    stays until a collection finds it unnamed and past the grace period; named objects stay."""
    (kept,) = await store.states.write_states(
        "ch", [logged([1], checkpoint=snapshot(1.0))], {"chat": NewRef(0)}
    )
    await store.database.fetchval(
        "CREATE FUNCTION die() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NEW; END $$"
    )
    await store.database.fetchval(
        "CREATE TRIGGER die AFTER INSERT ON checkpoints FOR EACH ROW EXECUTE FUNCTION die()"
    )
    with pytest.raises(StoreError):
        await store.states.write_states(
            "ch", [logged([2], checkpoint=snapshot(2.0))], {"chat": NewRef(0)}, Turn("chat", "c", "d", 1)
        )
    await store.database.fetchval("DROP TRIGGER die ON checkpoints")
    assert await store.states.heads("ch") == {"chat": kept} and await store.transcripts.turns("ch") == []
    named = await _named(store)
    assert len(named) == 1 and len(await _objects(store)) == 2  # the unnamed object is still there
    assert await store.admin.collect_objects(time.time() - 3600) == 0  # within its grace period
    assert await store.admin.collect_objects(time.time() + 1) == 1
    assert await _objects(store) == named
    assert (await store.states.load_checkpoint(kept, "fp")).tensors[0][0].item() == 1.0


@pytest.mark.cluster
async def test_objects_go_with_their_rows(store: PgStorage) -> None:
    """A refused turn, a replaced checkpoint and a purge leave no object behind; a replaced
    opening state's object goes too."""
    epoch = await store.leases.take("ch", "a")
    await store.states.write_states("ch", [logged([1], checkpoint=snapshot(1.0))], {"chat": NewRef(0)})
    first = await _objects(store)
    await store.leases.take("ch", "b")
    with pytest.raises(FencedError):
        await store.states.write_states(
            "ch", [logged([2], checkpoint=snapshot(2.0))], {"chat": NewRef(0)}, epoch=epoch
        )
    assert await _objects(store) == first
    await store.states.write_states("ch", [logged([3], checkpoint=snapshot(3.0))], {"chat": NewRef(0)})
    second = await _objects(store)
    assert len(second) == 1 and second != first and second == await _named(store)
    await store.states.save_opening("preset:1", snapshot(1.0))
    await store.states.save_opening("preset:1", snapshot(2.0))
    openings = [o for page in await store.database.objects.listing("openings/") for o in page]
    assert len(openings) == 1
    assert await store.admin.purge_channel("ch")
    assert await _objects(store) == []


@pytest.mark.cluster
async def test_a_lost_object_is_a_mismatch_and_the_check_names_it(store: PgStorage, location: str) -> None:
    """A checkpoint whose object is gone is refused as damaged, and ``db check`` lists it."""
    (whole,) = await store.states.write_states(
        "ch", [logged([1], checkpoint=snapshot(1.0))], {"chat": NewRef(0)}
    )
    assert await asyncio.to_thread(BACKEND.integrity_check, location) == []
    await store.database.objects.delete(await _objects(store))
    with pytest.raises(StateMismatchError, match="missing from the object store"):
        await store.states.load_checkpoint(whole, "fp")
    problems = await asyncio.to_thread(BACKEND.integrity_check, location)
    assert len(problems) == 1 and f"stored state {whole} is missing from the object store" in problems[0]


@pytest.mark.cluster
async def test_two_processes_migrating_at_once(location: str) -> None:
    """Stores opened at once on a new database migrate it once, under the advisory lock."""
    stores = await asyncio.gather(*(BACKEND.open(location) for _ in range(3)))
    try:
        versions = [await s.admin.schema_version() for s in stores]
        assert versions == [len(migrations())] * 3
        first = stores[0]
        assert isinstance(first, PgStorage)
        assert await first.database.fetchval("SELECT count(*) FROM schema_version") == len(migrations())
    finally:
        for s in stores:
            await s.close()


@pytest.mark.cluster
async def test_backup_says_pg_dump_and_vacuum_compacts(store: PgStorage, location: str) -> None:
    """``db backup`` is refused with the command that backs Postgres up; ``db vacuum`` runs."""
    from pathlib import Path

    with pytest.raises(StoreError, match=r"pg_dump -Fc .*aws s3 sync s3://"):
        BACKEND.backup(location, Path("backup.dump"))
    await store.states.write_states("ch", [logged(list(range(5000)))], {"chat": NewRef(0)})
    await store.admin.purge_channel("ch")
    before, after = await asyncio.to_thread(BACKEND.vacuum, location)
    assert 0 < after <= before


@pytest.mark.cluster
async def test_housekeeping_collects_orphaned_objects(store: PgStorage, engine7: ReferenceEngine) -> None:
    """The bot's hourly housekeeping runs the collection: a chat service over this store answers
    a message (its checkpoint named by a row), an object no row names is left by a write that
    never committed; housekeeping leaves it within the grace period and deletes it after, and
    the conversation's own objects stay."""
    service = ChatService(
        engine7, store, load_presets(), ChatConfig(default_preset="g1-chat", chat_max_tokens=8)
    )
    await service.prepare()
    await service.respond("ch", "-top_p=0 hello")
    named = await _named(store)
    orphan = "checkpoints/ch/never-committed"
    await store.database.objects.put(orphan, b"x" * 10)
    assert orphan in await _objects(store)
    assert (await keep_house(service))["objects"] == 0  # written just now: within its grace period
    later = time.time() + OBJECT_GRACE_S + 1
    assert (await keep_house(service, now=later))["objects"] == 1
    assert await _objects(store) == named and await _named(store) == named
    assert (await service.respond("ch", "-top_p=0 again")).kind is OutcomeKind.REPLY
