"""The one database access layer: channels, conversation states and transcripts in SQLite.

Conversation states are stored as checkpoints plus a token log (migration V3): a state row holds
the tokens fed to its parent state in one read, and only now and then a whole state (see
:mod:`chat.states` for the policy). The engine's reads are deterministic, so re-reading the log
from the last whole state gives the state back bit for bit.

Numbered migrations from ``migrations/`` run at open, each in its own transaction, and the schema
version lives in the database (``PRAGMA user_version``). The database runs in WAL mode and every
change of a turn is one transaction, so a kill at any moment leaves it consistent: a turn is
either wholly stored or not at all.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import inspect
import json
import logging
import os
import re
import sqlite3
import sys
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import aiosqlite

from chat.errors import StoreError
from engine.checksums import checksum
from engine.errors import StateMismatchError, process_user

if TYPE_CHECKING:
    from engine.state import Snapshot

__all__ = ["HEAD_NAMES", "NewRef", "NewState", "Store", "StoreError", "StoredState", "Turn"]

log = logging.getLogger(__name__)
HEAD_NAMES = ("chat", "chat_pre", "gen_0", "gen_1", "undo_chat", "undo_chat_pre")
_MIGRATION_RE = re.compile(r"^V(\d+)__[\w-]+\.sql$")


QUICK_CHECK_SECONDS = 10.0  # the start-up check of the file stops here on a very large database


def sqlite_error(exc: sqlite3.Error, path: Path, doing: str) -> StoreError:
    """One clear line for an SQLite error: which trouble it is, and what to do about it.

    A full disk or a read-only file is said to be just that: the data is intact, and the
    advice never suggests deleting the database.
    """
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    detail = str(exc)
    folder = path.parent if str(path.parent) else Path(".")
    if primary == sqlite3.SQLITE_FULL or "disk is full" in detail:
        return StoreError(
            f"the disk holding the database {path} is full ({doing} failed): free some space there; "
            "everything stored so far is intact, and the bot saves again once there is room",
            "full",
        )
    if primary == sqlite3.SQLITE_READONLY or "readonly" in detail:
        return StoreError(
            f"the database {path} is read-only for {process_user()} ({doing} failed): give that user write "
            f"access to the file and its folder {folder} (for example `chown -R {os.getuid()} {folder}`); "
            "the data in it is intact",
            "read-only",
        )
    if primary in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH):
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            why = f"{process_user()} may not write in its folder {folder}"
            fix = f"give that user write access (for example `chown -R {os.getuid()} {folder}`)"
        elif path.exists() and not os.access(path, os.R_OK | os.W_OK):
            why = f"{process_user()} may not read and write it"
            fix = f"give that user access (for example `chown {os.getuid()} {path}`)"
        else:
            why = detail
            fix = "check that RWKV_DISCORD_DB names a file in a folder that exists and is writable"
        return StoreError(f"cannot open the database {path}: {why}: {fix}", "cannot-open")
    if primary == sqlite3.SQLITE_NOTADB:
        return StoreError(
            f"{path} is not a usable rwkv-discord database ({detail}): check that RWKV_DISCORD_DB "
            "names the bot's database file; if it does, the file is damaged: restore your latest "
            "backup (`rwkv-discord db backup` makes them)",
            "damaged",
        )
    if primary == sqlite3.SQLITE_CORRUPT:
        return StoreError(
            f"the database {path} is damaged ({detail}; {doing} failed): stop the bot, keep the file, "
            f"and restore your latest backup (`rwkv-discord db backup` makes them), or salvage what is "
            f"readable with `sqlite3 {path} .recover | sqlite3 recovered.sqlite3` and point "
            "RWKV_DISCORD_DB at the result",
            "damaged",
        )
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreError(
            f"the database {path} is locked by another program ({doing} waited and gave up): is a "
            "second bot or a `db vacuum` using it? Nothing was changed",
            "locked",
        )
    if primary == sqlite3.SQLITE_IOERR:
        return StoreError(
            f"the disk holding the database {path} reported an error ({detail}; {doing} failed): "
            "check the disk and the system log; nothing was changed",
            "disk",
        )
    return StoreError(f"the database {path}: {doing} failed: {detail}")


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _sqlite_errors(
    method: Callable[_P, Awaitable[_R]],
) -> Callable[_P, Awaitable[_R]]:
    """Turn an SQLite error of a store method into a :class:`StoreError` that says what to do."""
    doing = method.__name__.replace("_", " ")

    @functools.wraps(method)
    async def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await method(*args, **kwargs)
        except sqlite3.Error as exc:
            store = args[0]
            assert isinstance(store, Store)
            raise sqlite_error(exc, store.path, doing) from exc

    return guarded


@dataclass(frozen=True)
class Turn:
    """One answered message, for the channel's transcript."""

    command: str
    user_text: str
    reply_text: str
    reply_tokens: int


