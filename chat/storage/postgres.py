"""The Postgres backend: channels, settings, transcripts, heads, the token log and leases in
Postgres; whole states (megabytes each) in an S3-compatible object store.

Location: ``postgresql://user@host:port/db?objects=s3://bucket/prefix`` (``postgres://`` too; a
password may stand in the URL or in ``PGPASSWORD``). The ``objects`` parameter names the bucket
and the prefix of the object store, which is reached as :mod:`chat.storage.objects` says:
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_REGION``.

Each answered message is one transaction. A whole state's object is written before the row that
names it is committed, and deleted after the row is; what a crash leaves unnamed is deleted by
:meth:`PgAdmin.collect_objects` (run by housekeeping) once older than its grace period. Writes
given a lease's epoch lock the lease row (``SELECT ... FOR UPDATE``) and are stored only under
that epoch. Migrations (``migrations/postgres/``) run at open under an advisory lock, each in one
transaction; every Postgres error becomes a :class:`StoreError` of one line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from chat.errors import StoreError
from chat.storage import Backend, Location
from chat.storage._pg_db import Connection, PgDatabase, PgRepository, Server, check_epoch, ensure_channel
from chat.storage._pg_errors import guard_pg_errors, is_pg_error, pg_error
from chat.storage._pg_states import CHECKPOINTS, OPENINGS, PgStateLog, forget_objects
from chat.storage.records import StateBase, StoredState, Turn, unpack_tokens
from engine.checksums import checksum
from engine.errors import StateMismatchError

__all__ = [
    "BACKEND",
    "PgAdmin",
    "PgBackend",
    "PgChannels",
    "PgLeases",
    "PgStateLog",
    "PgStorage",
    "PgTranscripts",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")


def _settings_object(value: Any, whose: str) -> dict[str, Any]:
    """Stored settings as a dict; settings that do not parse are logged and read as none."""
    if value is None:
        return {}
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError):
        parsed = None
    if not isinstance(parsed, dict):
        log.warning("the stored settings of %s do not parse (%.60r): using the defaults", whose, value)
        return {}
    return parsed


@guard_pg_errors
class PgChannels(PgRepository):
    """:class:`chat.storage.ChannelConfig` in the ``channels``, ``enabled_channels`` and
    ``guild_settings`` tables."""

    async def settings(self, channel_id: str) -> dict[str, Any]:
        """The channel's own settings (empty for a new channel)."""
        value = await self._db.fetchval("SELECT settings FROM channels WHERE channel_id = $1", channel_id)
        return _settings_object(value, f"channel {channel_id}")

    async def set_settings(self, channel_id: str, settings: dict[str, Any]) -> None:
        """Replace the channel's own settings."""

        async def work(conn: Connection) -> None:
            await ensure_channel(conn, channel_id)
            await conn.execute(
                "UPDATE channels SET settings = $2, updated_at = $3 WHERE channel_id = $1",
                channel_id,
                json.dumps(settings, sort_keys=True),
                time.time(),
            )

        await self._db.write(work)

    async def set_place(self, channel_id: str, guild_id: str | None, parent_id: str | None) -> None:
        """Record which server a conversation belongs to and, for a thread, its channel."""

        async def work(conn: Connection) -> None:
            await ensure_channel(conn, channel_id)
            await conn.execute(
                "UPDATE channels SET guild_id = $2, parent_id = $3 WHERE channel_id = $1 "
                "AND (guild_id IS DISTINCT FROM $2 OR parent_id IS DISTINCT FROM $3)",
                channel_id,
                guild_id,
                parent_id,
            )

        await self._db.write(work)

    async def guild_channels(self, guild_id: str) -> list[str]:
        """Conversations of a server that have anything stored, sorted."""
        rows = await self._db.fetch(
            'SELECT channel_id FROM channels WHERE guild_id = $1 ORDER BY channel_id COLLATE "C"', guild_id
        )
        return [str(r[0]) for r in rows]

    async def threads_of(self, channel_id: str) -> list[str]:
        """Conversations in threads of a channel that have anything stored, sorted."""
        rows = await self._db.fetch(
            'SELECT channel_id FROM channels WHERE parent_id = $1 ORDER BY channel_id COLLATE "C"',
            channel_id,
        )
        return [str(r[0]) for r in rows]

    async def enabled(self, guild_id: str | None = None) -> set[str]:
        """Channels where moderators enabled the bot (of one server, when ``guild_id`` is given)."""
        rows = await self._db.fetch(
            "SELECT channel_id FROM enabled_channels WHERE enabled AND ($1::text IS NULL OR guild_id = $1)",
            guild_id,
        )
        return {str(r[0]) for r in rows}

    async def disabled_threads(self) -> set[str]:
        """Threads switched off on their own while their channel is enabled."""
        rows = await self._db.fetch("SELECT channel_id FROM enabled_channels WHERE NOT enabled")
        return {str(r[0]) for r in rows}

    async def set_enabled(
        self, channel_id: str, guild_id: str, enabled: bool, by: str, *, override: bool = False
    ) -> None:
        """Enable or disable the bot in a channel. ``override`` with ``enabled=False`` records a
        thread switched off although its channel is on (without it, disabling forgets the row)."""

        async def work(conn: Connection) -> None:
            if enabled or override:
                await conn.execute(
                    "INSERT INTO enabled_channels (channel_id, guild_id, enabled_by, enabled_at, enabled) "
                    "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (channel_id) DO UPDATE SET "
                    "guild_id = excluded.guild_id, enabled_by = excluded.enabled_by, "
                    "enabled_at = excluded.enabled_at, enabled = excluded.enabled",
                    channel_id,
                    guild_id,
                    by,
                    time.time(),
                    enabled,
                )
            else:
                await conn.execute("DELETE FROM enabled_channels WHERE channel_id = $1", channel_id)

        await self._db.write(work)

    async def guild_settings(self, guild_id: str) -> dict[str, Any]:
        """A server's own settings (empty when none were set)."""
        value = await self._db.fetchval("SELECT settings FROM guild_settings WHERE guild_id = $1", guild_id)
        return _settings_object(value, f"server {guild_id}")

    async def set_guild_settings(self, guild_id: str, settings: dict[str, Any]) -> None:
        """Replace a server's own settings."""

        async def work(conn: Connection) -> None:
            await conn.execute(
                "INSERT INTO guild_settings VALUES ($1, $2, $3) ON CONFLICT (guild_id) DO UPDATE SET "
                "settings = excluded.settings, updated_at = excluded.updated_at",
                guild_id,
                json.dumps(settings, sort_keys=True),
                time.time(),
            )

        await self._db.write(work)

    async def forget_guild(self, guild_id: str) -> None:
        """Delete a server's own settings (its channels are purged one by one)."""

        async def work(conn: Connection) -> None:
            await conn.execute("DELETE FROM guild_settings WHERE guild_id = $1", guild_id)

        await self._db.write(work)


