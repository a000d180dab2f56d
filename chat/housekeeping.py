"""Housekeeping of the stored conversations: retention, the database budget, old transcripts."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from chat.states import MB

if TYPE_CHECKING:
    from chat.session import ChatService

log = logging.getLogger(__name__)

# Whole states are written to an object store (Postgres backend) before the row that names them
# commits; an object with no row is collected once it is this old, so that a write in flight is
# never taken for garbage.
OBJECT_GRACE_S = 3600.0


async def _ours_or_nobodys(service: ChatService, channel: str) -> bool:
    """Whether this service may trim the channel: it shares its store with no other (no owner),
    holds the channel's lease, or nobody does."""
    if service.owner is None:
        return True
    holder = await service.store.leases.holder(channel)
    return holder is None or holder == (service.owner, service.states.fence(channel))


async def keep_house(service: ChatService, now: float | None = None) -> dict[str, int]:
    """Retention, the database budget, old transcripts and orphaned objects; returns how many
    channels (or transcript lines, or objects) each touched.

    Channels idle longer than the retention keep only their chat state. Transcript lines
    older than the transcript retention are deleted: conversations go on from their stored
    states, and only a re-read of a transcript (after a model change or damage, or for a
    channel kept as transcript only) sees fewer messages. While the whole states in the
    database exceed their budget, the least recently used channels that are not in memory
    keep only their transcript (re-read at their next message). Busy channels are skipped;
    each channel is handled under its lock. A service that shares its store with others (an
    ``owner``: replicas) trims an idle channel under the channel's lease, which it takes, and
    keeps the budget only with channels it holds or nobody holds. Stored objects that no row
    names (a write that never committed, a state deleted since) go after :data:`OBJECT_GRACE_S`.
    """
    policy = service.config.states
    now = time.time() if now is None else now
    retired = frozen = 0
    if policy.retention_s > 0:
        cutoff = now - policy.retention_s
        skipped: set[str] = set()
        while True:
            batch = [c for c in await service.store.admin.idle_channels(cutoff, 100) if c not in skipped]
            if not batch:
                break
            for channel in batch:
                async with service._channel(channel):  # re-checked inside: it may have woken up
                    # Idle for the whole retention, the channel is served by no replica: this
                    # one takes its lease (a replica that still remembers it takes it back, and
                    # re-reads the durable head, at its next message).
                    await service._lease(channel)
                    if await service.states.retire(channel, unused_since=cutoff):
                        retired += 1
                    else:
                        skipped.add(channel)
    if policy.db_bytes > 0:
        usage = await service.store.admin.checkpoint_usage()
        tried: set[str] = set()
        while usage > policy.db_bytes:
            candidates = [
                (c, size, used)
                for c, size, used in await service.store.admin.checkpointed_channels(100 + len(tried))
                if c not in tried and not service.busy(c) and service.states.tiers.where(c) is None
            ]
            if not candidates:
                log.warning(
                    "the database holds %d MB of states, over its budget of %d MB, all in use",
                    usage // MB,
                    policy.db_bytes // MB,
                )
                break
            for channel, size, used in candidates:
                if usage <= policy.db_bytes:
                    break
                tried.add(channel)
                if not await _ours_or_nobodys(service, channel):
                    continue  # another replica serves it (and keeps its own budget)
                async with service._channel(channel):  # re-checked inside: it may be in use now
                    await service._lease(channel)
                    if await service.states.freeze(channel, unused_since=used):
                        usage -= size
                        frozen += 1
    forgotten = 0
    if policy.transcript_s > 0:
        forgotten = await service.store.transcripts.delete_before(now - policy.transcript_s)
    collected = await service.store.admin.collect_objects(now - OBJECT_GRACE_S)
    if retired or frozen or forgotten or collected:
        log.info(
            "housekeeping: %d idle channels trimmed, %d kept as transcript only, "
            "%d old transcript lines deleted, %d orphaned objects collected",
            retired,
            frozen,
            forgotten,
            collected,
        )
    return {"retired": retired, "frozen": frozen, "transcript_lines": forgotten, "objects": collected}