@dataclass(frozen=True)
class NewRef:
    """A state added earlier in the same :meth:`Store.write_states` call (by position)."""

    index: int


@dataclass(frozen=True)
class NewState:
    """A state to store: ``tokens`` fed in one read to its parent (``base="parent"``), to a blank
    state (``"zero"``) or to the opening state of ``preset_key`` (``"init"``). With
    ``checkpoint`` the state is stored whole as well, and nothing before it is needed any more."""

    base: str
    preset_key: str
    tokens: list[int]
    replay: int  # tokens to feed from the nearest whole state (or blank/opening state) to rebuild it
    fingerprint: str
    parent: int | NewRef | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    checkpoint: Snapshot | None = None


@dataclass(frozen=True)
class StoredState:
    """One row of the state log."""

    id: int
    channel_id: str
    parent_id: int | None
    base: str
    preset_key: str
    tokens: list[int]
    replay: int
    meta: dict[str, Any]
    fingerprint: str
    checksum: str | None
    raw_tokens: bytes = b""
    raw_meta: str = "{}"

    def verify(self) -> None:
        """Raise :class:`StateMismatchError` when the row does not match its checksum."""
        if self.checksum is None and self.base == "checkpoint" and not self.tokens:
            return  # carried over from a version that stored whole snapshots; the data has its own
        expected = state_checksum(
            channel_id=self.channel_id,
            parent_id=self.parent_id,
            base=self.base,
            preset_key=self.preset_key,
            tokens=self.raw_tokens,
            replay=self.replay,
            meta=self.raw_meta,
            fingerprint=self.fingerprint,
        )
        if self.checksum != expected:
            raise StateMismatchError(f"stored state {self.id} failed its checksum")


def pack_tokens(tokens: Sequence[int]) -> bytes:
    """Token ids as uint32 little-endian bytes."""
    packed = array("I", tokens)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def unpack_tokens(data: bytes) -> list[int]:
    """The inverse of :func:`pack_tokens`."""
    if len(data) % 4:
        raise StateMismatchError("a stored token log has a torn entry")
    packed = array("I")
    packed.frombytes(data)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tolist()


def state_checksum(
    *,
    channel_id: str,
    parent_id: int | None,
    base: str,
    preset_key: str,
    tokens: bytes,
    replay: int,
    meta: str,
    fingerprint: str,
) -> str:
    """The checksum of a state row's content."""
    head = "\x1f".join([channel_id, str(parent_id), base, preset_key, str(replay), meta, fingerprint])
    return checksum(head.encode() + b"\x1e" + tokens)


_STATE_COLUMNS = (
    "s.id, s.channel_id, s.parent_id, s.base, s.preset_key, s.tokens, s.replay, s.meta, "
    "s.model_fingerprint, s.checksum"
)


