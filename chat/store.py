"""The one database access layer: channels, snapshots and transcripts in SQLite (aiosqlite).

Numbered migrations from ``migrations/`` run at open, each in its own transaction, and the schema
version lives in the database (``PRAGMA user_version``). The database runs in WAL mode and every
change of a turn is one transaction, so a kill at any moment leaves it consistent: a turn is
either wholly stored or not at all.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from engine.errors import StateMismatchError
from engine.state import Snapshot, checksum

SNAPSHOT_NAMES = ("chat", "chat_pre", "gen_0", "gen_1")
_MIGRATION_RE = re.compile(r"^V(\d+)__[\w-]+\.sql$")


class StoreError(Exception):
    """The database cannot be used (wrong file, newer schema, disk trouble)."""


@dataclass(frozen=True)
class Turn:
    """One answered message, for the channel's transcript."""

    command: str
    user_text: str
    reply_text: str
    reply_tokens: int


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every bundled migration, in order."""
    found = []
    for entry in importlib.resources.files("migrations").iterdir():
        match = _MIGRATION_RE.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise StoreError(f"migrations must be numbered 1, 2, 3... without gaps, found {versions}")
    return found


class Store:
    """An open database. Create with :meth:`open`; close with :meth:`close`."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        self._write_lock = asyncio.Lock()
        self._inflight: set[asyncio.Future[None]] = set()  # shielded writes still running

    @classmethod
    async def open(cls, path: Path) -> Store:
        """Open (creating if needed) and migrate the database at ``path``."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the database folder {path.parent}: {exc}") from exc
        await asyncio.to_thread(_migrate, path)
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
            await db.execute("PRAGMA synchronous = NORMAL")  # WAL: a process kill loses nothing
            await db.execute("PRAGMA foreign_keys = ON")
            await db.execute("PRAGMA busy_timeout = 5000")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        return cls(db, path)

    async def close(self) -> None:
        """Let writes in flight finish, checkpoint the WAL into the main file, and close."""
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=10)
        try:
            await self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            await self._db.close()

    async def _write(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` in one write transaction, shielded from cancellation.

        A transaction that has started always ends (COMMIT, or ROLLBACK on error) even when the
        task that asked for it is cancelled, so the connection is never left inside one.
        """

        async def transaction() -> None:
            async with self._write_lock:
                if self._db.in_transaction:  # never expected; do not build on a stray one
                    await self._db.execute("ROLLBACK")
                await self._db.execute("BEGIN IMMEDIATE")
                try:
                    await work()
                    await self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        await self._db.execute("ROLLBACK")
                    raise

        future = asyncio.ensure_future(transaction())
        self._inflight.add(future)
        future.add_done_callback(self._inflight.discard)
        try:
            await asyncio.shield(future)
        except sqlite3.Error as exc:
            raise StoreError(f"database write failed: {exc}") from exc

    async def schema_version(self) -> int:
        """The migration number the database is at."""
        async with self._db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def _fetchone(self, sql: str, params: tuple[Any, ...]) -> Any:
        async with self._db.execute(sql, params) as cursor:
            return await cursor.fetchone()

    async def channel_settings(self, channel_id: str) -> dict[str, Any]:
        """The channel's own settings (empty for a new channel)."""
        row = await self._fetchone("SELECT settings FROM channels WHERE channel_id = ?", (channel_id,))
        return dict(json.loads(row[0])) if row else {}

    async def set_channel_settings(self, channel_id: str, settings: dict[str, Any]) -> None:
        """Replace the channel's own settings."""

        async def work() -> None:
            await self._ensure_channel(channel_id)
            await self._db.execute(
                "UPDATE channels SET settings = ?, updated_at = ? WHERE channel_id = ?",
                (json.dumps(settings, sort_keys=True), time.time(), channel_id),
            )

        await self._write(work)

    async def _ensure_channel(self, channel_id: str) -> None:
        now = time.time()
        await self._db.execute(
            "INSERT OR IGNORE INTO channels (channel_id, created_at, updated_at) VALUES (?, ?, ?)",
            (channel_id, now, now),
        )

    async def load_snapshot(
        self, channel_id: str, name: str, fingerprint: str
    ) -> tuple[Snapshot, str] | None:
        """The channel's snapshot ``name`` and its preset key, or None when there is none.

        Raises :class:`StateMismatchError` when it is damaged or belongs to another model.
        """
        row = await self._fetchone(
            "SELECT data, checksum, preset_key, model_fingerprint FROM snapshots "
            "WHERE channel_id = ? AND name = ?",
            (channel_id, name),
        )
        if row is None:
            return None
        data, digest, preset_key, model = row
        if model != fingerprint:
            raise StateMismatchError(f"the stored {name} state was made with another model ({model})")
        snapshot = await asyncio.to_thread(_decode, bytes(data), digest, fingerprint)
        return snapshot, str(preset_key)

    async def load_init(self, preset_key: str, fingerprint: str) -> Snapshot | None:
        """The shared initial snapshot of a preset for a model, if it was stored."""
        row = await self._fetchone(
            "SELECT data, checksum FROM init_snapshots WHERE preset_key = ? AND model_fingerprint = ?",
            (preset_key, fingerprint),
        )
        if row is None:
            return None
        try:
            return await asyncio.to_thread(_decode, bytes(row[0]), row[1], fingerprint)
        except StateMismatchError:
            return None  # recomputed by the caller and stored again

    async def save_init(self, preset_key: str, snapshot: Snapshot) -> None:
        """Store the shared initial snapshot of a preset."""
        data, digest = await asyncio.to_thread(_encode, snapshot)

        async def work() -> None:
            await self._db.execute(
                "INSERT OR REPLACE INTO init_snapshots VALUES (?, ?, ?, ?, ?)",
                (preset_key, snapshot.fingerprint, data, digest, time.time()),
            )

        await self._write(work)

    async def commit(
        self,
        channel_id: str,
        preset_key: str,
        put: dict[str, Snapshot],
        delete: tuple[str, ...] = (),
        turn: Turn | None = None,
    ) -> None:
        """Store a turn's snapshots (and transcript line) in one transaction."""
        encoded = await asyncio.to_thread(lambda: {name: _encode(snap) for name, snap in put.items()})
        now = time.time()

        async def work() -> None:
            await self._ensure_channel(channel_id)
            for name in delete:
                await self._db.execute(
                    "DELETE FROM snapshots WHERE channel_id = ? AND name = ?", (channel_id, name)
                )
            for name, (data, digest) in encoded.items():
                await self._db.execute(
                    "INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (channel_id, name, put[name].fingerprint, preset_key, data, digest, now),
                )
            if turn is not None:
                fingerprint = next(iter(put.values())).fingerprint if put else ""
                await self._db.execute(
                    "INSERT INTO turns (channel_id, command, user_text, reply_text, "
                    "reply_tokens, model_fingerprint, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        channel_id,
                        turn.command,
                        turn.user_text,
                        turn.reply_text,
                        turn.reply_tokens,
                        fingerprint,
                        now,
                    ),
                )
            await self._db.execute(
                "UPDATE channels SET updated_at = ? WHERE channel_id = ?", (now, channel_id)
            )

        await self._write(work)

    async def set_channel_guild(self, channel_id: str, guild_id: str | None) -> None:
        """Record which server a conversation belongs to (for server-wide resets)."""

        async def work() -> None:
            await self._ensure_channel(channel_id)
            await self._db.execute(
                "UPDATE channels SET guild_id = ? WHERE channel_id = ? AND guild_id IS NOT ?",
                (guild_id, channel_id, guild_id),
            )

        await self._write(work)

    async def guild_channels(self, guild_id: str) -> list[str]:
        """Conversations of a server that have any stored state."""
        async with self._db.execute(
            "SELECT channel_id FROM channels WHERE guild_id = ? ORDER BY channel_id", (guild_id,)
        ) as cursor:
            return [str(r[0]) for r in await cursor.fetchall()]

    async def reset_channel(self, channel_id: str, preset_key: str, init: Snapshot) -> None:
        """Put ``chat`` back to ``init``, keeping the conversation as it was for an undo."""
        data, digest = await asyncio.to_thread(_encode, init)
        now = time.time()

        async def work() -> None:
            await self._ensure_channel(channel_id)
            async with self._db.execute(
                "SELECT count(*) FROM snapshots WHERE channel_id = ? AND name IN ('chat', 'chat_pre')",
                (channel_id,),
            ) as cursor:
                row = await cursor.fetchone()
            if row is not None and row[0]:
                await self._db.execute("DELETE FROM undo_snapshots WHERE channel_id = ?", (channel_id,))
                await self._db.execute(
                    "INSERT INTO undo_snapshots SELECT * FROM snapshots "
                    "WHERE channel_id = ? AND name IN ('chat', 'chat_pre')",
                    (channel_id,),
                )
            await self._db.execute(
                "DELETE FROM snapshots WHERE channel_id = ? AND name IN ('chat', 'chat_pre')",
                (channel_id,),
            )
            await self._db.execute(
                "INSERT INTO snapshots VALUES (?, 'chat', ?, ?, ?, ?, ?)",
                (channel_id, init.fingerprint, preset_key, data, digest, now),
            )
            await self._db.execute(
                "INSERT INTO turns (channel_id, command, user_text, reply_text, reply_tokens, "
                "model_fingerprint, created_at) VALUES (?, '+reset', '', '', 0, ?, ?)",
                (channel_id, init.fingerprint, now),
            )

        await self._write(work)

    async def undo_reset(self, channel_id: str) -> bool:
        """Bring back the conversation of before the last reset; False when there is none."""
        done = False

        async def work() -> None:
            nonlocal done
            async with self._db.execute(
                "SELECT count(*) FROM undo_snapshots WHERE channel_id = ?", (channel_id,)
            ) as cursor:
                row = await cursor.fetchone()
            if row is None or not row[0]:
                return
            await self._db.execute(
                "DELETE FROM snapshots WHERE channel_id = ? AND name IN ('chat', 'chat_pre')",
                (channel_id,),
            )
            await self._db.execute(
                "INSERT INTO snapshots SELECT * FROM undo_snapshots WHERE channel_id = ?", (channel_id,)
            )
            await self._db.execute("DELETE FROM undo_snapshots WHERE channel_id = ?", (channel_id,))
            await self._db.execute(
                "INSERT INTO turns (channel_id, command, user_text, reply_text, reply_tokens, "
                "model_fingerprint, created_at) VALUES (?, 'undo-reset', '', '', 0, '', ?)",
                (channel_id, time.time()),
            )
            done = True

        await self._write(work)
        return done

    async def enabled_channels(self) -> set[str]:
        """Channels where moderators enabled the bot."""
        async with self._db.execute("SELECT channel_id FROM enabled_channels") as cursor:
            return {str(r[0]) for r in await cursor.fetchall()}

    async def set_enabled(self, channel_id: str, guild_id: str, enabled: bool, by: str) -> None:
        """Enable or disable the bot in a channel."""

        async def work() -> None:
            if enabled:
                await self._db.execute(
                    "INSERT OR REPLACE INTO enabled_channels VALUES (?, ?, ?, ?)",
                    (channel_id, guild_id, by, time.time()),
                )
            else:
                await self._db.execute("DELETE FROM enabled_channels WHERE channel_id = ?", (channel_id,))

        await self._write(work)

    async def guild_settings(self, guild_id: str) -> dict[str, Any]:
        """A server's own settings (empty when none were set)."""
        row = await self._fetchone("SELECT settings FROM guild_settings WHERE guild_id = ?", (guild_id,))
        return dict(json.loads(row[0])) if row else {}

    async def set_guild_settings(self, guild_id: str, settings: dict[str, Any]) -> None:
        """Replace a server's own settings."""

        async def work() -> None:
            await self._db.execute(
                "INSERT OR REPLACE INTO guild_settings VALUES (?, ?, ?)",
                (guild_id, json.dumps(settings, sort_keys=True), time.time()),
            )

        await self._write(work)

    async def stats(self) -> dict[str, int]:
        """Sizes and counts: file bytes, channels, snapshots and their bytes, turns, schema."""
        counts: dict[str, int] = {"schema_version": await self.schema_version()}
        queries = {
            "channels": "SELECT count(*) FROM channels",
            "enabled_channels": "SELECT count(*) FROM enabled_channels",
            "snapshots": "SELECT count(*) FROM snapshots",
            "snapshot_bytes": "SELECT coalesce(sum(length(data)), 0) FROM snapshots",
            "shared_snapshots": "SELECT count(*) FROM init_snapshots",
            "shared_snapshot_bytes": "SELECT coalesce(sum(length(data)), 0) FROM init_snapshots",
            "undo_snapshots": "SELECT count(*) FROM undo_snapshots",
            "turns": "SELECT count(*) FROM turns",
            "page_bytes": "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
            "free_bytes": (
                "SELECT freelist_count * page_size FROM pragma_freelist_count(), pragma_page_size()"
            ),
        }
        for name, sql in queries.items():
            row = await self._fetchone(sql, ())
            counts[name] = int(row[0]) if row else 0
        wal = self.path.with_name(self.path.name + "-wal")
        counts["file_bytes"] = self.path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
        return counts

    async def transcript(self, channel_id: str) -> list[Turn]:
        """Every stored turn of a channel, oldest first."""
        async with self._db.execute(
            "SELECT command, user_text, reply_text, reply_tokens FROM turns WHERE channel_id = ? ORDER BY id",
            (channel_id,),
        ) as cursor:
            rows = await cursor.fetchall()
        return [Turn(str(r[0]), str(r[1]), str(r[2]), int(r[3])) for r in rows]