@guard_pg_errors
class PgTranscripts(PgRepository):
    """:class:`chat.storage.Transcripts` in the ``turns`` table."""

    async def turns(self, channel_id: str) -> list[Turn]:
        """Every stored turn of a channel, oldest first."""
        rows = await self._db.fetch(
            "SELECT command, user_text, reply_text, reply_tokens FROM turns "
            "WHERE channel_id = $1 ORDER BY id",
            channel_id,
        )
        return [Turn(str(r[0]), str(r[1]), str(r[2]), int(r[3])) for r in rows]

    async def delete_before(self, before: float, batch: int = 5000) -> int:
        """Delete the transcript lines written before ``before`` (a time), ``batch`` lines a
        transaction. Returns how many lines went."""
        deleted = 0
        while True:

            async def work(conn: Connection) -> int:
                status = await conn.execute(
                    "DELETE FROM turns WHERE id IN "
                    "(SELECT id FROM turns WHERE created_at < $1 ORDER BY id LIMIT $2)",
                    before,
                    batch,
                )
                return int(str(status).rsplit(" ", 1)[-1])

            count: int = await self._db.write(work)
            deleted += count
            if count < batch:
                return deleted


_COUNTS = {
    "channels": "SELECT count(*) FROM channels",
    "enabled_channels": "SELECT count(*) FROM enabled_channels WHERE enabled",
    "states": "SELECT count(*) FROM states",
    "log_tokens": "SELECT coalesce(sum(length(tokens)), 0) / 4 FROM states",
    "checkpoints": "SELECT count(*) FROM checkpoints",
    "checkpoint_bytes": "SELECT coalesce(sum(size), 0) FROM checkpoints",
    "shared_snapshots": "SELECT count(*) FROM init_snapshots",
    "shared_snapshot_bytes": "SELECT coalesce(sum(size), 0) FROM init_snapshots",
    "heads": "SELECT count(*) FROM heads",
    "rebuild_pending": "SELECT count(*) FROM channels WHERE rebuild",
    "turns": "SELECT count(*) FROM turns",
    "leases": "SELECT count(*) FROM leases",
    "database_bytes": "SELECT pg_database_size(current_database())",
}


