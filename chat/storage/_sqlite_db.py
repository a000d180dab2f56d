"""One open SQLite database shared by the repositories: reads, and write transactions that a
cancelled task never leaves half done."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import aiosqlite

from chat.errors import FencedError, StoreError
from chat.storage._sqlite_errors import sqlite_error
from chat.storage._sqlite_files import migrate, nearest_existing
from engine.errors import process_user

__all__ = ["Database", "Repository"]

log = logging.getLogger(__name__)


class Database:
    """The connection of an open store. Create with :meth:`open`; close with :meth:`close`."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self.db = db
        self.path = path
        self._write_lock = asyncio.Lock()
        self._inflight: set[asyncio.Future[None]] = set()  # shielded writes still running

    @classmethod
    async def open(cls, path: Path, *, check: bool = True) -> Database:
        """Open (creating if needed) and migrate the database at ``path``.

        With ``check``, the file is checked first (SQLite's ``quick_check``, stopped after
        ``QUICK_CHECK_SECONDS`` on a very large file): a damaged database is refused with one
        line that says how to restore it, before any message is answered from it.
        """
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except PermissionError as exc:
            raise StoreError(
                f"cannot create the database folder {path.parent}: {process_user()} may not write in "
                f"{nearest_existing(path.parent)}: create it and give that user access, or pick another "
                "RWKV_DISCORD_DB",
                "cannot-open",
            ) from exc
        except OSError as exc:
            raise StoreError(
                f"cannot create the database folder {path.parent}: {exc}", "cannot-open"
            ) from exc
        await asyncio.to_thread(migrate, path, check)
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise sqlite_error(exc, path, "opening it") from exc
        try:
            await db.execute("PRAGMA synchronous = NORMAL")  # WAL: a process kill loses nothing
            await db.execute("PRAGMA foreign_keys = ON")
            await db.execute("PRAGMA busy_timeout = 5000")
            # Replacing a checkpoint frees megabytes of pages; zeroing them (this SQLite build's
            # default) would double what a checkpoint writes. A purge zeroes what it deletes.
            await db.execute("PRAGMA secure_delete = FAST")
        except sqlite3.Error as exc:
            await db.close()
            raise sqlite_error(exc, path, "opening it") from exc
        return cls(db, path)

    async def close(self) -> None:
        """Let writes in flight finish, checkpoint the WAL into the main file, and close.

        Never raises: at shutdown a full or read-only disk must not turn into a traceback. The
        write-ahead log then stays beside the file, and SQLite applies it at the next open.
        """
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=10)
        try:
            await self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning(
                "%s (the write-ahead log is kept and applied at the next start)",
                sqlite_error(exc, self.path, "the last checkpoint at close"),
            )
        try:
            await self.db.close()
        except sqlite3.Error as exc:
            log.warning("%s", sqlite_error(exc, self.path, "closing it"))
        except (ValueError, RuntimeError) as exc:  # closed already, or its thread is gone
            log.warning("closing the database %s: %s", self.path, exc)

    async def fetchone(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        """The first row of a query, or None."""
        async with self.db.execute(sql, params) as cursor:
            return await cursor.fetchone()

    async def fetchall(self, sql: str, params: tuple[Any, ...] = ()) -> Iterable[Any]:
        """Every row of a query."""
        async with self.db.execute(sql, params) as cursor:
            return await cursor.fetchall()

    async def write(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` in one write transaction, shielded from cancellation.

        A transaction that has started always ends (COMMIT, or ROLLBACK on error) even when the
        task that asked for it is cancelled, so the connection is never left inside one.
        """

        async def transaction() -> None:
            async with self._write_lock:
                if self.db.in_transaction:  # never expected; do not build on a stray one
                    await self.db.execute("ROLLBACK")
                await self.db.execute("BEGIN IMMEDIATE")
                try:
                    await work()
                    await self.db.execute("COMMIT")
                except BaseException:
                    if self.db.in_transaction:
                        await self.db.execute("ROLLBACK")
                    raise

        future = asyncio.ensure_future(transaction())
        self._inflight.add(future)
        future.add_done_callback(self._inflight.discard)
        try:
            await asyncio.shield(future)
        except sqlite3.Error as exc:
            raise sqlite_error(exc, self.path, "saving") from exc

    async def write_zeroed(self, work: Callable[[], Awaitable[None]]) -> None:
        """:meth:`write` with the pages that ``work`` frees zeroed (SQLite's secure_delete)."""

        async def zeroed() -> None:
            await self.db.execute("PRAGMA secure_delete = ON")
            try:
                await work()
            finally:
                await self.db.execute("PRAGMA secure_delete = FAST")

        await self.write(zeroed)

    async def wal_checkpoint(self) -> None:
        """Copy the write-ahead log into the database file and empty it."""
        await self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    async def empty_wal(self, after: str) -> None:
        """After a zeroing delete: the write-ahead log still holds copies of the deleted pages,
        so move it into the file and empty it."""
        try:
            await self.wal_checkpoint()
        except sqlite3.Error as exc:  # a long reader blocks it: the next checkpoint does it
            log.warning("after %s, the write-ahead log could not be emptied yet: %s", after, exc)

    async def check_epoch(self, channel_id: str, epoch: int | None) -> None:
        """Inside a write transaction: raise :class:`FencedError` unless ``epoch`` (when given) is
        the epoch of the channel's lease."""
        if epoch is None:
            return
        row = await self.fetchone("SELECT epoch FROM leases WHERE channel_id = ?", (channel_id,))
        current = None if row is None else int(row[0])
        if current != epoch:
            raise FencedError(channel_id, epoch, current)

    async def ensure_channel(self, channel_id: str) -> None:
        """The channel's row (inside a write transaction): every other row of a channel needs it."""
        now = time.time()
        await self.db.execute(
            "INSERT OR IGNORE INTO channels (channel_id, created_at, updated_at) VALUES (?, ?, ?)",
            (channel_id, now, now),
        )


class Repository:
    """What each SQLite repository shares: the open database (``path`` names it in errors)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.path: Path = db.path
