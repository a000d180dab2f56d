"""What every storage backend stores and returns: turns, state rows, head and base names.

These types and the checksum of a state row are the same for every backend: a state written by
one backend verifies the same way when read back by another (a dump moved between them).
"""

from __future__ import annotations

import json
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from chat.errors import StoreError
from engine.checksums import checksum
from engine.errors import StateMismatchError

if TYPE_CHECKING:
    from engine.state import Snapshot

__all__ = [
    "STATE_COLUMNS",
    "HeadName",
    "NewRef",
    "NewState",
    "StateBase",
    "StateRow",
    "StoredState",
    "Turn",
    "decode_snapshot",
    "encode_snapshot",
    "pack_tokens",
    "state_checksum",
    "state_from_row",
    "state_row",
    "unpack_tokens",
    "verified_chain",
]


class HeadName(StrEnum):
    """The named states of a channel (stored as these strings)."""

    CHAT = "chat"  # the conversation, after the bot's last reply
    CHAT_PRE = "chat_pre"  # the conversation before the last reply (what + re-rolls from)
    GEN_0 = "gen_0"  # a generation's prompt read (what ++ continues from)
    GEN_1 = "gen_1"  # after the last generation
    UNDO_CHAT = "undo_chat"  # the conversation before the last reset
    UNDO_CHAT_PRE = "undo_chat_pre"


class StateBase(StrEnum):
    """What a state row's tokens were fed to (stored as these strings)."""

    PARENT = "parent"  # the state ``parent_id``
    ZERO = "zero"  # the blank state
    INIT = "init"  # the opening state of ``preset_key``
    CHECKPOINT = "checkpoint"  # nothing: the state is stored whole


@dataclass(frozen=True)
class Turn:
    """One answered message, for the channel's transcript."""

    command: str
    user_text: str
    reply_text: str
    reply_tokens: int


@dataclass(frozen=True)
class NewRef:
    """A state added earlier in the same ``StateLog.write_states`` call (by position)."""

    index: int


@dataclass(frozen=True)
class NewState:
    """A state to store: ``tokens`` fed in one read to its parent (``base=PARENT``), to a blank
    state (``ZERO``) or to the opening state of ``preset_key`` (``INIT``). With ``checkpoint``
    the state is stored whole as well, and nothing before it is needed any more."""

    base: StateBase
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
    base: StateBase
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
        if self.checksum is None and self.base == StateBase.CHECKPOINT and not self.tokens:
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


# The columns :func:`state_from_row` reads, in its order (``states`` aliased ``s``).
STATE_COLUMNS = (
    "s.id, s.channel_id, s.parent_id, s.base, s.preset_key, s.tokens, s.replay, s.meta, "
    "s.model_fingerprint, s.checksum"
)


@dataclass(frozen=True)
class StateRow:
    """The values of a new ``states`` row (besides its channel, preset and model), checksum
    included: what every backend inserts for a :class:`NewState`."""

    parent_id: int | None
    base: str
    tokens: bytes
    replay: int
    meta: str
    checksum: str


def state_row(channel_id: str, item: NewState, ids: Sequence[int], *, whole: bool) -> StateRow:
    """The row of ``item``: ``ids`` are the states added before it in the same write (what a
    :class:`NewRef` parent names); ``whole`` when it is stored as a checkpoint (no tokens, no
    parent). StoreError for a logged state without a parent."""
    parent = ids[item.parent.index] if isinstance(item.parent, NewRef) else item.parent
    base: str = StateBase.CHECKPOINT if whole else item.base  # a wrong one: the schema's CHECK fails
    if base == StateBase.PARENT and parent is None:
        raise StoreError("a logged state needs a parent")
    parent = parent if base == StateBase.PARENT else None
    tokens = b"" if whole else pack_tokens(item.tokens)
    meta = json.dumps(item.meta, sort_keys=True)
    replay = 0 if whole else item.replay
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
    return StateRow(parent, base, tokens, replay, meta, digest)


def verified_chain(state_id: int, rows: Iterable[Sequence[Any]]) -> list[StoredState]:
    """The rows of ``state_id``'s log (:data:`STATE_COLUMNS` of each link, its stored base
    first; a link whose row is gone has None in its id) as checked states; StateMismatchError
    when a link is missing, damaged, or the log does not start at a stored base."""
    chain = []
    for row in rows:
        if row[0] is None:
            raise StateMismatchError(f"stored state {state_id} lost a link of its log")
        state = state_from_row(row)
        state.verify()
        chain.append(state)
    if not chain or chain[0].base == StateBase.PARENT:
        raise StateMismatchError(f"stored state {state_id} is missing")
    return chain


def state_from_row(row: Sequence[Any]) -> StoredState:
    """A state row as every backend selects it: id, channel, parent, base, preset, packed tokens,
    replay, metadata (JSON), model fingerprint, checksum."""
    raw_tokens, raw_meta = bytes(row[5]), str(row[7])
    try:
        meta = dict(json.loads(raw_meta))
    except (ValueError, TypeError) as exc:
        raise StateMismatchError(f"stored state {row[0]} has damaged metadata") from exc
    return StoredState(
        id=int(row[0]),
        channel_id=str(row[1]),
        parent_id=None if row[2] is None else int(row[2]),
        base=StateBase(row[3]),
        preset_key=str(row[4]),
        tokens=unpack_tokens(raw_tokens),
        replay=int(row[6]),
        meta=meta,
        fingerprint=str(row[8]),
        checksum=None if row[9] is None else str(row[9]),
        raw_tokens=raw_tokens,
        raw_meta=raw_meta,
    )


def encode_snapshot(snapshot: Snapshot) -> tuple[bytes, str]:
    """A whole state as stored, and its checksum."""
    data = snapshot.to_bytes()
    return data, checksum(data)


def decode_snapshot(data: bytes, digest: str, fingerprint: str) -> Snapshot:
    """A stored whole state, checked against its checksum and model (StateMismatchError)."""
    from engine.state import Snapshot  # torch: only where a state is read

    if checksum(data) != digest:
        raise StateMismatchError("a stored state failed its checksum")
    return Snapshot.from_bytes(data, fingerprint)