def _stored_state(row: Sequence[Any]) -> StoredState:
    raw_tokens, raw_meta = bytes(row[5]), str(row[7])
    try:
        meta = dict(json.loads(raw_meta))
    except (ValueError, TypeError) as exc:
        raise StateMismatchError(f"stored state {row[0]} has damaged metadata") from exc
    return StoredState(
        id=int(row[0]),
        channel_id=str(row[1]),
        parent_id=None if row[2] is None else int(row[2]),
        base=str(row[3]),
        preset_key=str(row[4]),
        tokens=unpack_tokens(raw_tokens),
        replay=int(row[6]),
        meta=meta,
        fingerprint=str(row[8]),
        checksum=None if row[9] is None else str(row[9]),
        raw_tokens=raw_tokens,
        raw_meta=raw_meta,
    )


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
    async def open(cls, path: Path, *, check: bool = True) -> Store:
        """Open (creating if needed) and migrate the database at ``path``.

        With ``check``, the file is checked first (SQLite's ``quick_check``, stopped after
        :data:`QUICK_CHECK_SECONDS` on a very large file): a damaged database is refused with
        one line that says how to restore it, before any message is answered from it.
        """
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except PermissionError as exc:
            raise StoreError(
                f"cannot create the database folder {path.parent}: {process_user()} may not write in "
                f"{_nearest_existing(path.parent)}: create it and give that user access, or pick another "
                "RWKV_DISCORD_DB",
                "cannot-open",
            ) from exc
        except OSError as exc:
            raise StoreError(
                f"cannot create the database folder {path.parent}: {exc}", "cannot-open"
            ) from exc
        await asyncio.to_thread(_migrate, path, check)
        try:
            db = await aiosqlite.connect(path, isolation_level=None)
            await db.execute("PRAGMA synchronous = NORMAL")  # WAL: a process kill loses nothing
            await db.execute("PRAGMA foreign_keys = ON")
            await db.execute("PRAGMA busy_timeout = 5000")
            # Replacing a checkpoint frees megabytes of pages; zeroing them (this SQLite build's
            # default) would double what a checkpoint writes. A purge zeroes what it deletes.
            await db.execute("PRAGMA secure_delete = FAST")
        except sqlite3.Error as exc:
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
            await self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning(
                "%s (the write-ahead log is kept and applied at the next start)",
                sqlite_error(exc, self.path, "the last checkpoint at close"),
            )
        try:
            await self._db.close()
        except sqlite3.Error as exc:
            log.warning("%s", sqlite_error(exc, self.path, "closing it"))

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
            raise sqlite_error(exc, self.path, "saving") from exc

    async def wal_checkpoint(self) -> None:
        """Copy the write-ahead log into the database file and empty it."""
        await self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

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
        return _settings_object(row, f"channel {channel_id}")

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

    async def set_channel_place(self, channel_id: str, guild_id: str | None, parent_id: str | None) -> None:
        """Record which server a conversation belongs to (for server-wide resets) and, for a
        thread, its channel (a deleted channel takes its threads with it)."""

        async def work() -> None:
            await self._ensure_channel(channel_id)
            await self._db.execute(
                "UPDATE channels SET guild_id = ?, parent_id = ? WHERE channel_id = ? "
                "AND (guild_id IS NOT ? OR parent_id IS NOT ?)",
                (guild_id, parent_id, channel_id, guild_id, parent_id),
            )

        await self._write(work)

    async def guild_channels(self, guild_id: str) -> list[str]:
        """Conversations of a server that have any stored state."""
        async with self._db.execute(
            "SELECT channel_id FROM channels WHERE guild_id = ? ORDER BY channel_id", (guild_id,)
        ) as cursor:
            return [str(r[0]) for r in await cursor.fetchall()]

    async def threads_of(self, channel_id: str) -> list[str]:
        """Conversations in threads of a channel (active or archived) that have any stored state."""
        async with self._db.execute(
            "SELECT channel_id FROM channels WHERE parent_id = ? ORDER BY channel_id", (channel_id,)
        ) as cursor:
            return [str(r[0]) for r in await cursor.fetchall()]

    # ------------------------------------------------------------------ states: checkpoints and log

    async def heads(self, channel_id: str) -> dict[str, int]:
        """The channel's named states (chat, chat_pre, gen_0, gen_1, undo_chat...) and their ids."""
        async with self._db.execute(
            "SELECT name, state_id FROM heads WHERE channel_id = ?", (channel_id,)
        ) as cursor:
            return {str(r[0]): int(r[1]) for r in await cursor.fetchall()}

    async def state(self, state_id: int) -> StoredState:
        """One stored state's row (raises StateMismatchError when missing or damaged)."""
        row = await self._fetchone(f"SELECT {_STATE_COLUMNS} FROM states s WHERE s.id = ?", (state_id,))
        if row is None:
            raise StateMismatchError(f"stored state {state_id} is missing")
        state = _stored_state(row)
        state.verify()
        return state

    async def chain(self, state_id: int) -> list[StoredState]:
        """The states needed to rebuild ``state_id``: its stored base first, the state itself last.

        Raises :class:`StateMismatchError` when a link is missing or fails its checksum.
        """
        async with self._db.execute(
            "WITH RECURSIVE up(id, depth) AS (SELECT ?, 0 UNION ALL "
            "SELECT s.parent_id, up.depth + 1 FROM states s JOIN up ON s.id = up.id "
            "WHERE s.base = 'parent') "
            f"SELECT {_STATE_COLUMNS}, up.depth FROM up LEFT JOIN states s ON s.id = up.id "
            "ORDER BY up.depth DESC",
            (state_id,),
        ) as cursor:
            rows = await cursor.fetchall()
        chain = []
        for row in rows:
            if row[0] is None:
                raise StateMismatchError(f"stored state {state_id} lost a link of its log")
            state = _stored_state(row)
            state.verify()
            chain.append(state)
        if not chain or chain[0].base == "parent":
            raise StateMismatchError(f"stored state {state_id} is missing")
        return chain

    async def load_checkpoint(self, state_id: int, fingerprint: str) -> Snapshot:
        """The whole state stored for ``state_id`` (raises StateMismatchError if damaged)."""
        row = await self._fetchone("SELECT data, checksum FROM checkpoints WHERE state_id = ?", (state_id,))
        if row is None:
            raise StateMismatchError(f"the checkpoint of stored state {state_id} is missing")
        return await asyncio.to_thread(_decode, bytes(row[0]), row[1], fingerprint)

    async def rebuild_pending(self, channel_id: str) -> bool:
        """True when the channel's state was dropped and must be re-read from its transcript."""
        row = await self._fetchone("SELECT rebuild FROM channels WHERE channel_id = ?", (channel_id,))
        return bool(row and row[0])

    async def write_states(
        self,
        channel_id: str,
        new: Sequence[NewState],
        heads: dict[str, int | NewRef | None],
        turn: Turn | None = None,
    ) -> list[int]:
        """One transaction: add states, point heads at them (None removes a head), add the turn.

        States no head needs any more (directly, or as a link of a head's log back to its
        nearest stored state) are deleted in the same transaction. Returns the new states' ids.
        """
        encoded = await asyncio.to_thread(
            lambda: [_encode(n.checkpoint) if n.checkpoint is not None else None for n in new]
        )
        now = time.time()
        ids: list[int] = []

        async def work() -> None:
            ids.clear()
            await self._ensure_channel(channel_id)
            for item, blob in zip(new, encoded, strict=True):
                parent = ids[item.parent.index] if isinstance(item.parent, NewRef) else item.parent
                base = "checkpoint" if blob is not None else item.base
                if base == "parent" and parent is None:
                    raise StoreError("a logged state needs a parent")
                parent = parent if base == "parent" else None
                tokens = pack_tokens(item.tokens) if blob is None else b""
                meta = json.dumps(item.meta, sort_keys=True)
                replay = 0 if blob is not None else item.replay
                digest = state_checksum(
                    channel_id=channel_id,
                    parent_id=parent,
                    base=base,
                    preset_key=item.preset_key,
                    tokens=tokens,
                    replay=replay,
                    meta=meta,
                    fingerprint=item.fingerprint,
                )
                cursor = await self._db.execute(
                    "INSERT INTO states (channel_id, parent_id, base, preset_key, tokens, replay, meta, "
                    "model_fingerprint, checksum, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        channel_id,
                        parent,
                        base,
                        item.preset_key,
                        tokens,
                        replay,
                        meta,
                        item.fingerprint,
                        digest,
                        now,
                    ),
                )
                assert cursor.lastrowid is not None
                ids.append(int(cursor.lastrowid))
                if blob is not None:
                    await self._db.execute(
                        "INSERT INTO checkpoints (state_id, data, checksum) VALUES (?, ?, ?)",
                        (ids[-1], blob[0], blob[1]),
                    )
            for name, target in heads.items():
                if target is None:
                    await self._db.execute(
                        "DELETE FROM heads WHERE channel_id = ? AND name = ?", (channel_id, name)
                    )
                    continue
                state_id = ids[target.index] if isinstance(target, NewRef) else target
                await self._db.execute(
                    "INSERT OR REPLACE INTO heads (channel_id, name, state_id) VALUES (?, ?, ?)",
                    (channel_id, name, state_id),
                )
            if turn is not None:
                await self._add_turn(channel_id, turn, new[-1].fingerprint if new else "", now)
            await self._db.execute(
                "UPDATE channels SET updated_at = ? WHERE channel_id = ?", (now, channel_id)
            )
            if heads.get("chat") is not None:  # the conversation has a state again
                await self._db.execute("UPDATE channels SET rebuild = 0 WHERE channel_id = ?", (channel_id,))
            await self._collect(channel_id)

        await self._write(work)
        return list(ids)

    async def _add_turn(self, channel_id: str, turn: Turn, fingerprint: str, now: float) -> None:
        await self._db.execute(
            "INSERT INTO turns (channel_id, command, user_text, reply_text, reply_tokens, "
            "model_fingerprint, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (channel_id, turn.command, turn.user_text, turn.reply_text, turn.reply_tokens, fingerprint, now),
        )

    async def _collect(self, channel_id: str) -> None:
        """Delete the channel's states that no head needs (inside a write transaction)."""
        await self._db.execute(
            "WITH RECURSIVE live(id) AS (SELECT state_id FROM heads WHERE channel_id = ?1 UNION "
            "SELECT s.parent_id FROM states s JOIN live ON s.id = live.id WHERE s.base = 'parent') "
            "DELETE FROM states WHERE channel_id = ?1 AND id NOT IN (SELECT id FROM live)",
            (channel_id,),
        )

    async def drop_states(
        self, channel_id: str, keep: tuple[str, ...] = (), *, unused_since: float, rebuild: bool = False
    ) -> bool:
        """Remove every head but ``keep`` and the states only they needed, if the channel was not
        used after ``unused_since``; ``rebuild`` marks the conversation to be re-read from its
        transcript at its next message. Returns whether anything was done."""
        done = False

        async def work() -> None:
            nonlocal done
            row = await self._fetchone("SELECT updated_at FROM channels WHERE channel_id = ?", (channel_id,))
            if row is None or float(row[0]) > unused_since:
                return
            marks = ",".join("?" for _ in keep) or "''"
            await self._db.execute(
                f"DELETE FROM heads WHERE channel_id = ? AND name NOT IN ({marks})", (channel_id, *keep)
            )
            if rebuild:
                await self._db.execute("UPDATE channels SET rebuild = 1 WHERE channel_id = ?", (channel_id,))
            await self._collect(channel_id)
            done = True

        await self._write(work)
        return done

    async def purge_channel(self, channel_id: str) -> bool:
        """Delete everything stored for a channel (its states, transcript, settings, enabling);
        the freed pages are zeroed, so nothing of it stays readable in the file."""
        found = False

        async def work() -> None:
            nonlocal found
            await self._db.execute("DELETE FROM heads WHERE channel_id = ?", (channel_id,))
            await self._db.execute("DELETE FROM states WHERE channel_id = ?", (channel_id,))
            cursor = await self._db.execute("DELETE FROM channels WHERE channel_id = ?", (channel_id,))
            found = cursor.rowcount > 0
            cursor = await self._db.execute(
                "DELETE FROM enabled_channels WHERE channel_id = ?", (channel_id,)
            )
            found = found or cursor.rowcount > 0

        await self._write_zeroed(work)
        await self._empty_wal("a purge")
        return found

    async def delete_turns_before(self, before: float, batch: int = 5000) -> int:
        """Delete the transcript lines written before ``before`` (a time), ``batch`` lines a
        transaction so that messages are not held up; the freed pages are zeroed, and the
        write-ahead log is emptied after, as for a purge. Returns how many lines went."""
        deleted = 0
        while True:
            count = 0

            async def work() -> None:
                nonlocal count
                cursor = await self._db.execute(
                    "DELETE FROM turns WHERE id IN "
                    "(SELECT id FROM turns WHERE created_at < ? ORDER BY id LIMIT ?)",
                    (before, batch),
                )
                count = cursor.rowcount

            await self._write_zeroed(work)
            deleted += count
            if count < batch:
                break
        if deleted:
            await self._empty_wal("deleting old transcript lines")
        return deleted

    async def _write_zeroed(self, work: Callable[[], Awaitable[None]]) -> None:
        """:meth:`_write` with the pages that ``work`` frees zeroed (SQLite's secure_delete)."""

        async def zeroed() -> None:
            await self._db.execute("PRAGMA secure_delete = ON")
            try:
                await work()
            finally:
                await self._db.execute("PRAGMA secure_delete = FAST")

        await self._write(zeroed)

    async def _empty_wal(self, after: str) -> None:
        """After a zeroing delete: the write-ahead log still holds copies of the deleted pages,
        so move it into the file and empty it."""
        try:
            await self.wal_checkpoint()
        except sqlite3.Error as exc:  # a long reader blocks it: the next checkpoint does it
            log.warning("after %s, the write-ahead log could not be emptied yet: %s", after, exc)

    async def idle_channels(self, before: float, limit: int) -> list[str]:
        """Up to ``limit`` channels not used since ``before`` that still keep more than their chat
        state (oldest first)."""
        async with self._db.execute(
            "SELECT c.channel_id FROM channels c WHERE c.updated_at < ? AND EXISTS "
            "(SELECT 1 FROM heads h WHERE h.channel_id = c.channel_id AND h.name != 'chat') "
            "ORDER BY c.updated_at LIMIT ?",
            (before, limit),
        ) as cursor:
            return [str(r[0]) for r in await cursor.fetchall()]

    async def checkpoint_usage(self) -> int:
        """Bytes of whole states stored for channels (shared opening states not counted)."""
        row = await self._fetchone("SELECT coalesce(sum(length(data)), 0) FROM checkpoints", ())
        return int(row[0]) if row else 0

    async def checkpointed_channels(self, limit: int) -> list[tuple[str, int, float]]:
        """(channel, checkpoint bytes, last use) of the least recently used channels that hold
        checkpoints."""
        async with self._db.execute(
            "SELECT s.channel_id, sum(length(k.data)), max(c.updated_at) FROM checkpoints k "
            "JOIN states s ON s.id = k.state_id JOIN channels c ON c.channel_id = s.channel_id "
            "GROUP BY s.channel_id ORDER BY max(c.updated_at) LIMIT ?",
            (limit,),
        ) as cursor:
            return [(str(r[0]), int(r[1]), float(r[2])) for r in await cursor.fetchall()]

    async def enabled_channels(self, guild_id: str | None = None) -> set[str]:
        """Channels where moderators enabled the bot (of one server, when ``guild_id`` is given)."""
        async with self._db.execute(
            "SELECT channel_id FROM enabled_channels WHERE enabled = 1 AND (?1 IS NULL OR guild_id = ?1)",
            (guild_id,),
        ) as cursor:
            return {str(r[0]) for r in await cursor.fetchall()}

    async def disabled_threads(self) -> set[str]:
        """Threads switched off on their own while their channel is enabled."""
        async with self._db.execute("SELECT channel_id FROM enabled_channels WHERE enabled = 0") as cursor:
            return {str(r[0]) for r in await cursor.fetchall()}

    async def set_enabled(
        self, channel_id: str, guild_id: str, enabled: bool, by: str, *, override: bool = False
    ) -> None:
        """Enable or disable the bot in a channel. ``override`` with ``enabled=False`` records a
        thread switched off although its channel is on (without it, disabling forgets the row)."""

        async def work() -> None:
            if enabled or override:
                await self._db.execute(
                    "INSERT OR REPLACE INTO enabled_channels "
                    "(channel_id, guild_id, enabled_by, enabled_at, enabled) VALUES (?, ?, ?, ?, ?)",
                    (channel_id, guild_id, by, time.time(), int(enabled)),
                )
            else:
                await self._db.execute("DELETE FROM enabled_channels WHERE channel_id = ?", (channel_id,))

        await self._write(work)

    async def guild_settings(self, guild_id: str) -> dict[str, Any]:
        """A server's own settings (empty when none were set)."""
        row = await self._fetchone("SELECT settings FROM guild_settings WHERE guild_id = ?", (guild_id,))
        return _settings_object(row, f"server {guild_id}")

    async def forget_guild(self, guild_id: str) -> None:
        """Delete a server's own settings (its channels are purged one by one)."""

        async def work() -> None:
            await self._db.execute("DELETE FROM guild_settings WHERE guild_id = ?", (guild_id,))

        await self._write(work)

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


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


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
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        raise sqlite_error(exc, source, f"the backup to {destination}") from exc
    except OSError as exc:
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
        raise sqlite_error(exc, path, "vacuum") from exc
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


