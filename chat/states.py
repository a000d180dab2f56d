"""Where conversation states live: on the device, in host memory, and durably in storage.

Tiers, each with a byte budget, least recently used channels moving down:

1. **device**: snapshots where the engine reads them (GPU memory; host memory for a CPU model);
2. **host**: snapshots moved off the device (pinned memory under CUDA, so the way back is fast)
   (the two memory tiers are :class:`chat.tiers.StateTiers`);
3. **durable**: every state, as checkpoints plus a token log (:class:`chat.storage.StateLog`);
4. **transcript only**: when the database's checkpoints outgrow their budget, the least recently
   used channels keep only their transcript, and their next message re-reads the last messages.

A turn stores the tokens it fed (a few hundred bytes), not the state: the state after a turn is
*defined* as the engine's read of those tokens from the state before, so reading them again after
a restart gives the same state bit for bit. That is why the state after a reply is read once more
from the state before it (a prefill, cheap next to the decoding): the decoding steps that produced
the reply round differently from a read. A whole state (checkpoint) is stored when the tokens to
re-read since the last one would exceed ``checkpoint_tokens``, which bounds both the bytes written
per turn and the time to restore a cold channel.

Several services may share one store (replicas, each serving some channels). Each then has an
owner name, and takes a channel's lease (:class:`chat.storage.Leases`) before it serves it: the
lease's epoch fences every write of the channel's states, so a replica that lost a channel to
another can never overwrite the newer conversation (:class:`chat.errors.FencedError`), and a
state in memory is used only while it is the durable head.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from chat.errors import FencedError
from chat.storage import HeadName, NewRef, NewState, StateBase, Storage, StoredState, Turn
from chat.tiers import StateTiers
from engine.errors import StateMismatchError
from engine.state import Snapshot

log = logging.getLogger(__name__)

MB = 1024 * 1024
DROPPED = "it had been idle and its stored state was dropped to save space"
Read = Callable[[Snapshot | None, list[int]], Awaitable[Snapshot]]


@dataclass(frozen=True)
class StatePolicy:
    """Budgets and intervals of state storage (from the settings)."""

    device_bytes: int = 2048 * MB
    host_bytes: int = 8192 * MB
    db_bytes: int = 0  # checkpoints in the database; 0: no limit
    checkpoint_tokens: int = 65536
    carry_over_tokens: int = 2048
    retention_s: float = 30 * 86400.0  # 0: keep everything
    transcript_s: float = 0.0  # transcript lines older than this are deleted; 0: kept


@dataclass(frozen=True)
class Loaded:
    """A state to start from: a stored one (``ref``) or a root (a blank or opening state)."""

    ref: int | None
    base: StateBase  # for roots: ZERO or INIT
    snapshot: Snapshot | None  # None: the blank state
    preset_key: str
    replay: int  # tokens to re-read from the nearest whole state to rebuild it


class CarryOver(Exception):
    """The chat state must be re-read from the transcript; the message says why."""


@dataclass(frozen=True)
class Step:
    """Tokens fed in one read, and the state after them."""

    tokens: list[int]
    snapshot: Snapshot


# ----------------------------------------------------------------------------- channel states


def conversation(turns: list[Turn]) -> list[tuple[str, str]]:
    """The (message, reply) pairs of the current conversation, from a channel's transcript."""
    current: list[tuple[str, str]] = []
    undo: list[tuple[str, str]] | None = None
    for turn in turns:
        if turn.command == "chat":
            current.append((turn.user_text, turn.reply_text))
        elif turn.command == "+" and current:
            current[-1] = (current[-1][0], turn.reply_text)
        elif turn.command == "+reset":
            if current:
                undo = current
            current = []
        elif turn.command == "undo-reset" and undo is not None:
            current, undo = undo, None
    return current