def backup(source: Path, destination: Path) -> None:
    """Copy a live database with SQLite's online backup (consistent even while the bot writes).

    The copy is written beside the destination and renamed into place, so a half-written backup
    never carries the destination's name.
    """
    if not source.exists():
        raise StoreError(f"database not found: {source}")
    partial = destination.with_name(destination.name + ".partial")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        src = sqlite3.connect(source, timeout=30)
        try:
            dst = sqlite3.connect(partial)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
        partial.replace(destination)
    except (OSError, sqlite3.Error) as exc:
        partial.unlink(missing_ok=True)
        raise StoreError(f"backup to {destination} failed: {exc}") from exc


def vacuum(path: Path) -> tuple[int, int]:
    """Rewrite the database without free pages; returns (bytes before, bytes after)."""
    if not path.exists():
        raise StoreError(f"database not found: {path}")
    before = path.stat().st_size
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"vacuum of {path} failed: {exc}") from exc
    return before, path.stat().st_size


def _encode(snapshot: Snapshot) -> tuple[bytes, str]:
    data = snapshot.to_bytes()
    return data, checksum(data)


def _split_statements(sql: str) -> list[str]:
    statements, buffer = [], ""
    for line in sql.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip() and not all(
        part.strip().startswith("--") or not part.strip() for part in buffer.splitlines()
    ):
        raise StoreError("a migration ends with an incomplete SQL statement")
    return statements