@guard_pg_errors
class PgAdmin(PgRepository):
    """:class:`chat.storage.Administration` over the database and its objects."""

    async def stats(self) -> dict[str, int]:
        """Counts and sizes: rows of each kind, the bytes of whole states, the database's size."""
        counts: dict[str, int] = {"schema_version": await self.schema_version()}
        for name, sql in _COUNTS.items():
            counts[name] = int(await self._db.fetchval(sql) or 0)
        return counts

    async def schema_version(self) -> int:
        """The migration the database is at."""
        return int(await self._db.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))

    async def purge_channel(self, channel_id: str, *, epoch: int | None = None) -> bool:
        """Delete everything stored for a channel (its states and their objects, transcript,
        settings, enabling). Its lease stays; ``epoch`` fences the purge."""

        async def work(conn: Connection) -> tuple[bool, list[str]]:
            await check_epoch(conn, channel_id, epoch)
            rows = await conn.fetch(
                "DELETE FROM checkpoints k USING states s WHERE s.id = k.state_id AND s.channel_id = $1 "
                "RETURNING k.object_key",
                channel_id,
            )
            await conn.execute("DELETE FROM heads WHERE channel_id = $1", channel_id)
            await conn.execute("DELETE FROM states WHERE channel_id = $1", channel_id)
            status = await conn.execute("DELETE FROM channels WHERE channel_id = $1", channel_id)
            enabled = await conn.execute("DELETE FROM enabled_channels WHERE channel_id = $1", channel_id)
            found = str(status) != "DELETE 0" or str(enabled) != "DELETE 0"
            return found, [str(r[0]) for r in rows]

        found, keys = await self._db.write(work)
        await forget_objects(self._db, keys, "a purged channel")
        return bool(found)

    async def idle_channels(self, before: float, limit: int) -> list[str]:
        """Up to ``limit`` channels not used since ``before`` that still keep more than their chat
        state (oldest first)."""
        rows = await self._db.fetch(
            "SELECT c.channel_id FROM channels c WHERE c.updated_at < $1 AND EXISTS "
            "(SELECT 1 FROM heads h WHERE h.channel_id = c.channel_id AND h.name <> 'chat') "
            "ORDER BY c.updated_at LIMIT $2",
            before,
            limit,
        )
        return [str(r[0]) for r in rows]

    async def checkpoint_usage(self) -> int:
        """Bytes of whole states stored for channels (shared opening states not counted)."""
        return int(await self._db.fetchval("SELECT coalesce(sum(size), 0) FROM checkpoints"))

    async def checkpointed_channels(self, limit: int) -> list[tuple[str, int, float]]:
        """(channel, checkpoint bytes, last use) of the least recently used channels that hold
        checkpoints."""
        rows = await self._db.fetch(
            "SELECT s.channel_id, sum(k.size), max(c.updated_at) FROM checkpoints k "
            "JOIN states s ON s.id = k.state_id JOIN channels c ON c.channel_id = s.channel_id "
            "GROUP BY s.channel_id ORDER BY max(c.updated_at) LIMIT $1",
            limit,
        )
        return [(str(r[0]), int(r[1]), float(r[2])) for r in rows]

    async def flush(self) -> None:
        """Nothing to do: Postgres has made each transaction durable when it committed."""

    async def collect_objects(self, written_before: float) -> int:
        """Delete the objects of whole states that no row names and that were written before
        ``written_before``; returns how many went."""
        deleted = 0
        for under in (CHECKPOINTS, OPENINGS):
            for page in await self._db.objects.listing(under):
                old = [o.key for o in page if o.written_at < written_before]
                if not old:
                    continue
                rows = await self._db.fetch(
                    "SELECT object_key FROM checkpoints WHERE object_key = ANY($1::text[]) UNION "
                    "SELECT object_key FROM init_snapshots WHERE object_key = ANY($1::text[])",
                    old,
                )
                named = {str(r[0]) for r in rows}
                orphans = [k for k in old if k not in named]
                if orphans:
                    await self._db.objects.delete(orphans)
                    deleted += len(orphans)
        if deleted:
            log.info("deleted %d objects of whole states that no row names", deleted)
        return deleted


