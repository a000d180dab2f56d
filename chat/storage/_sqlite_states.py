"""The state log in SQLite (migration V3): state rows, checkpoints, heads, opening states."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from chat.storage._sqlite_db import Database, Repository
from chat.storage._sqlite_errors import guard_sqlite_errors
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

__all__ = ["SqliteStateLog", "add_turn"]

_Blob = tuple[bytes, str] | None  # a checkpoint's bytes and checksum


async def add_turn(db: Database, channel_id: str, turn: Turn, fingerprint: str, now: float) -> None:
    """Add a line to the transcript (inside a write transaction)."""
    await db.db.execute(
        "INSERT INTO turns (channel_id, command, user_text, reply_text, reply_tokens, "
        "model_fingerprint, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (channel_id, turn.command, turn.user_text, turn.reply_text, turn.reply_tokens, fingerprint, now),
    )


@guard_sqlite_errors
class SqliteStateLog(Repository):
    """:class:`chat.storage.StateLog` in the ``states``, ``checkpoints``, ``heads`` and
    ``init_snapshots`` tables."""

    async def heads(self, channel_id: str) -> dict[HeadName, int]:
        """The channel's named states and their ids."""
        rows = await self._db.fetchall("SELECT name, state_id FROM heads WHERE channel_id = ?", (channel_id,))
        return {HeadName(r[0]): int(r[1]) for r in rows}

    async def state(self, state_id: int) -> StoredState:
        """One stored state's row (raises StateMismatchError when missing or damaged)."""
        row = await self._db.fetchone(f"SELECT {STATE_COLUMNS} FROM states s WHERE s.id = ?", (state_id,))
        if row is None:
            raise StateMismatchError(f"stored state {state_id} is missing")
        state = state_from_row(row)
        state.verify()
        return state

    async def chain(self, state_id: int) -> list[StoredState]:
        """The states needed to rebuild ``state_id``: its stored base first, the state itself last.

        Raises :class:`StateMismatchError` when a link is missing or fails its checksum.
        """
        rows = await self._db.fetchall(
            "WITH RECURSIVE up(id, depth) AS (SELECT ?, 0 UNION ALL "
            "SELECT s.parent_id, up.depth + 1 FROM states s JOIN up ON s.id = up.id "
            "WHERE s.base = 'parent') "
            f"SELECT {STATE_COLUMNS}, up.depth FROM up LEFT JOIN states s ON s.id = up.id "
            "ORDER BY up.depth DESC",
            (state_id,),
        )
        return verified_chain(state_id, rows)

    async def load_checkpoint(self, state_id: int, fingerprint: str) -> Snapshot:
        """The whole state stored for ``state_id`` (raises StateMismatchError if damaged)."""
        row = await self._db.fetchone(
            "SELECT data, checksum FROM checkpoints WHERE state_id = ?", (state_id,)
        )
        if row is None:
            raise StateMismatchError(f"the checkpoint of stored state {state_id} is missing")
        return await asyncio.to_thread(decode_snapshot, bytes(row[0]), row[1], fingerprint)

    async def rebuild_pending(self, channel_id: str) -> bool:
        """True when the channel's state was dropped and must be re-read from its transcript."""
        row = await self._db.fetchone("SELECT rebuild FROM channels WHERE channel_id = ?", (channel_id,))
        return bool(row and row[0])

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

        States no head needs any more (directly, or as a link of a head's log back to its
        nearest stored state) are deleted in the same transaction. With ``epoch``, nothing is
        stored unless it is the epoch of the channel's lease. Returns the new states' ids.
        """
        encoded = await asyncio.to_thread(
            lambda: [encode_snapshot(n.checkpoint) if n.checkpoint is not None else None for n in new]
        )
        now = time.time()
        ids: list[int] = []

        async def work() -> None:
            ids.clear()
            await self._db.check_epoch(channel_id, epoch)
            await self._db.ensure_channel(channel_id)
            for item, blob in zip(new, encoded, strict=True):
                ids.append(await self._insert_state(channel_id, item, blob, ids, now))
            await self._point_heads(channel_id, heads, ids)
            if turn is not None:
                await add_turn(self._db, channel_id, turn, new[-1].fingerprint if new else "", now)
            await self._db.db.execute(
                "UPDATE channels SET updated_at = ? WHERE channel_id = ?", (now, channel_id)
            )
            if heads.get(HeadName.CHAT) is not None:  # the conversation has a state again
                await self._db.db.execute(
                    "UPDATE channels SET rebuild = 0 WHERE channel_id = ?", (channel_id,)
                )
            await self._collect(channel_id)

        await self._db.write(work)
        return list(ids)

    async def _insert_state(
        self, channel_id: str, item: NewState, blob: _Blob, ids: list[int], now: float
    ) -> int:
        """Add one state row (and its checkpoint); ``ids`` are those added before it in the call."""
        row = state_row(channel_id, item, ids, whole=blob is not None)
        cursor = await self._db.db.execute(
            "INSERT INTO states (channel_id, parent_id, base, preset_key, tokens, replay, meta, "
            "model_fingerprint, checksum, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
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
            ),
        )
        assert cursor.lastrowid is not None
        state_id = int(cursor.lastrowid)
        if blob is not None:
            await self._db.db.execute(
                "INSERT INTO checkpoints (state_id, data, checksum) VALUES (?, ?, ?)",
                (state_id, blob[0], blob[1]),
            )
        return state_id

    async def _point_heads(
        self, channel_id: str, heads: Mapping[str, int | NewRef | None], ids: list[int]
    ) -> None:
        for name, target in heads.items():
            if target is None:
                await self._db.db.execute(
                    "DELETE FROM heads WHERE channel_id = ? AND name = ?", (channel_id, str(name))
                )
                continue
            state_id = ids[target.index] if isinstance(target, NewRef) else target
            await self._db.db.execute(
                "INSERT OR REPLACE INTO heads (channel_id, name, state_id) VALUES (?, ?, ?)",
                (channel_id, str(name), state_id),
            )

    async def _collect(self, channel_id: str) -> None:
        """Delete the channel's states that no head needs (inside a write transaction)."""
        await self._db.db.execute(
            "WITH RECURSIVE live(id) AS (SELECT state_id FROM heads WHERE channel_id = ?1 UNION "
            "SELECT s.parent_id FROM states s JOIN live ON s.id = live.id WHERE s.base = 'parent') "
            "DELETE FROM states WHERE channel_id = ?1 AND id NOT IN (SELECT id FROM live)",
            (channel_id,),
        )

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
        done = False

        async def work() -> None:
            nonlocal done
            await self._db.check_epoch(channel_id, epoch)
            row = await self._db.fetchone(
                "SELECT updated_at FROM channels WHERE channel_id = ?", (channel_id,)
            )
            if row is None or float(row[0]) > unused_since:
                return
            marks = ",".join("?" for _ in keep) or "''"
            await self._db.db.execute(
                f"DELETE FROM heads WHERE channel_id = ? AND name NOT IN ({marks})",
                (channel_id, *map(str, keep)),
            )
            if rebuild:
                await self._db.db.execute(
                    "UPDATE channels SET rebuild = 1 WHERE channel_id = ?", (channel_id,)
                )
            await self._collect(channel_id)
            done = True

        await self._db.write(work)
        return done

    async def load_opening(self, preset_key: str, fingerprint: str) -> Snapshot | None:
        """The shared opening state of a preset for a model, if it was stored."""
        row = await self._db.fetchone(
            "SELECT data, checksum FROM init_snapshots WHERE preset_key = ? AND model_fingerprint = ?",
            (preset_key, fingerprint),
        )
        if row is None:
            return None
        try:
            return await asyncio.to_thread(decode_snapshot, bytes(row[0]), row[1], fingerprint)
        except StateMismatchError:
            return None  # recomputed by the caller and stored again

    async def save_opening(self, preset_key: str, snapshot: Snapshot) -> None:
        """Store the shared opening state of a preset."""
        data, digest = await asyncio.to_thread(encode_snapshot, snapshot)

        async def work() -> None:
            await self._db.db.execute(
                "INSERT OR REPLACE INTO init_snapshots VALUES (?, ?, ?, ?, ?)",
                (preset_key, snapshot.fingerprint, data, digest, time.time()),
            )

        await self._db.write(work)
