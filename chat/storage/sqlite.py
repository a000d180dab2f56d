"""The SQLite backend: one file in WAL mode, every change of a turn in one transaction.

Conversation states are stored as checkpoints plus a token log (migration V3): a state row holds
the tokens fed to its parent state in one read, and only now and then a whole state (see
:mod:`chat.states` for the policy). The engine's reads are deterministic, so re-reading the log
from the last whole state gives the state back bit for bit. A kill at any moment leaves the file
consistent: a turn is either wholly stored or not at all.

The repositories share one :class:`Database` (one connection, one writer at a time); every
public coroutine of each answers an SQLite error with a :class:`StoreError` that says what to do.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from chat.storage import Backend, Location
from chat.storage._sqlite_db import Database, Repository
from chat.storage._sqlite_errors import guard_sqlite_errors, sqlite_error
from chat.storage._sqlite_files import (
    QUICK_CHECK_SECONDS,
    backup,
    integrity_check,
    migrate,
    migrations,
    vacuum,
)
from chat.storage._sqlite_states import SqliteStateLog
from chat.storage.records import Turn

__all__ = [
    "BACKEND",
    "QUICK_CHECK_SECONDS",
    "Database",
    "SqliteAdmin",
    "SqliteBackend",
    "SqliteChannels",
    "SqliteLeases",
    "SqliteStateLog",
    "SqliteStorage",
    "SqliteTranscripts",
    "backup",
    "integrity_check",
    "migrate",
    "migrations",
    "sqlite_error",
    "vacuum",
]

log = logging.getLogger(__name__)


def _settings_object(row: Any, whose: str) -> dict[str, Any]:
    """Stored settings as a dict; settings that do not parse are logged and read as none (the
    defaults), so that one damaged row never stops a channel. The next change rewrites them."""
    if row is None:
        return {}
    try:
        value = json.loads(row[0])
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, dict):
        log.warning("the stored settings of %s do not parse (%.60r): using the defaults", whose, row[0])
        return {}
    return value


@guard_sqlite_errors
class SqliteChannels(Repository):
    """:class:`chat.storage.ChannelConfig` in the ``channels``, ``enabled_channels`` and
    ``guild_settings`` tables."""

    async def settings(self, channel_id: str) -> dict[str, Any]:
        """The channel's own settings (empty for a new channel)."""
        row = await self._db.fetchone("SELECT settings FROM channels WHERE channel_id = ?", (channel_id,))
        return _settings_object(row, f"channel {channel_id}")

    async def set_settings(self, channel_id: str, settings: dict[str, Any]) -> None:
        """Replace the channel's own settings."""

        async def work() -> None:
            await self._db.ensure_channel(channel_id)
            await self._db.db.execute(
                "UPDATE channels SET settings = ?, updated_at = ? WHERE channel_id = ?",
                (json.dumps(settings, sort_keys=True), time.time(), channel_id),
            )

        await self._db.write(work)

    async def set_place(self, channel_id: str, guild_id: str | None, parent_id: str | None) -> None:
        """Record which server a conversation belongs to (for server-wide resets) and, for a
        thread, its channel (a deleted channel takes its threads with it)."""

        async def work() -> None:
            await self._db.ensure_channel(channel_id)
            await self._db.db.execute(
                "UPDATE channels SET guild_id = ?, parent_id = ? WHERE channel_id = ? "
                "AND (guild_id IS NOT ? OR parent_id IS NOT ?)",
                (guild_id, parent_id, channel_id, guild_id, parent_id),
            )

        await self._db.write(work)

    async def guild_channels(self, guild_id: str) -> list[str]:
        """Conversations of a server that have any stored state."""
        rows = await self._db.fetchall(
            "SELECT channel_id FROM channels WHERE guild_id = ? ORDER BY channel_id", (guild_id,)
        )
        return [str(r[0]) for r in rows]

    async def threads_of(self, channel_id: str) -> list[str]:
        """Conversations in threads of a channel (active or archived) that have any stored state."""
        rows = await self._db.fetchall(
            "SELECT channel_id FROM channels WHERE parent_id = ? ORDER BY channel_id", (channel_id,)
        )
        return [str(r[0]) for r in rows]

    async def enabled(self, guild_id: str | None = None) -> set[str]:
        """Channels where moderators enabled the bot (of one server, when ``guild_id`` is given)."""
        rows = await self._db.fetchall(
            "SELECT channel_id FROM enabled_channels WHERE enabled = 1 AND (?1 IS NULL OR guild_id = ?1)",
            (guild_id,),
        )
        return {str(r[0]) for r in rows}

    async def disabled_threads(self) -> set[str]:
        """Threads switched off on their own while their channel is enabled."""
        rows = await self._db.fetchall("SELECT channel_id FROM enabled_channels WHERE enabled = 0")
        return {str(r[0]) for r in rows}

    async def set_enabled(
        self, channel_id: str, guild_id: str, enabled: bool, by: str, *, override: bool = False
    ) -> None:
        """Enable or disable the bot in a channel. ``override`` with ``enabled=False`` records a
        thread switched off although its channel is on (without it, disabling forgets the row)."""

        async def work() -> None:
            if enabled or override:
                await self._db.db.execute(
                    "INSERT OR REPLACE INTO enabled_channels "
                    "(channel_id, guild_id, enabled_by, enabled_at, enabled) VALUES (?, ?, ?, ?, ?)",
                    (channel_id, guild_id, by, time.time(), int(enabled)),
                )
            else:
                await self._db.db.execute("DELETE FROM enabled_channels WHERE channel_id = ?", (channel_id,))

        await self._db.write(work)

    async def guild_settings(self, guild_id: str) -> dict[str, Any]:
        """A server's own settings (empty when none were set)."""
        row = await self._db.fetchone("SELECT settings FROM guild_settings WHERE guild_id = ?", (guild_id,))
        return _settings_object(row, f"server {guild_id}")

    async def set_guild_settings(self, guild_id: str, settings: dict[str, Any]) -> None:
        """Replace a server's own settings."""

        async def work() -> None:
            await self._db.db.execute(
                "INSERT OR REPLACE INTO guild_settings VALUES (?, ?, ?)",
                (guild_id, json.dumps(settings, sort_keys=True), time.time()),
            )

        await self._db.write(work)

    async def forget_guild(self, guild_id: str) -> None:
        """Delete a server's own settings (its channels are purged one by one)."""

        async def work() -> None:
            await self._db.db.execute("DELETE FROM guild_settings WHERE guild_id = ?", (guild_id,))

        await self._db.write(work)