def _enable_wal(conn: sqlite3.Connection, patience: float = 10.0) -> None:
    """Switch to WAL mode; another process switching at the same moment makes SQLite answer
    "locked" at once (the busy timeout does not cover this), so try again for a while."""
    deadline = time.monotonic() + patience
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _migrate(path: Path) -> None:
    """Apply the migrations the database lacks, each in one transaction (WAL mode on).

    The version is read again inside each transaction, so two processes opening a new database
    at once apply each migration once.
    """
    available = migrations()
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open database {path}: {exc}") from exc
    try:
        _enable_wal(conn)
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        if current > len(available):
            raise StoreError(
                f"database {path} has schema version {current}, newer than this program "
                f"knows ({len(available)}): upgrade rwkv-discord or use another --db"
            )
        for version, name, sql in available:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if conn.execute("PRAGMA user_version").fetchone()[0] < version:
                    for statement in _split_statements(sql):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {version}")
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK")
                raise StoreError(f"migration {name} failed: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path} is not a usable rwkv-discord database: {exc}") from exc
    finally:
        conn.close()


def _decode(data: bytes, digest: str, fingerprint: str) -> Snapshot:
    if checksum(data) != digest:
        raise StateMismatchError("a stored state failed its checksum")
    return Snapshot.from_bytes(data, fingerprint)