class ChannelStates:
    """Loads and stores the named states of channels through the tiers and the state log."""

    def __init__(
        self,
        storage: Storage,
        *,
        fingerprint: str,
        read: Read,
        policy: StatePolicy,
        opening: Callable[[str], Awaitable[Snapshot]],
        encode: Callable[[str], Awaitable[list[int]]],
    ) -> None:
        """``fingerprint`` and ``read`` are the loaded model's (:meth:`Engine.read`);
        ``opening(preset_key)`` gives a preset's opening state; ``encode`` tokenizes a text."""
        self.state_log = storage.states
        self._transcripts = storage.transcripts
        self._storage = storage
        self.epochs: dict[str, int] = {}  # the lease epochs of the channels this service holds
        self.fingerprint = fingerprint
        self._engine_read = read
        self.policy = policy
        self.tiers = StateTiers(policy.device_bytes, policy.host_bytes)
        self._opening = opening
        self._encode = encode
        self.restore_tokens = 0  # tokens re-read to restore states (monitoring)
        self.checkpoints_written = 0

    # ------------------------------------------------------------------------ leases

    async def lease(self, channel: str, owner: str) -> None:
        """Hold the channel's lease as ``owner``: kept while the store still names this service
        under its epoch, else taken (a new epoch). Taking it drops the channel's states in memory:
        another service may have written since, so only the durable head counts."""
        epoch = self.epochs.get(channel)
        leases = self._storage.leases
        if epoch is not None and await leases.holder(channel) == (owner, epoch):
            return
        if epoch is not None:
            log.info("channel %s: another replica served it since epoch %d; taking it back", channel, epoch)
        self.forget(channel)
        self.epochs[channel] = await leases.take(channel, owner)

    def forget(self, channel: str) -> None:
        """Forget the channel's lease and its states in memory (another service holds it)."""
        self.epochs.pop(channel, None)
        self.tiers.drop(channel)

    def fence(self, channel: str) -> int | None:
        """The epoch the channel's writes are fenced with: None when no lease is held."""
        return self.epochs.get(channel)

    # ------------------------------------------------------------------------ reading

    def root(self, snapshot: Snapshot | None, preset_key: str) -> Loaded:
        """A start from the blank state (``snapshot`` None) or from a preset's opening state."""
        base = StateBase.ZERO if snapshot is None else StateBase.INIT
        return Loaded(None, base, snapshot, preset_key, 0)

    async def load(self, channel: str, name: HeadName, notices: list[str]) -> Loaded | None:
        """The channel's state ``name``, or None when it has none (or it cannot be used).

        Raises :class:`CarryOver` when the chat state must be re-read from the transcript (the
        model changed, the stored state is damaged, or it was dropped to save space); other
        states that cannot be used are dropped with a notice.
        """
        heads = await self.state_log.heads(channel)
        state_id = heads.get(HeadName(name))
        if state_id is None:
            if name == HeadName.CHAT and await self.state_log.rebuild_pending(channel):
                raise CarryOver(DROPPED)
            return None
        held = self.tiers.get(channel, state_id)
        try:
            state = await self.state_log.state(state_id)
            if state.fingerprint != self.fingerprint:
                if name == HeadName.CHAT:
                    raise CarryOver("the model changed")
                what = "reply" if name == HeadName.CHAT_PRE else "generation"
                notices.append(f"The last {what} was made with another model and cannot be reused.")
                return None
            if held is None:
                held = await self._restore(channel, await self.state_log.chain(state_id))
                self.tiers.hold(channel, {state_id: held}, set(heads.values()))
                self.tiers.stats.restored += 1
        except StateMismatchError as exc:
            log.warning("channel %s: the stored %s state is unusable: %s", channel, name, exc)
            if name == HeadName.CHAT:
                raise CarryOver("its stored state was damaged") from exc
            notices.append(f"The stored {name} state could not be used ({exc}).")
            return None
        return Loaded(state_id, StateBase.PARENT, held, state.preset_key, state.replay)

    async def durable(self, channel: str, name: HeadName) -> Snapshot | None:
        """The state ``name`` rebuilt from the database alone (what a restart would find)."""
        state_id = (await self.state_log.heads(channel)).get(HeadName(name))
        if state_id is None:
            return None
        return await self._restore(channel, await self.state_log.chain(state_id), use_memory=False)

    async def _restore(self, channel: str, chain: list[StoredState], use_memory: bool = True) -> Snapshot:
        """Rebuild the last state of ``chain``: from the nearest one in memory, else from the
        stored base, re-reading the logged tokens."""
        held = self.tiers.held(channel) if use_memory else {}
        start = 0
        snapshot: Snapshot | None = None
        for index in range(len(chain) - 1, -1, -1):
            if chain[index].id in held:
                start, snapshot = index + 1, held[chain[index].id]
                break
        else:
            base = chain[0]
            if base.base == StateBase.CHECKPOINT:
                stored = await self.state_log.load_checkpoint(base.id, self.fingerprint)
                snapshot = replace(stored, meta={**stored.meta, **base.meta})
            elif base.base == StateBase.INIT:
                snapshot = await self._opening(base.preset_key)
                if base.tokens:
                    snapshot = await self._read(snapshot, base.tokens)
                snapshot = replace(snapshot, meta=dict(base.meta))
            else:
                snapshot = replace(await self._read(None, base.tokens), meta=dict(base.meta))
            start = 1
        for row in chain[start:]:
            assert snapshot is not None
            snapshot = replace(await self._read(snapshot, row.tokens), meta=dict(row.meta))
        assert snapshot is not None
        return snapshot

    async def _read(self, start: Snapshot | None, tokens: list[int]) -> Snapshot:
        self.restore_tokens += len(tokens)
        snapshot = await self._engine_read(start, tokens)
        self.tiers.learn(snapshot)
        return snapshot

    # ------------------------------------------------------------------------ writing

    async def commit(
        self,
        channel: str,
        start: Loaded,
        steps: list[Step],
        heads: dict[HeadName, int],
        turn: Turn | None,
    ) -> dict[HeadName, Loaded]:
        """Store ``steps`` (each read from the previous, the first from ``start``) and point
        ``heads`` at them (by step index; -1 is ``start``); returns the heads as new starts."""
        fingerprint = self.fingerprint
        new: list[NewState] = []
        replays: list[int] = []
        replay = start.replay
        for index, step in enumerate(steps):
            replay += len(step.tokens)
            whole = replay > self.policy.checkpoint_tokens
            if index == 0 and start.ref is None:
                base, parent = start.base, None
            else:
                base, parent = StateBase.PARENT, (NewRef(index - 1) if index else start.ref)
            new.append(
                NewState(
                    base=base,
                    preset_key=start.preset_key,
                    tokens=step.tokens,
                    replay=replay,
                    fingerprint=fingerprint,
                    parent=parent,
                    meta=dict(step.snapshot.meta),
                    checkpoint=step.snapshot if whole else None,
                )
            )
            if whole:
                replay = 0
                self.checkpoints_written += 1
            replays.append(replay)
        targets: dict[str, int | NewRef | None] = {}
        for name, index in heads.items():
            if index < 0:
                if start.ref is None:
                    raise ValueError("a root state cannot be a head without tokens")
                targets[name] = start.ref
            else:
                targets[name] = NewRef(index)
        ids = await self.state_log.write_states(channel, new, targets, turn, epoch=self.fence(channel))
        if steps:
            self.tiers.learn(steps[-1].snapshot)
        made = {state_id: step.snapshot for state_id, step in zip(ids, steps, strict=True)}
        if start.ref is not None and start.snapshot is not None:
            made[start.ref] = start.snapshot
        self.tiers.hold(channel, made, set((await self.state_log.heads(channel)).values()))
        result: dict[HeadName, Loaded] = {}
        for name, index in heads.items():
            if index < 0:
                result[name] = start
            else:
                result[name] = Loaded(
                    ids[index], StateBase.PARENT, steps[index].snapshot, start.preset_key, replays[index]
                )
        return result

    async def reset(self, channel: str, preset_key: str, turn: Turn) -> None:
        """Point chat at the opening state; the conversation stays as undo_chat(_pre)."""
        heads = await self.state_log.heads(channel)
        targets: dict[str, int | NewRef | None] = {HeadName.CHAT: NewRef(0), HeadName.CHAT_PRE: None}
        if HeadName.CHAT in heads:
            targets[HeadName.UNDO_CHAT] = heads[HeadName.CHAT]
            targets[HeadName.UNDO_CHAT_PRE] = heads.get(HeadName.CHAT_PRE)
        opening = NewState(StateBase.INIT, preset_key, [], 0, self.fingerprint)
        await self.state_log.write_states(channel, [opening], targets, turn, epoch=self.fence(channel))
        self.tiers.drop(channel)

    async def undo_reset(self, channel: str, turn: Turn) -> bool:
        """Bring back the conversation of before the last reset; False when there is none."""
        heads = await self.state_log.heads(channel)
        if HeadName.UNDO_CHAT not in heads:
            return False
        targets: dict[str, int | NewRef | None] = {
            HeadName.CHAT: heads[HeadName.UNDO_CHAT],
            HeadName.CHAT_PRE: heads.get(HeadName.UNDO_CHAT_PRE),
            HeadName.UNDO_CHAT: None,
            HeadName.UNDO_CHAT_PRE: None,
        }
        await self.state_log.write_states(channel, [], targets, turn, epoch=self.fence(channel))
        self.tiers.drop(channel)
        return True

    async def carry_over(
        self, channel: str, preset_key: str, chat_turn: Callable[[str], str], reason: str, notices: list[str]
    ) -> Loaded:
        """Re-read the newest messages of the transcript (within ``carry_over_tokens``) into the
        preset's opening state, store that as the chat state, and say so."""
        pairs = conversation(await self._transcripts.turns(channel))
        budget = self.policy.carry_over_tokens
        pieces: list[list[int]] = []
        used = 0
        for message, reply in reversed(pairs):
            tokens = await self._encode(chat_turn(message)) + await self._encode(f" {reply}\n\n")
            if used + len(tokens) > budget:
                break
            pieces.append(tokens)
            used += len(tokens)
        pieces.reverse()
        tokens = [t for piece in pieces for t in piece]
        opening = await self._opening(preset_key)
        snapshot = await self._read(opening, tokens) if tokens else opening
        snapshot = replace(snapshot, meta={})
        state = NewState(StateBase.INIT, preset_key, tokens, len(tokens), self.fingerprint)
        heads: dict[str, int | NewRef | None] = {name: None for name in HeadName if name != HeadName.CHAT}
        heads[HeadName.CHAT] = NewRef(0)
        (state_id,) = await self.state_log.write_states(channel, [state], heads, epoch=self.fence(channel))
        self.tiers.put(channel, {state_id: snapshot})
        if pairs:
            notices.append(
                f"This conversation was re-read from its last {len(pieces)} of {len(pairs)} "
                f"messages, because {reason}."
            )
        elif reason != DROPPED:  # nothing to re-read: as if it had never been dropped
            notices.append(f"This conversation starts afresh, because {reason}.")
        log.info("channel %s: carried over %d messages (%d tokens): %s", channel, len(pieces), used, reason)
        return Loaded(state_id, StateBase.INIT, snapshot, preset_key, len(tokens))

    # ------------------------------------------------------------------------ housekeeping

    async def retire(self, channel: str, unused_since: float) -> bool:
        """A channel not used since ``unused_since`` keeps only its chat state (and what
        rebuilding it needs); False when it was used in the meantime (or another service holds
        it now)."""
        try:
            dropped = await self.state_log.drop_states(
                channel, keep=(HeadName.CHAT,), unused_since=unused_since, epoch=self.fence(channel)
            )
        except FencedError:
            self.forget(channel)
            return False
        if not dropped:
            return False
        heads = await self.state_log.heads(channel)
        self.tiers.keep_only(channel, set(heads.values()))
        return True

    async def freeze(self, channel: str, unused_since: float) -> bool:
        """Drop the stored states of a channel not used since ``unused_since`` and not in memory;
        its next message re-reads the transcript. False when it was used in the meantime (or
        another service holds it now)."""
        if self.tiers.where(channel) is not None:
            return False
        try:
            return await self.state_log.drop_states(
                channel, unused_since=unused_since, rebuild=True, epoch=self.fence(channel)
            )
        except FencedError:
            self.forget(channel)
            return False

    def metrics(self) -> dict[str, Any]:
        """Tier occupancy and moves, for status and monitoring."""
        stats = self.tiers.stats
        return {
            **self.tiers.usage(),
            "device_budget_bytes": self.policy.device_bytes,
            "host_budget_bytes": self.policy.host_bytes,
            "promoted": stats.promoted,
            "demoted": stats.demoted,
            "evicted": stats.evicted,
            "restored": stats.restored,
            "restore_tokens": self.restore_tokens,
            "checkpoints_written": self.checkpoints_written,
        }