@guard_sqlite_errors
class SqliteTranscripts(Repository):
    """:class:`chat.storage.Transcripts` in the ``turns`` table."""

    async def turns(self, channel_id: str) -> list[Turn]:
        """Every stored turn of a channel, oldest first."""
        rows = await self._db.fetchall(
            "SELECT command, user_text, reply_text, reply_tokens FROM turns WHERE channel_id = ? ORDER BY id",
            (channel_id,),
        )
        return [Turn(str(r[0]), str(r[1]), str(r[2]), int(r[3])) for r in rows]

    async def delete_before(self, before: float, batch: int = 5000) -> int:
        """Delete the transcript lines written before ``before`` (a time), ``batch`` lines a
        transaction so that messages are not held up; the freed pages are zeroed, and the
        write-ahead log is emptied after, as for a purge. Returns how many lines went."""
        deleted = 0
        while True:
            count = 0

            async def work() -> None:
                nonlocal count
                cursor = await self._db.db.execute(
                    "DELETE FROM turns WHERE id IN "
                    "(SELECT id FROM turns WHERE created_at < ? ORDER BY id LIMIT ?)",
                    (before, batch),
                )
                count = cursor.rowcount

            await self._db.write_zeroed(work)
            deleted += count
            if count < batch:
                break
        if deleted:
            await self._db.empty_wal("deleting old transcript lines")
        return deleted


