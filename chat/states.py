"""Where conversation states live: on the device, in host memory, and durably in SQLite.

Tiers, each with a byte budget, least recently used channels moving down:

1. **device**: snapshots where the engine reads them (GPU memory; host memory for a CPU model);
2. **host**: snapshots moved off the device (pinned memory under CUDA, so the way back is fast);
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
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from chat.storage import HeadName, NewRef, NewState, StateBase, Storage, StoredState, Turn
from engine.errors import StateMismatchError
from engine.state import Snapshot, move_snapshot

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


# ------------------------------------------------------------------------------------ memory tiers


@dataclass
class _Entry:
    states: dict[int, Snapshot]
    home: list[torch.device] | None = None  # where the states were before they moved to the host
    by_device: dict[torch.device, int] = field(init=False)  # bytes of the states on each device

    def __post_init__(self) -> None:
        self.recount()

    def recount(self) -> None:
        """Count the bytes again after ``states`` changed or moved."""
        self.by_device = {}
        for snapshot in self.states.values():
            for tensor in (*snapshot.tensors, snapshot.logits):
                self.by_device[tensor.device] = self.by_device.get(tensor.device, 0) + tensor.nbytes

    @property
    def nbytes(self) -> int:
        return sum(self.by_device.values())


@dataclass
class TierStats:
    """Counters of moves between tiers."""

    promoted: int = 0  # host -> device
    demoted: int = 0  # device -> host
    evicted: int = 0  # host -> durable only
    restored: int = 0  # durable -> device (re-read from SQLite)


class StateTiers:
    """The device and host tiers: each channel's states, by state id, in LRU order by channel.

    The channel being used is never moved down, so a tier may exceed its budget by one channel.
    """

    def __init__(self, device_bytes: int, host_bytes: int) -> None:
        self.device_bytes = device_bytes
        self.host_bytes = host_bytes
        # Where the engine reads each state tensor (then the logits), learnt from its snapshots;
        # until then states stay where they are.
        self.layout: list[torch.device] | None = None
        self._device: OrderedDict[str, _Entry] = OrderedDict()
        self._host: OrderedDict[str, _Entry] = OrderedDict()
        self.stats = TierStats()

    def usage(self) -> dict[str, int]:
        """Channels and bytes per tier."""
        return {
            "device_channels": len(self._device),
            "device_bytes": sum(e.nbytes for e in self._device.values()),
            "host_channels": len(self._host),
            "host_bytes": sum(e.nbytes for e in self._host.values()),
        }

    def device_usage(self) -> dict[str, int]:
        """Bytes of the device tier on each device, by device name (``cuda:0``...)."""
        used: dict[str, int] = {}
        for entry in self._device.values():
            for device, n in entry.by_device.items():
                used[str(device)] = used.get(str(device), 0) + n
        return used

    def where(self, channel: str) -> str | None:
        """``"device"``, ``"host"`` or None."""
        if channel in self._device:
            return "device"
        return "host" if channel in self._host else None

    def learn(self, snapshot: Snapshot) -> None:
        """Take the devices of a snapshot the engine made as where states belong."""
        self.layout = _layout(snapshot)

    def _home(self, snapshot: Snapshot, home: list[torch.device] | None = None) -> Snapshot:
        """The snapshot where the engine reads it: a state already on a GPU stays on it (with
        several GPUs, each keeps its channels), one in host memory goes back to the GPU it came
        from (``home``), else to the devices of the engine's latest snapshot."""
        layout = home or self.layout
        if layout is None or len(layout) != len(snapshot.tensors) + 1:
            return snapshot
        if any(t.device.type != "cpu" for t in snapshot.tensors):
            return snapshot
        return move_snapshot(snapshot, layout)

    def get(self, channel: str, state_id: int) -> Snapshot | None:
        """A state held in memory, brought to the device first."""
        entry = self._device.get(channel)
        if entry is None:
            entry = self._host.pop(channel, None)
            if entry is None or state_id not in entry.states:
                if entry is not None:
                    self._host[channel] = entry
                return None
            entry.states = {k: self._home(v, entry.home) for k, v in entry.states.items()}
            entry.recount()
            entry.home = None
            self._device[channel] = entry
            self.stats.promoted += 1
            self._shrink(protect=channel)
        self._device.move_to_end(channel)
        return entry.states.get(state_id)

    def put(self, channel: str, states: dict[int, Snapshot]) -> None:
        """Hold exactly ``states`` for the channel, on the device, as the most recently used."""
        from_host = self._host.pop(channel, None)
        self._device.pop(channel, None)
        if not states:
            return
        # Back to the GPU the channel came from, unless one of its states is on a GPU already
        # (a state just read there): the others join it.
        on_gpu = [v for v in states.values() if any(t.device.type != "cpu" for t in v.tensors)]
        home = from_host.home if from_host is not None else None
        if on_gpu:
            home = _layout(on_gpu[0])
        placed = {k: self._home(v, home) for k, v in states.items()}
        self._device[channel] = _Entry(placed)
        self._shrink(protect=channel)

    def hold(self, channel: str, states: dict[int, Snapshot], live: set[int]) -> None:
        """Add ``states`` to the channel's, keep those in ``live`` (the ids its heads name), and
        put them on the device as the most recently used."""
        merged = {**self.held(channel), **states}
        self.put(channel, {k: v for k, v in merged.items() if k in live})

    def keep_only(self, channel: str, state_ids: set[int]) -> None:
        """Forget the channel's other states, leaving it in its tier and place in the order."""
        for tier in (self._device, self._host):
            entry = tier.get(channel)
            if entry is not None:
                entry.states = {k: v for k, v in entry.states.items() if k in state_ids}
                entry.recount()
                if not entry.states:
                    del tier[channel]

    def held(self, channel: str) -> dict[int, Snapshot]:
        """The states held for a channel (without moving them)."""
        entry = self._device.get(channel) or self._host.get(channel)
        return dict(entry.states) if entry else {}

    def drop(self, channel: str) -> None:
        """Forget a channel's states (they are durable in the database)."""
        self._device.pop(channel, None)
        self._host.pop(channel, None)

    def _shrink(self, protect: str) -> None:
        """Move the least recently used channels of each device over its budget (the budget is
        per device: with several GPUs, each keeps its own channels) to host memory, and the
        least recently used in host memory out of memory while the host tier is over budget."""
        used: dict[torch.device, int] = {}
        for entry in self._device.values():
            for device, n in entry.by_device.items():
                used[device] = used.get(device, 0) + n
        for name, entry in list(self._device.items()):
            over = {device for device, n in used.items() if n > self.device_bytes}
            if not over:
                break
            if name == protect or not over & entry.by_device.keys():
                continue
            del self._device[name]
            for device, n in entry.by_device.items():
                used[device] -= n
            if entry.states:
                entry.home = _layout(next(iter(entry.states.values())))
            host = torch.device("cpu")
            entry.states = {
                k: move_snapshot(v, [host] * (len(v.tensors) + 1)) for k, v in entry.states.items()
            }
            entry.recount()
            self._host[name] = entry
            self._host.move_to_end(name)
            self.stats.demoted += 1
        on_host = sum(e.nbytes for e in self._host.values())
        while on_host > self.host_bytes and self._host:
            _, entry = self._host.popitem(last=False)
            on_host -= entry.nbytes
            self.stats.evicted += 1