def _migrate(path: Path, check: bool = True) -> None:
    """Check the file (see :meth:`Store.open`), then apply the migrations it lacks, each in one
    transaction (WAL mode on).

    The version is read again inside each transaction, so two processes opening a new database
    at once apply each migration once.
    """
    available = migrations()
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    except sqlite3.Error as exc:
        raise sqlite_error(exc, path, "opening it") from exc
    try:
        _enable_wal(conn)
        if check:
            _quick_check(conn, path)
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        if current > len(available):
            raise StoreError(
                f"database {path} has schema version {current}, newer than this program "
                f"knows ({len(available)}): upgrade rwkv-discord or use another --db",
                "schema",
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
                raise sqlite_error(exc, path, f"migration {name}") from exc
    except sqlite3.Error as exc:
        error = sqlite_error(exc, path, "opening it")
        if error.problem == "other" and isinstance(exc, sqlite3.DatabaseError):
            error = StoreError(f"{path} is not a usable rwkv-discord database: {exc}", "damaged")
        raise error from exc
    finally:
        conn.close()


def _quick_check(conn: sqlite3.Connection, path: Path, budget: float = QUICK_CHECK_SECONDS) -> None:
    """SQLite's quick_check of every page, in linear time; on a file so large that it takes
    longer than ``budget`` seconds, the rest is left unchecked (said in the log) rather than
    holding up the start. Raises :class:`StoreError` ("damaged") on the first problem."""
    deadline = time.monotonic() + budget
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    try:
        rows = conn.execute("PRAGMA quick_check(5)").fetchall()
    except sqlite3.OperationalError as exc:
        if "interrupt" not in str(exc):
            raise
        log.warning(
            "the start-up check of %s stopped after %.0f s (a large database); `rwkv-discord db check` "
            "checks all of it",
            path,
            budget,
        )
        return
    finally:
        conn.set_progress_handler(None, 0)
    problems = [str(r[0]) for r in rows if str(r[0]) != "ok"]
    if problems:
        raise StoreError(
            f"the database {path} is damaged ({problems[0]}): stop the bot, keep the file, and restore "
            f"your latest backup (`rwkv-discord db backup` makes them), or salvage what is readable "
            f"with `sqlite3 {path} .recover | sqlite3 recovered.sqlite3` and point RWKV_DISCORD_DB at "
            "the result",
            "damaged",
        )


def integrity_check(path: Path) -> list[str]:
    """SQLite's full integrity check of a database (``db check``); empty when it is sound."""
    if not path.exists():
        raise StoreError(f"database not found: {path}", "cannot-open")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            rows = conn.execute("PRAGMA integrity_check(20)").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        error = sqlite_error(exc, path, "the integrity check")
        if error.problem == "damaged":  # so damaged that the check itself cannot read it
            return [str(exc)]
        raise error from exc
    return [str(r[0]) for r in rows if str(r[0]) != "ok"]


def _decode(data: bytes, digest: str, fingerprint: str) -> Snapshot:
    from engine.state import Snapshot  # torch: only where a state is read

    if checksum(data) != digest:
        raise StateMismatchError("a stored state failed its checksum")
    return Snapshot.from_bytes(data, fingerprint)


# Every public coroutine of the store answers an SQLite error with a StoreError saying what to do.
for _name, _method in list(vars(Store).items()):
    if not _name.startswith("_") and inspect.iscoroutinefunction(_method):
        setattr(Store, _name, _sqlite_errors(_method))