_COUNTS = {
    "channels": "SELECT count(*) FROM channels",
    "enabled_channels": "SELECT count(*) FROM enabled_channels WHERE enabled = 1",
    "states": "SELECT count(*) FROM states",
    "log_tokens": "SELECT coalesce(sum(length(tokens)), 0) / 4 FROM states",
    "checkpoints": "SELECT count(*) FROM checkpoints",
    "checkpoint_bytes": "SELECT coalesce(sum(length(data)), 0) FROM checkpoints",
    "shared_snapshots": "SELECT count(*) FROM init_snapshots",
    "shared_snapshot_bytes": "SELECT coalesce(sum(length(data)), 0) FROM init_snapshots",
    "heads": "SELECT count(*) FROM heads",
    "rebuild_pending": "SELECT count(*) FROM channels WHERE rebuild = 1",
    "turns": "SELECT count(*) FROM turns",
    "page_bytes": "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
    "free_bytes": "SELECT freelist_count * page_size FROM pragma_freelist_count(), pragma_page_size()",
}


@guard_sqlite_errors
class SqliteAdmin(Repository):
    """:class:`chat.storage.Administration` over the whole file."""

    async def stats(self) -> dict[str, int]:
        """Sizes and counts: file bytes, channels, snapshots and their bytes, turns, schema."""
        counts: dict[str, int] = {"schema_version": await self.schema_version()}
        for name, sql in _COUNTS.items():
            row = await self._db.fetchone(sql)
            counts[name] = int(row[0]) if row else 0
        wal = self.path.with_name(self.path.name + "-wal")
        counts["file_bytes"] = self.path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
        return counts

    async def schema_version(self) -> int:
        """The migration number the database is at."""
        row = await self._db.fetchone("PRAGMA user_version")
        return int(row[0]) if row else 0

    async def purge_channel(self, channel_id: str, *, epoch: int | None = None) -> bool:
        """Delete everything stored for a channel (its states, transcript, settings, enabling);
        the freed pages are zeroed, so nothing of it stays readable in the file. Its lease stays;
        ``epoch`` fences the purge."""
        found = False

        async def work() -> None:
            nonlocal found
            await self._db.check_epoch(channel_id, epoch)
            await self._db.db.execute("DELETE FROM heads WHERE channel_id = ?", (channel_id,))
            await self._db.db.execute("DELETE FROM states WHERE channel_id = ?", (channel_id,))
            cursor = await self._db.db.execute("DELETE FROM channels WHERE channel_id = ?", (channel_id,))
            found = cursor.rowcount > 0
            cursor = await self._db.db.execute(
                "DELETE FROM enabled_channels WHERE channel_id = ?", (channel_id,)
            )
            found = found or cursor.rowcount > 0

        await self._db.write_zeroed(work)
        await self._db.empty_wal("a purge")
        return found

    async def idle_channels(self, before: float, limit: int) -> list[str]:
        """Up to ``limit`` channels not used since ``before`` that still keep more than their chat
        state (oldest first)."""
        rows = await self._db.fetchall(
            "SELECT c.channel_id FROM channels c WHERE c.updated_at < ? AND EXISTS "
            "(SELECT 1 FROM heads h WHERE h.channel_id = c.channel_id AND h.name != 'chat') "
            "ORDER BY c.updated_at LIMIT ?",
            (before, limit),
        )
        return [str(r[0]) for r in rows]

    async def checkpoint_usage(self) -> int:
        """Bytes of whole states stored for channels (shared opening states not counted)."""
        row = await self._db.fetchone("SELECT coalesce(sum(length(data)), 0) FROM checkpoints")
        return int(row[0]) if row else 0

    async def checkpointed_channels(self, limit: int) -> list[tuple[str, int, float]]:
        """(channel, checkpoint bytes, last use) of the least recently used channels that hold
        checkpoints."""
        rows = await self._db.fetchall(
            "SELECT s.channel_id, sum(length(k.data)), max(c.updated_at) FROM checkpoints k "
            "JOIN states s ON s.id = k.state_id JOIN channels c ON c.channel_id = s.channel_id "
            "GROUP BY s.channel_id ORDER BY max(c.updated_at) LIMIT ?",
            (limit,),
        )
        return [(str(r[0]), int(r[1]), float(r[2])) for r in rows]

    async def flush(self) -> None:
        """Copy the write-ahead log into the database file and empty it."""
        await self._db.wal_checkpoint()

    async def collect_objects(self, written_before: float) -> int:
        """Nothing to collect: whole states live in their rows, deleted with them."""
        return 0


