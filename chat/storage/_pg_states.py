"""The state log in Postgres: state rows, heads and opening states in tables, the bytes of whole
states in the object store.

A whole state's object is written before the transaction that adds the row naming it, and
deleted after the transaction that deletes that row; an object left behind by a crash or a
failed transaction in between is found by :meth:`PgAdmin.collect_objects`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote

from chat.errors import FencedError, StoreError
from chat.storage._pg_db import Connection, PgDatabase, PgRepository, check_epoch, ensure_channel
from chat.storage._pg_errors import guard_pg_errors
from chat.storage.records import (
    STATE_COLUMNS,
    HeadName,
    NewRef,
    NewState,
    StoredState,
    Turn,
    decode_snapshot,
    encode_snapshot,
    state_from_row,
    state_row,
    verified_chain,
)
from engine.errors import StateMismatchError

if TYPE_CHECKING:
    from engine.state import Snapshot

__all__ = ["CHECKPOINTS", "OPENINGS", "PgStateLog", "collect", "forget_objects"]

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints/"  # object keys of channels' whole states: checkpoints/<channel>/<uuid>-<sum>
OPENINGS = "openings/"  # object keys of shared opening states: openings/<preset>/<uuid>-<sum>
_Blob = tuple[str, int, str] | None  # a whole state's object key, size and checksum


def _object_key(under: str, name: str, digest: str) -> str:
    return f"{under}{quote(name, safe='')}/{uuid.uuid4().hex}-{digest}"


def _rolled_back(exc: BaseException) -> bool:
    """Whether a failed transaction surely stored nothing (a refused change, not a lost
    connection that may have committed)."""
    if isinstance(exc, FencedError):
        return True
    cause = exc.__cause__ if isinstance(exc, StoreError) and exc.__cause__ is not None else exc
    if isinstance(cause, StoreError):
        return True
    state = str(getattr(cause, "sqlstate", "") or "")
    return bool(state) and not state.startswith(("08", "57P", "XX"))


async def forget_objects(db: PgDatabase, keys: list[str], why: str) -> None:
    """Delete objects no row names any more; on failure they wait for the next collection."""
    if not keys:
        return
    try:
        await db.objects.delete(keys)
    except StoreError as exc:
        log.warning("%s: %d objects left for the next collection (%s)", why, len(keys), exc)


async def collect(conn: Connection, channel_id: str) -> list[str]:
    """Delete the channel's states that no head needs (inside a transaction); returns the keys of
    the objects of the whole states that went."""
    rows = await conn.fetch(
        "WITH RECURSIVE live(id) AS (SELECT state_id FROM heads WHERE channel_id = $1 UNION "
        "SELECT s.parent_id FROM states s JOIN live ON s.id = live.id WHERE s.base = 'parent') "
        "SELECT id FROM states WHERE channel_id = $1 "
        "AND id NOT IN (SELECT id FROM live WHERE id IS NOT NULL)",
        channel_id,
    )
    dead = [int(r[0]) for r in rows]
    if not dead:
        return []
    gone = await conn.fetch(
        "DELETE FROM checkpoints WHERE state_id = ANY($1::bigint[]) RETURNING object_key", dead
    )
    await conn.execute("DELETE FROM states WHERE id = ANY($1::bigint[])", dead)
    return [str(r[0]) for r in gone]


@guard_pg_errors
class PgStateLog(PgRepository):
    """:class:`chat.storage.StateLog` in the ``states``, ``checkpoints``, ``heads`` and
    ``init_snapshots`` tables, whole states in the object store."""

    async def heads(self, channel_id: str) -> dict[HeadName, int]:
        """The channel's named states and their ids."""
        rows = await self._db.fetch("SELECT name, state_id FROM heads WHERE channel_id = $1", channel_id)
        return {HeadName(r[0]): int(r[1]) for r in rows}

    async def state(self, state_id: int) -> StoredState:
        """One stored state's row (raises StateMismatchError when missing or damaged)."""
        row = await self._db.fetchrow(f"SELECT {STATE_COLUMNS} FROM states s WHERE s.id = $1", state_id)
        if row is None:
            raise StateMismatchError(f"stored state {state_id} is missing")
        state = state_from_row(row)
        state.verify()
        return state

    async def chain(self, state_id: int) -> list[StoredState]:
        """The states needed to rebuild ``state_id``: its stored base first, the state itself last.

        Raises :class:`StateMismatchError` when a link is missing or fails its checksum.
        """
        rows = await self._db.fetch(
            "WITH RECURSIVE up(id, depth) AS (SELECT $1::bigint, 0 UNION ALL "
            "SELECT s.parent_id, up.depth + 1 FROM states s JOIN up ON s.id = up.id "
            "WHERE s.base = 'parent') "
            f"SELECT {STATE_COLUMNS}, up.depth FROM up LEFT JOIN states s ON s.id = up.id "
            "ORDER BY up.depth DESC",
            state_id,
        )
        return verified_chain(state_id, rows)

    async def load_checkpoint(self, state_id: int, fingerprint: str) -> Snapshot:
        """The whole state stored for ``state_id`` (raises StateMismatchError if damaged or missing)."""
        row = await self._db.fetchrow(
            "SELECT object_key, checksum FROM checkpoints WHERE state_id = $1", state_id
        )
        if row is None:
            raise StateMismatchError(f"the checkpoint of stored state {state_id} is missing")
        data = await self._db.objects.get(str(row[0]))
        if data is None:
            raise StateMismatchError(
                f"the checkpoint of stored state {state_id} is missing from the object store"
            )
        return await asyncio.to_thread(decode_snapshot, data, str(row[1]), fingerprint)

    async def rebuild_pending(self, channel_id: str) -> bool:
        """True when the channel's state was dropped and must be re-read from its transcript."""
        return bool(await self._db.fetchval("SELECT rebuild FROM channels WHERE channel_id = $1", channel_id))

    async def write_states(
        self,
        channel_id: str,
        new: Sequence[NewState],
        heads: Mapping[str, int | NewRef | None],
        turn: Turn | None = None,
        *,
        epoch: int | None = None,
    ) -> list[int]:
        """One transaction: add states, point heads at them (None removes a head), add the turn.

        The objects of whole states are written first, the transaction after; states no head
        needs any more are deleted in it, and their objects after it. With ``epoch``, nothing is
        stored unless it is the epoch of the channel's lease. Returns the new states' ids.
        """
        known = {str(h) for h in HeadName}
        for name in heads:
            if str(name) not in known:
                raise StoreError(f"there is no head named {name!r} (known: {', '.join(sorted(known))})")
        blobs: list[_Blob] = []
        written: list[str] = []
        try:
            for item in new:
                if item.checkpoint is None:
                    blobs.append(None)
                    continue
                data, digest = await asyncio.to_thread(encode_snapshot, item.checkpoint)
                key = _object_key(CHECKPOINTS, channel_id, digest)
                written.append(key)  # before the put: a put cut short may still have landed
                await self._db.objects.put(key, data)
                blobs.append((key, len(data), digest))
        except BaseException:
            await asyncio.shield(forget_objects(self._db, written, "a turn not stored"))
            raise
        now = time.time()

        async def work(conn: Connection) -> tuple[list[int], list[str]]:
            await check_epoch(conn, channel_id, epoch)
            await ensure_channel(conn, channel_id)
            ids: list[int] = []
            for item, blob in zip(new, blobs, strict=True):
                ids.append(await _insert_state(conn, channel_id, item, blob, ids=ids, now=now))
            for name, target in heads.items():
                if target is None:
                    await conn.execute(
                        "DELETE FROM heads WHERE channel_id = $1 AND name = $2", channel_id, str(name)
                    )
                    continue
                await conn.execute(
                    "INSERT INTO heads (channel_id, name, state_id) VALUES ($1, $2, $3) "
                    "ON CONFLICT (channel_id, name) DO UPDATE SET state_id = excluded.state_id",
                    channel_id,
                    str(name),
                    ids[target.index] if isinstance(target, NewRef) else target,
                )
            if turn is not None:
                await conn.execute(
                    "INSERT INTO turns (channel_id, command, user_text, reply_text, reply_tokens, "
                    "model_fingerprint, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    channel_id,
                    turn.command,
                    turn.user_text,
                    turn.reply_text,
                    turn.reply_tokens,
                    new[-1].fingerprint if new else "",
                    now,
                )
            await conn.execute(
                "UPDATE channels SET updated_at = $2, rebuild = rebuild AND $3 WHERE channel_id = $1",
                channel_id,
                now,
                heads.get(HeadName.CHAT) is None,  # a chat state again ends a pending rebuild
            )
            return ids, await collect(conn, channel_id)

        try:
            ids, dead = await self._db.write(work)
        except BaseException as exc:
            if _rolled_back(exc):
                await forget_objects(self._db, written, "a turn not stored")
            raise
        await forget_objects(self._db, dead, "states no head needs")
        return ids

    async def drop_states(
        self,
        channel_id: str,
        keep: tuple[str, ...] = (),
        *,
        unused_since: float,
        rebuild: bool = False,
        epoch: int | None = None,
    ) -> bool:
        """Remove every head but ``keep`` and the states only they needed, if the channel was not
        used after ``unused_since``; ``rebuild`` marks the conversation to be re-read from its
        transcript at its next message; ``epoch`` fences it. Returns whether anything was done."""

        async def work(conn: Connection) -> list[str] | None:
            await check_epoch(conn, channel_id, epoch)
            used = await conn.fetchval(
                "SELECT updated_at FROM channels WHERE channel_id = $1 FOR UPDATE", channel_id
            )
            if used is None or float(used) > unused_since:
                return None
            await conn.execute(
                "DELETE FROM heads WHERE channel_id = $1 AND NOT (name = ANY($2::text[]))",
                channel_id,
                [str(k) for k in keep],
            )
            if rebuild:
                await conn.execute("UPDATE channels SET rebuild = true WHERE channel_id = $1", channel_id)
            return await collect(conn, channel_id)

        dead: list[str] | None = await self._db.write(work)
        if dead is None:
            return False
        await forget_objects(self._db, dead, "dropped states")
        return True

    async def load_opening(self, preset_key: str, fingerprint: str) -> Snapshot | None:
        """The shared opening state of a preset for a model, if it was stored (and is whole)."""
        row = await self._db.fetchrow(
            "SELECT object_key, checksum FROM init_snapshots "
            "WHERE preset_key = $1 AND model_fingerprint = $2",
            preset_key,
            fingerprint,
        )
        if row is None:
            return None
        data = await self._db.objects.get(str(row[0]))
        if data is None:
            return None  # recomputed by the caller and stored again
        try:
            return await asyncio.to_thread(decode_snapshot, data, str(row[1]), fingerprint)
        except StateMismatchError:
            return None

    async def save_opening(self, preset_key: str, snapshot: Snapshot) -> None:
        """Store the shared opening state of a preset (its object first, then the row)."""
        data, digest = await asyncio.to_thread(encode_snapshot, snapshot)
        key = _object_key(OPENINGS, preset_key, digest)
        await self._db.objects.put(key, data)

        async def work(conn: Connection) -> list[str]:
            old = await conn.fetch(
                "SELECT object_key FROM init_snapshots WHERE preset_key = $1 AND model_fingerprint = $2 "
                "FOR UPDATE",
                preset_key,
                snapshot.fingerprint,
            )
            await conn.execute(
                "INSERT INTO init_snapshots VALUES ($1, $2, $3, $4, $5, $6) "
                "ON CONFLICT (preset_key, model_fingerprint) DO UPDATE SET object_key = excluded.object_key, "
                "size = excluded.size, checksum = excluded.checksum, created_at = excluded.created_at",
                preset_key,
                snapshot.fingerprint,
                key,
                len(data),
                digest,
                time.time(),
            )
            return [str(r[0]) for r in old]

        try:
            replaced: list[str] = await self._db.write(work)
        except BaseException as exc:
            if _rolled_back(exc):
                await forget_objects(self._db, [key], "an opening state not stored")
            raise
        await forget_objects(self._db, replaced, "a replaced opening state")


async def _insert_state(
    conn: Connection, channel_id: str, item: NewState, blob: _Blob, *, ids: list[int], now: float
) -> int:
    """Add one state row (and its checkpoint's row); ``ids`` are those added before it in the call."""
    row = state_row(channel_id, item, ids, whole=blob is not None)
    state_id = int(
        await conn.fetchval(
            "INSERT INTO states (channel_id, parent_id, base, preset_key, tokens, replay, meta, "
            "model_fingerprint, checksum, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
            "RETURNING id",
            channel_id,
            row.parent_id,
            row.base,
            item.preset_key,
            row.tokens,
            row.replay,
            row.meta,
            item.fingerprint,
            row.checksum,
            now,
        )
    )
    if blob is not None:
        await conn.execute(
            "INSERT INTO checkpoints (state_id, object_key, size, checksum) VALUES ($1, $2, $3, $4)",
            state_id,
            *blob,
        )
    return state_id
