"""Storage of the chat layer: small repositories behind protocols, one module per backend.

Only :mod:`chat` uses this package. A backend is a module that implements :class:`Backend` (open a
store; check, back up and compact one that is not open) and the five repositories a
:class:`Storage` bundles:

- :class:`ChannelConfig`: settings of channels and servers, where a conversation lives, enabling;
- :class:`StateLog`: the conversation states (heads, the token log, checkpoints, opening states);
- :class:`Transcripts`: the answered messages of each channel;
- :class:`Administration`: counts, purging a channel, the queries housekeeping chooses by;
- :class:`Leases`: which replica holds each channel, and under which epoch.

Each answered message is one transaction: :meth:`StateLog.write_states` takes the turn and
stores it with the states and heads, or stores nothing. Fencing: a replica that takes a channel
(:meth:`Leases.take`) gets a new epoch, and a write given an ``epoch`` is stored only while it is
still the channel's (else :class:`FencedError`, nothing stored), so a stale replica never
overwrites a newer conversation. The backend is chosen by the location's scheme
(:data:`BACKENDS`); a plain path is an SQLite file (:mod:`chat.storage.sqlite`),
``postgresql://...?objects=s3://bucket/prefix`` Postgres with an object store
(:mod:`chat.storage.postgres`). Every backend passes the same suite (``tests/chat/storage/``) and
raises :class:`StoreError` for a store that cannot be used, :class:`StateMismatchError` for a
stored state that fails its checks.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from chat.errors import FencedError, StoreError
from chat.storage.records import (
    HeadName,
    NewRef,
    NewState,
    StateBase,
    StoredState,
    Turn,
    state_checksum,
)

if TYPE_CHECKING:
    from engine.state import Snapshot

__all__ = [
    "BACKENDS",
    "Administration",
    "Backend",
    "ChannelConfig",
    "FencedError",
    "HeadName",
    "Leases",
    "Location",
    "NewRef",
    "NewState",
    "StateBase",
    "StateLog",
    "Storage",
    "StoreError",
    "StoredState",
    "Transcripts",
    "Turn",
    "backend_for",
    "state_checksum",
]

Location = Path | str  # a path (SQLite), or scheme://... for a backend registered in BACKENDS
HeadTargets = Mapping[str, int | NewRef | None]  # head name -> state id, a new state, or None: remove


class ChannelConfig(Protocol):
    """Settings of channels and servers, where each conversation lives, and where the bot is on."""

    async def settings(self, channel_id: str) -> dict[str, Any]:
        """The channel's own settings (empty for a new channel, or when the stored ones do not
        parse: one damaged row must never stop a channel)."""
        ...

    async def set_settings(self, channel_id: str, settings: dict[str, Any]) -> None:
        """Replace the channel's own settings."""
        ...

    async def set_place(self, channel_id: str, guild_id: str | None, parent_id: str | None) -> None:
        """Record which server a conversation belongs to (for server-wide resets) and, for a
        thread, its channel (a deleted channel takes its threads with it)."""
        ...

    async def guild_channels(self, guild_id: str) -> list[str]:
        """Conversations of a server that have anything stored, sorted."""
        ...

    async def threads_of(self, channel_id: str) -> list[str]:
        """Conversations in threads of a channel that have anything stored, sorted."""
        ...

    async def enabled(self, guild_id: str | None = None) -> set[str]:
        """Channels where moderators enabled the bot (of one server, when ``guild_id`` is given)."""
        ...

    async def disabled_threads(self) -> set[str]:
        """Threads switched off on their own while their channel is enabled."""
        ...

    async def set_enabled(
        self, channel_id: str, guild_id: str, enabled: bool, by: str, *, override: bool = False
    ) -> None:
        """Enable or disable the bot in a channel. ``override`` with ``enabled=False`` records a
        thread switched off although its channel is on (without it, disabling forgets the row)."""
        ...

    async def guild_settings(self, guild_id: str) -> dict[str, Any]:
        """A server's own settings (empty when none were set, or when they do not parse)."""
        ...

    async def set_guild_settings(self, guild_id: str, settings: dict[str, Any]) -> None:
        """Replace a server's own settings."""
        ...

    async def forget_guild(self, guild_id: str) -> None:
        """Delete a server's own settings (its channels are purged one by one)."""
        ...


class StateLog(Protocol):
    """Conversation states as a token log with checkpoints, named by heads (see
    :mod:`chat.states`), and the opening state of each preset, shared by all channels."""

    async def heads(self, channel_id: str) -> dict[HeadName, int]:
        """The channel's named states and their ids."""
        ...

    async def state(self, state_id: int) -> StoredState:
        """One stored state (raises StateMismatchError when missing or damaged)."""
        ...

    async def chain(self, state_id: int) -> list[StoredState]:
        """The states needed to rebuild ``state_id``: its stored base first, the state itself
        last (raises StateMismatchError when a link is missing or fails its checksum)."""
        ...

    async def load_checkpoint(self, state_id: int, fingerprint: str) -> Snapshot:
        """The whole state stored for ``state_id`` (raises StateMismatchError if damaged or
        missing, or when it belongs to another model)."""
        ...

    async def rebuild_pending(self, channel_id: str) -> bool:
        """True when the channel's states were dropped and must be re-read from its transcript."""
        ...

    async def write_states(
        self,
        channel_id: str,
        new: Sequence[NewState],
        heads: HeadTargets,
        turn: Turn | None = None,
        *,
        epoch: int | None = None,
    ) -> list[int]:
        """One transaction: add states, point heads at them (None removes a head), add the turn
        to the transcript; all of it is stored, or nothing. A head named anything but a
        :class:`HeadName` is refused with :class:`StoreError`.

        States no head needs any more (directly, or as a link of a head's log back to its
        nearest stored state) are deleted in the same transaction. Pointing ``chat`` at a state
        ends a pending rebuild. With ``epoch``, the transaction first checks that it is still the
        epoch of the channel's lease (else :class:`FencedError`, nothing stored). Returns the
        new states' ids."""
        ...

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
        transcript at its next message. ``epoch`` fences it as in :meth:`write_states`. Returns
        whether anything was done."""
        ...

    async def load_opening(self, preset_key: str, fingerprint: str) -> Snapshot | None:
        """The shared opening state of a preset for a model; None when it was not stored or does
        not pass its checksum (the caller computes it again)."""
        ...

    async def save_opening(self, preset_key: str, snapshot: Snapshot) -> None:
        """Store (or replace) the shared opening state of a preset for the snapshot's model."""
        ...