@guard_sqlite_errors
class SqliteLeases(Repository):
    """:class:`chat.storage.Leases` in the ``leases`` table."""

    async def take(self, channel_id: str, owner: str) -> int:
        """Make ``owner`` the channel's holder and bump its epoch; returns the new epoch."""
        epoch = 0

        async def work() -> None:
            nonlocal epoch
            row = await self._db.fetchone(
                "INSERT INTO leases (channel_id, owner, epoch, taken_at) VALUES (?, ?, 1, ?) "
                "ON CONFLICT (channel_id) DO UPDATE SET owner = excluded.owner, epoch = epoch + 1, "
                "taken_at = excluded.taken_at RETURNING epoch",
                (channel_id, owner, time.time()),
            )
            epoch = int(row[0])

        await self._db.write(work)
        return epoch

    async def holder(self, channel_id: str) -> tuple[str, int] | None:
        """(owner, epoch) of the channel's lease; None when never taken."""
        row = await self._db.fetchone("SELECT owner, epoch FROM leases WHERE channel_id = ?", (channel_id,))
        return None if row is None else (str(row[0]), int(row[1]))


class SqliteStorage:
    """An open SQLite store (:class:`chat.storage.Storage`). Create with :meth:`open`."""

    def __init__(self, db: Database) -> None:
        self.database = db
        self.path = db.path
        self.channels = SqliteChannels(db)
        self.states = SqliteStateLog(db)
        self.transcripts = SqliteTranscripts(db)
        self.admin = SqliteAdmin(db)
        self.leases = SqliteLeases(db)

    @classmethod
    async def open(cls, path: Path, *, check: bool = True) -> SqliteStorage:
        """Open (creating if needed) and migrate the database at ``path``; with ``check``, a
        damaged file is refused first (see :meth:`Database.open`)."""
        return cls(await Database.open(path, check=check))

    async def close(self) -> None:
        """Let writes in flight finish, empty the WAL into the file, and close; never raises."""
        await self.database.close()


class SqliteBackend:
    """:class:`chat.storage.Backend` for SQLite files (``sqlite://`` before the path may be left out)."""

    async def open(self, location: Location, *, check: bool = True) -> SqliteStorage:
        """Open (creating and migrating if needed) the database file at ``location``."""
        return await SqliteStorage.open(_path(location), check=check)

    def integrity_check(self, location: Location) -> list[str]:
        """SQLite's full integrity check of the file; empty when it is sound."""
        return integrity_check(_path(location))

    def backup(self, location: Location, destination: Path) -> None:
        """SQLite's online backup, renamed into place when whole."""
        backup(_path(location), destination)

    def vacuum(self, location: Location) -> tuple[int, int]:
        """Rewrite the file without free pages; returns (bytes before, bytes after)."""
        return vacuum(_path(location))


def _path(location: Location) -> Path:
    return Path(location.removeprefix("sqlite://")) if isinstance(location, str) else location


BACKEND: Backend = SqliteBackend()
