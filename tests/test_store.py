"""The database: migrations, schema version, WAL, transactional turns."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from pathlib import Path

import pytest
import torch

from chat.store import Store, StoreError, Turn, _migrate, migrations
from engine.state import Snapshot


def snapshot(value: float = 1.0) -> Snapshot:
    return Snapshot(
        [torch.full((4,), value), torch.full((2, 2), value, dtype=torch.bfloat16)],
        torch.arange(5, dtype=torch.float32),
        7,
        "fp",
        {"mode": "chat"},
    )


async def test_migrations_run_once_and_record_the_version(tmp_path: Path) -> None:
    """A new file gets every migration; reopening applies nothing twice."""
    db = tmp_path / "a.sqlite3"
    store = await Store.open(db)
    assert await store.schema_version() == len(migrations())
    await store.close()
    store = await Store.open(db)
    assert await store.schema_version() == len(migrations())
    await store.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"channels", "snapshots", "init_snapshots", "turns"} <= tables


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A database from a newer version of the program is not touched."""
    db = tmp_path / "b.sqlite3"
    await (await Store.open(db)).close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer than this program"):
        await Store.open(db)


async def test_not_a_database_is_refused(tmp_path: Path) -> None:
    """A file that is not SQLite gives a clear error and is left as it was."""
    db = tmp_path / "c.sqlite3"
    db.write_bytes(b"hello, I am a text file" * 100)
    with pytest.raises(StoreError, match="not a usable rwkv-discord database"):
        await Store.open(db)
    assert db.read_bytes() == b"hello, I am a text file" * 100


async def test_snapshot_round_trip_and_commit(tmp_path: Path) -> None:
    """Snapshots come back bit for bit; a turn's writes land together."""
    store = await Store.open(tmp_path / "d.sqlite3")
    try:
        await store.commit(
            "ch",
            "preset:1",
            {"chat": snapshot(1.0), "chat_pre": snapshot(2.0)},
            turn=Turn("chat", "hi", "hello", 3),
        )
        loaded = await store.load_snapshot("ch", "chat", "fp")
        assert loaded is not None
        snap, key = loaded
        assert key == "preset:1" and snap.last_token == 7 and snap.meta == {"mode": "chat"}
        assert torch.equal(snap.tensors[1], snapshot(1.0).tensors[1])
        assert snap.tensors[1].dtype == torch.bfloat16
        assert await store.transcript("ch") == [Turn("chat", "hi", "hello", 3)]
        await store.commit("ch", "preset:1", {"chat": snapshot(3.0)}, delete=("chat_pre",))
        assert await store.load_snapshot("ch", "chat_pre", "fp") is None
    finally:
        await store.close()


async def test_failed_commit_changes_nothing(tmp_path: Path) -> None:
    """A commit that fails midway is rolled back whole."""
    store = await Store.open(tmp_path / "e.sqlite3")
    try:
        await store.commit("ch", "p", {"chat": snapshot(1.0)}, turn=Turn("chat", "a", "b", 1))
        bad = snapshot(5.0)
        with pytest.raises(StoreError, match="CHECK constraint"):
            await store.commit(
                "ch", "p", {"chat": bad, "not-a-snapshot-name": bad}, turn=Turn("chat", "c", "d", 1)
            )
        loaded = await store.load_snapshot("ch", "chat", "fp")
        assert loaded is not None and torch.equal(loaded[0].tensors[0], snapshot(1.0).tensors[0])
        assert len(await store.transcript("ch")) == 1
    finally:
        await store.close()


async def test_cancelled_write_still_ends_its_transaction(tmp_path: Path) -> None:
    """Cancelling the task that writes never leaves the connection inside a transaction."""
    store = await Store.open(tmp_path / "f.sqlite3")
    try:
        for delay in (0, 0.0005, 0.002, 0.01):
            task = asyncio.ensure_future(
                store.commit("ch", "p", {"chat": snapshot(1.0)}, turn=Turn("chat", "a", "b", 1))
            )
            await asyncio.sleep(delay)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.05)  # a shielded transaction finishes on its own
            assert not store._db.in_transaction
        await store.commit("ch", "p", {"chat": snapshot(2.0)})
        loaded = await store.load_snapshot("ch", "chat", "fp")
        assert loaded is not None and loaded[0].tensors[0][0].item() == 2.0
    finally:
        await store.close()


def test_two_processes_creating_one_database_migrate_once(tmp_path: Path) -> None:
    """Openers racing on a new file apply each migration exactly once."""
    db = tmp_path / "g.sqlite3"
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            _migrate(db)
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
        await Store.open(blocker / "sub" / "db.sqlite3")
