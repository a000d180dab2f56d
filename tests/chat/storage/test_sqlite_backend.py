"""The SQLite backend's own ground: migrations, WAL, damaged files, zeroed deletes."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from chat.storage import NewRef, StoreError, Turn
from chat.storage.sqlite import SqliteStorage, migrate, migrations
from engine.errors import StateMismatchError
from engine.state import checksum
from tests.chat.storage.helpers import logged, snapshot


async def test_migrations_run_once_and_record_the_version(tmp_path: Path) -> None:
    """A new file gets every migration; reopening applies nothing twice."""
    db = tmp_path / "a.sqlite3"
    store = await SqliteStorage.open(db)
    assert await store.admin.schema_version() == len(migrations())
    await store.close()
    store = await SqliteStorage.open(db)
    assert await store.admin.schema_version() == len(migrations())
    await store.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"channels", "states", "checkpoints", "heads", "init_snapshots", "turns"} <= tables


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A database from a newer version of the program is not touched."""
    db = tmp_path / "b.sqlite3"
    await (await SqliteStorage.open(db)).close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer than this program"):
        await SqliteStorage.open(db)


async def test_not_a_database_is_refused(tmp_path: Path) -> None:
    """A file that is not SQLite gives a clear error and is left as it was."""
    db = tmp_path / "c.sqlite3"
    db.write_bytes(b"hello, I am a text file" * 100)
    with pytest.raises(StoreError, match="not a usable rwkv-discord database"):
        await SqliteStorage.open(db)
    assert db.read_bytes() == b"hello, I am a text file" * 100


async def test_damaged_log_is_detected(tmp_path: Path) -> None:
    """A changed token, a missing link or a flipped checkpoint byte is refused, never used."""
    path = tmp_path / "h.sqlite3"
    store = await SqliteStorage.open(path)
    try:
        ids = await store.states.write_states(
            "ch", [logged([1, 2]), logged([3], NewRef(0))], {"chat_pre": NewRef(0), "chat": NewRef(1)}
        )
        (whole,) = await store.states.write_states(
            "ch", [logged([5], checkpoint=snapshot(2.0))], {"gen_1": NewRef(0)}
        )
        db = sqlite3.connect(path)
        db.execute("UPDATE states SET tokens = ? WHERE id = ?", (bytes(8), ids[0]))
        (data,) = db.execute("SELECT data FROM checkpoints WHERE state_id = ?", (whole,)).fetchone()
        db.execute("UPDATE checkpoints SET data = ? WHERE state_id = ?", (data[:-1] + b"?", whole))
        db.commit()
        with pytest.raises(StateMismatchError, match="checksum"):
            await store.states.chain(ids[1])
        with pytest.raises(StateMismatchError, match="checksum"):
            await store.states.load_checkpoint(whole, "fp")
        db.execute("DELETE FROM states WHERE id = ?", (ids[0],))
        db.commit()
        db.close()
        with pytest.raises(StateMismatchError, match="lost a link"):
            await store.states.chain(ids[1])
    finally:
        await store.close()


async def test_a_refused_head_names_the_check_that_failed(tmp_path: Path) -> None:
    """The schema refuses a head of no known kind, and the error says which check failed."""
    store = await SqliteStorage.open(tmp_path / "e.sqlite3")
    try:
        with pytest.raises(StoreError, match="CHECK constraint"):
            await store.states.write_states("ch", [logged([2])], {"not-a-head": NewRef(0)})
    finally:
        await store.close()


async def test_cancelled_write_still_ends_its_transaction(tmp_path: Path) -> None:
    """Cancelling the task that writes never leaves the connection inside a transaction."""
    store = await SqliteStorage.open(tmp_path / "f.sqlite3")
    try:
        for delay in (0, 0.0005, 0.002, 0.01):
            task = asyncio.ensure_future(
                store.states.write_states(
                    "ch",
                    [logged([1], checkpoint=snapshot(1.0))],
                    {"chat": NewRef(0)},
                    Turn("chat", "a", "b", 1),
                )
            )
            await asyncio.sleep(delay)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.05)  # a shielded transaction finishes on its own
            assert not store.database.db.in_transaction
    finally:
        await store.close()


