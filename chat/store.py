"""The storage of before the split, one flat class: kept for code that has not moved yet.

New code uses :mod:`chat.storage` (the protocols, :func:`chat.storage.backend_for`) and its
repositories (``storage.channels``, ``storage.states``, ``storage.transcripts``,
``storage.admin``). :class:`Store` is the SQLite store with the old method names, each one line
that hands over to a repository; it goes when the last caller has moved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import aiosqlite

from chat.errors import StoreError
from chat.storage import HeadName, NewRef, NewState, StoredState, Turn, state_checksum
from chat.storage._sqlite_files import (
    QUICK_CHECK_SECONDS,
    backup,
    integrity_check,
    migrate,
    migrations,
    vacuum,
)
from chat.storage.records import pack_tokens, unpack_tokens
from chat.storage.sqlite import SqliteStorage, sqlite_error

if TYPE_CHECKING:
    from pathlib import Path

    from engine.state import Snapshot

__all__ = [
    "HEAD_NAMES",
    "QUICK_CHECK_SECONDS",
    "NewRef",
    "NewState",
    "Store",
    "StoreError",
    "StoredState",
    "Turn",
    "backup",
    "integrity_check",
    "migrations",
    "pack_tokens",
    "sqlite_error",
    "state_checksum",
    "unpack_tokens",
    "vacuum",
]

HEAD_NAMES = tuple(HeadName)
_migrate = migrate


class Store(SqliteStorage):
    """The SQLite store under its old flat names (see the module's note)."""

    @classmethod
    async def open(cls, path: Path, *, check: bool = True) -> Store:
        """Open (creating if needed) and migrate the database at ``path``."""
        storage = await SqliteStorage.open(path, check=check)
        return cls(storage.database)

    @property
    def _db(self) -> aiosqlite.Connection:
        return self.database.db

    async def _fetchone(self, sql: str, params: tuple[Any, ...]) -> Any:
        return await self.database.fetchone(sql, params)

    async def wal_checkpoint(self) -> None:
        """See :meth:`chat.storage.Administration.flush`."""
        await self.admin.flush()

    async def schema_version(self) -> int:
        """See :meth:`chat.storage.Administration.schema_version`."""
        return await self.admin.schema_version()

    async def channel_settings(self, channel_id: str) -> dict[str, Any]:
        """See :meth:`chat.storage.ChannelConfig.settings`."""
        return await self.channels.settings(channel_id)

    async def set_channel_settings(self, channel_id: str, settings: dict[str, Any]) -> None:
        """See :meth:`chat.storage.ChannelConfig.set_settings`."""
        await self.channels.set_settings(channel_id, settings)

    async def load_init(self, preset_key: str, fingerprint: str) -> Snapshot | None:
        """See :meth:`chat.storage.StateLog.load_opening`."""
        return await self.states.load_opening(preset_key, fingerprint)

    async def save_init(self, preset_key: str, snapshot: Snapshot) -> None:
        """See :meth:`chat.storage.StateLog.save_opening`."""
        await self.states.save_opening(preset_key, snapshot)

    async def set_channel_place(self, channel_id: str, guild_id: str | None, parent_id: str | None) -> None:
        """See :meth:`chat.storage.ChannelConfig.set_place`."""
        await self.channels.set_place(channel_id, guild_id, parent_id)

    async def guild_channels(self, guild_id: str) -> list[str]:
        """See :meth:`chat.storage.ChannelConfig.guild_channels`."""
        return await self.channels.guild_channels(guild_id)

    async def threads_of(self, channel_id: str) -> list[str]:
        """See :meth:`chat.storage.ChannelConfig.threads_of`."""
        return await self.channels.threads_of(channel_id)

    async def heads(self, channel_id: str) -> dict[HeadName, int]:
        """See :meth:`chat.storage.StateLog.heads`."""
        return await self.states.heads(channel_id)

    async def state(self, state_id: int) -> StoredState:
        """See :meth:`chat.storage.StateLog.state`."""
        return await self.states.state(state_id)

    async def chain(self, state_id: int) -> list[StoredState]:
        """See :meth:`chat.storage.StateLog.chain`."""
        return await self.states.chain(state_id)

    async def load_checkpoint(self, state_id: int, fingerprint: str) -> Snapshot:
        """See :meth:`chat.storage.StateLog.load_checkpoint`."""
        return await self.states.load_checkpoint(state_id, fingerprint)

    async def rebuild_pending(self, channel_id: str) -> bool:
        """See :meth:`chat.storage.StateLog.rebuild_pending`."""
        return await self.states.rebuild_pending(channel_id)

    async def write_states(
        self,
        channel_id: str,
        new: Sequence[NewState],
        heads: Mapping[str, int | NewRef | None],
        turn: Turn | None = None,
    ) -> list[int]:
        """See :meth:`chat.storage.StateLog.write_states`."""
        return await self.states.write_states(channel_id, new, heads, turn)

    async def drop_states(
        self, channel_id: str, keep: tuple[str, ...] = (), *, unused_since: float, rebuild: bool = False
    ) -> bool:
        """See :meth:`chat.storage.StateLog.drop_states`."""
        return await self.states.drop_states(channel_id, keep, unused_since=unused_since, rebuild=rebuild)

    async def purge_channel(self, channel_id: str) -> bool:
        """See :meth:`chat.storage.Administration.purge_channel`."""
        return await self.admin.purge_channel(channel_id)

    async def delete_turns_before(self, before: float, batch: int = 5000) -> int:
        """See :meth:`chat.storage.Transcripts.delete_before`."""
        return await self.transcripts.delete_before(before, batch)

    async def idle_channels(self, before: float, limit: int) -> list[str]:
        """See :meth:`chat.storage.Administration.idle_channels`."""
        return await self.admin.idle_channels(before, limit)

    async def checkpoint_usage(self) -> int:
        """See :meth:`chat.storage.Administration.checkpoint_usage`."""
        return await self.admin.checkpoint_usage()

    async def checkpointed_channels(self, limit: int) -> list[tuple[str, int, float]]:
        """See :meth:`chat.storage.Administration.checkpointed_channels`."""
        return await self.admin.checkpointed_channels(limit)

    async def enabled_channels(self, guild_id: str | None = None) -> set[str]:
        """See :meth:`chat.storage.ChannelConfig.enabled`."""
        return await self.channels.enabled(guild_id)

    async def disabled_threads(self) -> set[str]:
        """See :meth:`chat.storage.ChannelConfig.disabled_threads`."""
        return await self.channels.disabled_threads()

    async def set_enabled(
        self, channel_id: str, guild_id: str, enabled: bool, by: str, *, override: bool = False
    ) -> None:
        """See :meth:`chat.storage.ChannelConfig.set_enabled`."""
        await self.channels.set_enabled(channel_id, guild_id, enabled, by, override=override)

    async def guild_settings(self, guild_id: str) -> dict[str, Any]:
        """See :meth:`chat.storage.ChannelConfig.guild_settings`."""
        return await self.channels.guild_settings(guild_id)

    async def forget_guild(self, guild_id: str) -> None:
        """See :meth:`chat.storage.ChannelConfig.forget_guild`."""
        await self.channels.forget_guild(guild_id)

    async def set_guild_settings(self, guild_id: str, settings: dict[str, Any]) -> None:
        """See :meth:`chat.storage.ChannelConfig.set_guild_settings`."""
        await self.channels.set_guild_settings(guild_id, settings)

    async def stats(self) -> dict[str, int]:
        """See :meth:`chat.storage.Administration.stats`."""
        return await self.admin.stats()

    async def transcript(self, channel_id: str) -> list[Turn]:
        """See :meth:`chat.storage.Transcripts.turns`."""
        return await self.transcripts.turns(channel_id)
