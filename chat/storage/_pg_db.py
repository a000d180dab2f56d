"""The Postgres side of the store: the location, the connection pool, migrations, and write
transactions that a cancelled task never leaves half done."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from chat.errors import FencedError, StoreError
from chat.storage._pg_errors import is_pg_error, pg_error
from chat.storage.objects import ObjectStore
from migrations import bundled

__all__ = [
    "MIGRATION_LOCK",
    "Connection",
    "PgDatabase",
    "PgRepository",
    "Server",
    "check_epoch",
    "ensure_channel",
    "migrate",
    "migrations",
]

log = logging.getLogger(__name__)
MIGRATION_LOCK = 0x72776B76  # the advisory lock two processes migrating at once take in turn
Connection = Any  # asyncpg.Connection (asyncpg has no type hints)
_T = TypeVar("_T")


@dataclass(frozen=True)
class Server:
    """A Postgres location taken apart: where to connect, and the object store beside it."""

    dsn: str  # without the ``objects`` parameter
    host: str
    port: int
    database: str
    user: str
    objects: str  # s3://bucket/prefix

    @classmethod
    def parse(cls, location: str) -> Server:
        """``postgresql://user@host:port/db?objects=s3://bucket/prefix`` (``postgres://`` too)."""
        parts = urlsplit(location)
        if parts.scheme not in ("postgresql", "postgres"):
            raise StoreError(f"not a Postgres location: {location}", "cannot-open")
        query = parse_qsl(parts.query, keep_blank_values=True)
        objects = [v for k, v in query if k == "objects"]
        if not objects or not objects[0]:
            raise StoreError(
                "a Postgres location needs its object store for whole states: add "
                "?objects=s3://bucket/prefix to RWKV_DISCORD_DB",
                "cannot-open",
            )
        rest = urlencode([(k, v) for k, v in query if k != "objects"])
        dsn = urlunsplit((parts.scheme, parts.netloc, parts.path, rest, parts.fragment))
        try:
            port = parts.port or 5432
        except ValueError as exc:
            raise StoreError(f"the port in {location} is not a number", "cannot-open") from exc
        return cls(
            dsn=dsn,
            host=parts.hostname or "localhost",
            port=port,
            database=parts.path.lstrip("/") or (parts.username or "postgres"),
            user=parts.username or "postgres",
            objects=objects[0],
        )


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every Postgres migration (``migrations/postgres/``), in order."""
    try:
        return bundled("postgres")
    except ValueError as exc:
        raise StoreError(f"Postgres migrations {exc}") from exc


async def migrate(conn: Connection, server: Server) -> None:
    """Apply the migrations the database lacks, each in one transaction, under an advisory lock
    so that two processes starting at once apply each migration once."""
    available = migrations()
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version "
            "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
        )
        current = int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))
        if current > len(available):
            raise StoreError(
                f"the Postgres database {server.database} has schema version {current}, newer than this "
                f"program knows ({len(available)}): upgrade rwkv-discord or use another database",
                "schema",
            )
        for version, name, sql in available[current:]:
            try:
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_version VALUES ($1, $2, $3)", version, name, time.time()
                    )
            except Exception as exc:
                if is_pg_error(exc):
                    raise pg_error(exc, server, f"migration {name}") from exc
                raise
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


class PgDatabase:
    """The pool and object store of an open Postgres store. Create with :meth:`open`."""

    def __init__(self, pool: Any, server: Server, objects: ObjectStore) -> None:
        self.pool = pool
        self.server = server
        self.objects = objects
        self._inflight: set[asyncio.Future[Any]] = set()  # shielded writes still running

    @classmethod
    async def open(cls, location: str) -> PgDatabase:
        """Connect, migrate, and check that the object store's bucket can be reached."""
        try:
            import asyncpg
        except ImportError as exc:
            raise StoreError(
                "the Postgres backend needs asyncpg: pip install 'rwkv-discord[cluster]'", "cannot-open"
            ) from exc
        server = Server.parse(location)
        objects = ObjectStore(server.objects)
        try:
            pool = await asyncpg.create_pool(server.dsn, min_size=1, max_size=4, timeout=10)
        except Exception as exc:
            if is_pg_error(exc):
                raise pg_error(exc, server, "connecting") from exc
            raise
        try:
            async with pool.acquire() as conn:
                await migrate(conn, server)
            await objects.check()
        except BaseException as exc:
            await pool.close()
            objects.close()
            if isinstance(exc, Exception) and is_pg_error(exc):
                raise pg_error(exc, server, "opening it") from exc
            raise
        return cls(pool, server, objects)

    async def close(self) -> None:
        """Let writes in flight finish and close; never raises."""
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=10)
        try:
            await asyncio.wait_for(self.pool.close(), timeout=10)
        except Exception as exc:
            log.warning("closing the Postgres pool of %s: %s", self.server.database, exc)
            self.pool.terminate()
        self.objects.close()

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        """Every row of a query."""
        async with self.pool.acquire() as conn:
            rows: list[Any] = await conn.fetch(sql, *args)
            return rows

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        """The first row of a query, or None."""
        async with self.pool.acquire() as conn:
            return await conn.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first value of a query, or None."""
        async with self.pool.acquire() as conn:
            return await conn.fetchval(sql, *args)

    async def write(self, work: Callable[[Connection], Awaitable[_T]]) -> _T:
        """Run ``work`` in one transaction on a connection of its own, shielded from cancellation:
        a transaction that has started always ends (COMMIT, or ROLLBACK on error) even when the
        task that asked for it is cancelled. Returns what ``work`` returns."""

        async def transaction() -> _T:
            async with self.pool.acquire() as conn, conn.transaction():
                return await work(conn)

        future = asyncio.ensure_future(transaction())
        self._inflight.add(future)
        future.add_done_callback(self._inflight.discard)
        try:
            return await asyncio.shield(future)
        except StoreError:
            raise
        except Exception as exc:
            if is_pg_error(exc):
                raise pg_error(exc, self.server, "saving") from exc
            raise


async def check_epoch(conn: Connection, channel_id: str, epoch: int | None) -> None:
    """Inside a transaction: lock the channel's lease row and raise :class:`FencedError` unless
    ``epoch`` (when given) is its epoch; a take waits until the transaction ends."""
    if epoch is None:
        return
    current = await conn.fetchval("SELECT epoch FROM leases WHERE channel_id = $1 FOR UPDATE", channel_id)
    if current is None or int(current) != epoch:
        raise FencedError(channel_id, epoch, None if current is None else int(current))


async def ensure_channel(conn: Connection, channel_id: str) -> None:
    """The channel's row (inside a transaction): every other row of a channel needs it."""
    now = time.time()
    await conn.execute(
        "INSERT INTO channels (channel_id, created_at, updated_at) VALUES ($1, $2, $2) "
        "ON CONFLICT (channel_id) DO NOTHING",
        channel_id,
        now,
    )


class PgRepository:
    """What each Postgres repository shares: the open database (``server`` names it in errors)."""

    def __init__(self, db: PgDatabase) -> None:
        self._db = db
        self.server = db.server