@guard_pg_errors
class PgLeases(PgRepository):
    """:class:`chat.storage.Leases` in the ``leases`` table."""

    async def take(self, channel_id: str, owner: str) -> int:
        """Make ``owner`` the channel's holder and bump its epoch; returns the new epoch. A take
        waits for a write holding the lease row under the previous epoch."""

        async def work(conn: Connection) -> int:
            return int(
                await conn.fetchval(
                    "INSERT INTO leases (channel_id, owner, epoch, taken_at) VALUES ($1, $2, 1, $3) "
                    "ON CONFLICT (channel_id) DO UPDATE SET owner = excluded.owner, "
                    "epoch = leases.epoch + 1, taken_at = excluded.taken_at RETURNING epoch",
                    channel_id,
                    owner,
                    time.time(),
                )
            )

        epoch: int = await self._db.write(work)
        return epoch

    async def holder(self, channel_id: str) -> tuple[str, int] | None:
        """(owner, epoch) of the channel's lease; None when never taken."""
        row = await self._db.fetchrow("SELECT owner, epoch FROM leases WHERE channel_id = $1", channel_id)
        return None if row is None else (str(row[0]), int(row[1]))


class PgStorage:
    """An open Postgres store (:class:`chat.storage.Storage`). Create with :meth:`open`."""

    def __init__(self, db: PgDatabase) -> None:
        self.database = db
        self.server = db.server
        self.channels = PgChannels(db)
        self.states = PgStateLog(db)
        self.transcripts = PgTranscripts(db)
        self.admin = PgAdmin(db)
        self.leases = PgLeases(db)

    @classmethod
    async def open(cls, location: str) -> PgStorage:
        """Connect to the database at ``location``, migrate it, and reach its object store."""
        return cls(await PgDatabase.open(location))

    async def close(self) -> None:
        """Let writes in flight finish and close; never raises."""
        await self.database.close()


class PgBackend:
    """:class:`chat.storage.Backend` for ``postgresql://...?objects=s3://bucket/prefix``."""

    async def open(self, location: Location, *, check: bool = True) -> PgStorage:
        """Open (migrating if needed) the store at ``location``. Postgres checks its own pages as
        it reads them, so ``check`` has nothing more to do here."""
        return await PgStorage.open(str(location))

    def integrity_check(self, location: Location) -> list[str]:
        """A full check of the store (``db check``): every state row against its checksum, every
        head's log back to a stored state, and every whole state's object present and matching
        its checksum. Empty when it is sound."""
        return _run(_integrity_check(str(location)), str(location), "the check")

    def backup(self, location: Location, destination: Path) -> None:
        """Refused: a Postgres store is backed up with the server's own tools."""
        server = Server.parse(str(location))
        raise StoreError(
            f"`db backup` copies SQLite files only: back up this Postgres store with `pg_dump -Fc -h "
            f"{server.host} -p {server.port} {server.database} > {destination}`, and its whole states by "
            f"copying {server.objects} (e.g. `aws s3 sync {server.objects} <folder>`)"
        )

    def vacuum(self, location: Location) -> tuple[int, int]:
        """Postgres's VACUUM (FULL, ANALYZE) of the store's tables, and the objects no row names
        collected; returns (database bytes before, after)."""
        return _run(_vacuum(str(location)), str(location), "vacuum")