class Transcripts(Protocol):
    """The answered messages of each channel (written by :meth:`StateLog.write_states`)."""

    async def turns(self, channel_id: str) -> list[Turn]:
        """Every stored turn of a channel, oldest first."""
        ...

    async def delete_before(self, before: float, batch: int = 5000) -> int:
        """Delete the lines of every channel written before ``before`` (a time), ``batch`` lines
        a transaction so that messages are not held up; nothing of them stays readable in the
        store. Returns how many lines went."""
        ...


class Administration(Protocol):
    """Counts, purging, and the queries housekeeping chooses channels by."""

    async def stats(self) -> dict[str, int]:
        """Counts and sizes: ``channels``, ``enabled_channels``, ``states``, ``log_tokens``,
        ``checkpoints``, ``checkpoint_bytes``, ``shared_snapshots``, ``heads``,
        ``rebuild_pending``, ``turns``, ``schema_version``, and what the backend adds."""
        ...

    async def schema_version(self) -> int:
        """The migration the store is at."""
        ...

    async def purge_channel(self, channel_id: str, *, epoch: int | None = None) -> bool:
        """Delete everything stored for a channel (states, transcript, settings, enabling), so
        that nothing of it stays readable; False when nothing was stored. Its lease stays (the
        epochs go on from it). ``epoch`` fences it as in :meth:`StateLog.write_states`."""
        ...

    async def idle_channels(self, before: float, limit: int) -> list[str]:
        """Up to ``limit`` channels not used since ``before`` that still keep more than their chat
        state (oldest first)."""
        ...

    async def checkpoint_usage(self) -> int:
        """Bytes of whole states stored for channels (shared opening states not counted)."""
        ...

    async def checkpointed_channels(self, limit: int) -> list[tuple[str, int, float]]:
        """(channel, checkpoint bytes, last use) of the least recently used channels that hold
        checkpoints."""
        ...

    async def flush(self) -> None:
        """Make everything written so far durable in the store's main files (SQLite: empty the
        write-ahead log into the database file)."""
        ...

    async def collect_objects(self, written_before: float) -> int:
        """Delete the stored objects that no row points to and that were written before
        ``written_before`` (a time): whole states whose row never committed or was deleted.
        Returns how many went (0 for a backend that keeps its states in its rows, as SQLite)."""
        ...


class Leases(Protocol):
    """Which replica holds each channel, and the epoch of its lease (see :class:`FencedError`)."""

    async def take(self, channel_id: str, owner: str) -> int:
        """Make `owner` the channel's holder and bump its epoch (one transaction); returns the new epoch."""
        ...

    async def holder(self, channel_id: str) -> tuple[str, int] | None:
        """(owner, epoch) of the channel's lease; None when never taken."""
        ...


class Storage(Protocol):
    """An open store: its five repositories, closed once with :meth:`close`."""

    @property
    def channels(self) -> ChannelConfig:
        """Settings, places and enabling of channels and servers."""
        ...

    @property
    def states(self) -> StateLog:
        """The state log and the opening states."""
        ...

    @property
    def transcripts(self) -> Transcripts:
        """The answered messages."""
        ...

    @property
    def admin(self) -> Administration:
        """Counts, purging and housekeeping queries."""
        ...

    @property
    def leases(self) -> Leases:
        """The channels' leases and their epochs."""
        ...

    async def close(self) -> None:
        """Let writes in flight finish and close; never raises (shutdown on a full disk)."""
        ...


class Backend(Protocol):
    """One kind of store: opening it, and the maintenance of one that need not be open."""

    async def open(self, location: Location, *, check: bool = True) -> Storage:
        """Open (creating and migrating if needed) the store at ``location``; with ``check``, a
        damaged store is refused (StoreError "damaged") before anything is read from it."""
        ...

    def integrity_check(self, location: Location) -> list[str]:
        """A full check of the store (``db check``); empty when it is sound."""
        ...

    def backup(self, location: Location, destination: Path) -> None:
        """A consistent copy of a live store at ``destination``, never left half-written."""
        ...

    def vacuum(self, location: Location) -> tuple[int, int]:
        """Compact the store; returns (bytes before, bytes after)."""
        ...


# Location scheme -> the module whose ``BACKEND`` serves it. A path is an SQLite file.
BACKENDS: dict[str, str] = {
    "sqlite": "chat.storage.sqlite",
    "postgresql": "chat.storage.postgres",
    "postgres": "chat.storage.postgres",
}


def backend_for(location: Location) -> Backend:
    """The backend that serves ``location``: the one registered for its scheme (``scheme://...``),
    SQLite for a path."""
    text = str(location)
    scheme = text.split("://", 1)[0] if isinstance(location, str) and "://" in text else "sqlite"
    if scheme not in BACKENDS:
        raise StoreError(f"no storage backend for {scheme}:// (known: {', '.join(sorted(BACKENDS))})")
    backend: Backend = importlib.import_module(BACKENDS[scheme]).BACKEND
    return backend