async def test_a_purge_leaves_nothing_readable_in_the_file(tmp_path: Path) -> None:
    """Zeroed, not just unlinked: the file keeps nothing of the purged channel's words."""
    path = tmp_path / "p.sqlite3"
    store = await SqliteStorage.open(path)
    try:
        secret = "a-very-private-remark-" * 300  # spills into overflow pages
        await store.states.write_states(
            "gone", [logged([1])], {"chat": NewRef(0)}, Turn("chat", secret, "ok", 1)
        )
        await store.states.write_states("kept", [logged([1])], {"chat": NewRef(0)}, Turn("chat", "a", "b", 1))
        assert await store.admin.purge_channel("gone")
    finally:
        await store.close()
    assert b"a-very-private-remark-" not in path.read_bytes()


async def test_old_transcript_lines_are_deleted_and_zeroed(tmp_path: Path) -> None:
    """Lines written a day before the cut-off go, in several transactions, and leave nothing in
    the file."""
    path = tmp_path / "t.sqlite3"
    store = await SqliteStorage.open(path)
    try:
        secret = "an-old-private-remark-" * 300  # spills into overflow pages
        for i in range(5):
            await store.states.write_states("old", [], {}, Turn("chat", f"{secret}{i}", "noted", 1))
        await store.states.write_states("new", [], {}, Turn("chat", "recent", "fine", 1))
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:  # the old lines were written a day ago
        conn.execute("UPDATE turns SET created_at = created_at - 86400 WHERE channel_id = 'old'")
    conn.close()
    store = await SqliteStorage.open(path)
    try:
        assert await store.transcripts.delete_before(time.time() - 3600, batch=2) == 5
        assert await store.transcripts.turns("old") == []
        assert [t.user_text for t in await store.transcripts.turns("new")] == ["recent"]
        assert await store.transcripts.delete_before(time.time() - 3600) == 0
    finally:
        await store.close()
    assert b"an-old-private-remark-" not in path.read_bytes()


async def test_a_thread_stored_before_version_4_gets_its_channel(tmp_path: Path) -> None:
    """A thread row of a version-3 database (a server, no channel) is linked when it talks."""
    path = tmp_path / "v3.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    for _, _, sql in migrations()[:3]:
        conn.executescript(sql)
    conn.execute("PRAGMA user_version = 3")
    conn.execute(
        "INSERT INTO channels (channel_id, guild_id, created_at, updated_at) VALUES ('t', 'g', 0, 0)"
    )
    conn.close()
    store = await SqliteStorage.open(path)
    try:
        channels = store.channels
        assert await channels.threads_of("c") == []
        await channels.set_place("t", "g", "c")
        assert await channels.threads_of("c") == ["t"]
        await channels.set_place("t", "g", "c")  # again: nothing changes
        assert await channels.threads_of("c") == ["t"] and await channels.guild_channels("g") == ["t"]
    finally:
        await store.close()


def test_snapshots_of_schema_2_become_checkpoints(tmp_path: Path) -> None:
    """A database written by the whole-snapshot version keeps its conversations and undo copies."""
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    for _, _, sql in migrations()[:2]:
        conn.executescript(sql)
    conn.execute("PRAGMA user_version = 2")
    data = snapshot(3.0).to_bytes()
    conn.execute("INSERT INTO channels (channel_id, created_at, updated_at) VALUES ('ch', 0, 0)")
    for table, name in (("snapshots", "chat"), ("snapshots", "gen_0"), ("undo_snapshots", "chat")):
        conn.execute(
            f"INSERT INTO {table} VALUES ('ch', ?, 'fp', 'preset:1', ?, ?, 0)", (name, data, checksum(data))
        )
    conn.close()

    async def check() -> None:
        store = await SqliteStorage.open(path)
        try:
            heads = await store.states.heads("ch")
            assert set(heads) == {"chat", "gen_0", "undo_chat"} and len(set(heads.values())) == 3
            for state_id in heads.values():
                (state,) = await store.states.chain(state_id)
                assert state.base == "checkpoint" and state.preset_key == "preset:1"
                assert (await store.states.load_checkpoint(state_id, "fp")).tensors[0][0].item() == 3.0
        finally:
            await store.close()

    asyncio.run(check())


def test_two_processes_creating_one_database_migrate_once(tmp_path: Path) -> None:
    """Openers racing on a new file apply each migration exactly once."""
    db = tmp_path / "g.sqlite3"
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            migrate(db)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == len(migrations())


async def test_unwritable_folder_is_a_clear_error(tmp_path: Path) -> None:
    """A database path that cannot be created gives a StoreError, not a traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create the database folder"):
        await SqliteStorage.open(blocker / "sub" / "db.sqlite3")