def _run(work: Coroutine[Any, Any, _T], location: str, doing: str) -> _T:
    """Run a coroutine for a synchronous caller (the ``db`` commands), on a loop of its own; a
    Postgres error comes back as a :class:`StoreError`."""
    try:
        return asyncio.run(work)
    except StoreError:
        raise
    except Exception as exc:
        if is_pg_error(exc):
            raise pg_error(exc, Server.parse(location), doing) from exc
        raise


async def _integrity_check(location: str) -> list[str]:
    store = await PgStorage.open(location)
    db = store.database
    problems: list[str] = []
    try:
        for row in await db.fetch(
            "SELECT s.id, s.channel_id, s.parent_id, s.base, s.preset_key, s.tokens, s.replay, s.meta, "
            "s.model_fingerprint, s.checksum FROM states s ORDER BY s.id"
        ):
            try:
                StoredState(
                    id=int(row[0]),
                    channel_id=str(row[1]),
                    parent_id=None if row[2] is None else int(row[2]),
                    base=StateBase(row[3]),
                    preset_key=str(row[4]),
                    tokens=unpack_tokens(bytes(row[5])),
                    replay=int(row[6]),
                    meta={},
                    fingerprint=str(row[8]),
                    checksum=None if row[9] is None else str(row[9]),
                    raw_tokens=bytes(row[5]),
                    raw_meta=str(row[7]),
                ).verify()
            except StateMismatchError as exc:
                problems.append(str(exc))
        for row in await db.fetch(
            "SELECT s.id FROM states s WHERE s.base = 'parent' AND NOT EXISTS "
            "(SELECT 1 FROM states p WHERE p.id = s.parent_id)"
        ):
            problems.append(f"stored state {row[0]} lost a link of its log")
        for row in await db.fetch(
            "SELECT s.id FROM states s WHERE s.base = 'checkpoint' AND NOT EXISTS "
            "(SELECT 1 FROM checkpoints k WHERE k.state_id = s.id)"
        ):
            problems.append(f"the checkpoint of stored state {row[0]} is missing")
        for row in await db.fetch(
            "SELECT 'the checkpoint of stored state ' || state_id, object_key, checksum FROM checkpoints "
            "UNION ALL SELECT 'the opening state of ' || preset_key, object_key, checksum FROM init_snapshots"
        ):
            data = await db.objects.get(str(row[1]))
            if data is None:
                problems.append(f"{row[0]} is missing from the object store ({row[1]})")
            elif await asyncio.to_thread(checksum, data) != row[2]:
                problems.append(f"{row[0]} failed its checksum ({row[1]})")
            if len(problems) >= 20:
                break
    finally:
        await store.close()
    return problems[:20]


async def _vacuum(location: str) -> tuple[int, int]:
    store = await PgStorage.open(location)
    db = store.database
    try:
        before = int(await db.fetchval("SELECT pg_database_size(current_database())"))
        async with db.pool.acquire() as conn:
            await conn.execute(
                "VACUUM (FULL, ANALYZE) channels, enabled_channels, guild_settings, states, checkpoints, "
                "heads, init_snapshots, turns, leases"
            )
        after = int(await db.fetchval("SELECT pg_database_size(current_database())"))
        await store.admin.collect_objects(time.time() - 3600)
    finally:
        await store.close()
    return before, after


BACKEND: Backend = PgBackend()