def _layout(snapshot: Snapshot) -> list[torch.device]:
    """The devices of a snapshot's tensors, then of its logits (as ``move_snapshot`` takes them)."""
    return [t.device for t in snapshot.tensors] + [snapshot.logits.device]


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
        self.fingerprint = fingerprint
        self._engine_read = read
        self.policy = policy
        self.tiers = StateTiers(policy.device_bytes, policy.host_bytes)
        self._opening = opening
        self._encode = encode
        self.restore_tokens = 0  # tokens re-read to restore states (monitoring)
        self.checkpoints_written = 0

    # ------------------------------------------------------------------------ reading

    def root(self, snapshot: Snapshot | None, preset_key: str) -> Loaded:
        """A start from the blank state (``snapshot`` None) or from a preset's opening state."""
        base = StateBase.ZERO if snapshot is None else StateBase.INIT
        return Loaded(None, base, snapshot, preset_key, 0)

    async def load(self, channel: str, name: str, notices: list[str]) -> Loaded | None:
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

    async def durable(self, channel: str, name: str) -> Snapshot | None:
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
        heads: dict[str, int],
        turn: Turn | None,
    ) -> dict[str, Loaded]:
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
        ids = await self.state_log.write_states(channel, new, targets, turn)
        if steps:
            self.tiers.learn(steps[-1].snapshot)
        made = {state_id: step.snapshot for state_id, step in zip(ids, steps, strict=True)}
        if start.ref is not None and start.snapshot is not None:
            made[start.ref] = start.snapshot
        self.tiers.hold(channel, made, set((await self.state_log.heads(channel)).values()))
        result: dict[str, Loaded] = {}
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
        await self.state_log.write_states(channel, [opening], targets, turn)
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
        await self.state_log.write_states(channel, [], targets, turn)
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
        (state_id,) = await self.state_log.write_states(channel, [state], heads)
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
        rebuilding it needs); False when it was used in the meantime."""
        if not await self.state_log.drop_states(channel, keep=(HeadName.CHAT,), unused_since=unused_since):
            return False
        heads = await self.state_log.heads(channel)
        self.tiers.keep_only(channel, set(heads.values()))
        return True

    async def freeze(self, channel: str, unused_since: float) -> bool:
        """Drop the stored states of a channel not used since ``unused_since`` and not in memory;
        its next message re-reads the transcript. False when it was used in the meantime."""
        if self.tiers.where(channel) is not None:
            return False
        return await self.state_log.drop_states(channel, unused_since=unused_since, rebuild=True)

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
