"""The one interface the rest of the program uses to run a model.

Callers describe a whole generation as a :class:`GenerationRequest` (a start snapshot, the prompt
tokens, the sampling and stop policy) and read :class:`GenerationEvent` objects from an async
iterator. Whether the tokens come from the reference implementation one sequence at a time or from
a batched worker pool is the engine's business: callers do not change.
"""

from __future__ import annotations

import enum
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from engine.formats import ModelSpec
from engine.sampling import SamplingParams
from engine.state import Snapshot
from engine.tokenizer import Tokenizer


class ReplyMode(enum.Enum):
    """The stop and shaping rules of a generation."""

    CHAT = "chat"  # newline shaping, end-of-text banned, ends at a blank line
    FREE = "free"  # +gen/+i/+qq/+qa: ends at end-of-text or the length limit


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: feed ``prompt`` to ``start`` (or to a zero state), then sample."""

    start: Snapshot | None
    prompt: list[int]
    sampling: SamplingParams
    mode: ReplyMode
    max_tokens: int  # CHAT: hard cap; FREE: stop at the first clean text boundary past this
    extra_tokens: int = 100  # FREE: at most this many more to end on a whole character
    newline_bias: float = 0.0  # FREE: added to the newline logit (+qa uses -2)
    thinking: bool = False  # CHAT: a blank line inside <think>...</think> does not end the reply
    seed: int | None = None
    cancel: threading.Event = field(default_factory=threading.Event, compare=False)

    def snapshot_meta(self) -> dict[str, Any]:
        """What the snapshots of this generation record of how they were made (``++`` repeats
        the mode)."""
        return {"mode": self.mode.value, "newline_bias": self.newline_bias}


class StopReason(enum.Enum):
    """Why a generation ended."""

    END_OF_TURN = "end_of_turn"  # chat: a blank line
    END_OF_TEXT = "end_of_text"  # free: the end-of-text token
    LENGTH = "length"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class PromptRead:
    """The prompt has been fed; ``snapshot`` is the state right before the first sampled token."""

    snapshot: Snapshot


@dataclass(frozen=True)
class TextDelta:
    """New text of the reply (never a split multi-byte character)."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The generation is over; ``snapshot`` is the state after the last fed token."""

    snapshot: Snapshot
    tokens: list[int]
    text: str
    reason: StopReason
    prompt_tokens: int


GenerationEvent = PromptRead | TextDelta | Finished


class Engine(ABC):
    """A loaded model that runs generations without blocking the event loop."""

    spec: ModelSpec
    tokenizer: Tokenizer

    @abstractmethod
    async def read(self, start: Snapshot | None, tokens: list[int]) -> Snapshot:
        """Feed tokens to a snapshot (or a zero state) and return the new snapshot."""

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Run a generation; events arrive as tokens are produced, :class:`Finished` last.

        Closing the iterator early (or setting ``request.cancel``) stops the generation.
        """

    @abstractmethod
    async def close(self) -> None:
        """Release the model; pending generations end with an error."""

    async def shared(self, snapshot: Snapshot) -> Snapshot:
        """A snapshot that many conversations start from (a preset's opening), placed where no
        device owns it; on one device that is where it is."""
        return snapshot

    def describe(self) -> str:
        """A line for logs and status: the model and where it runs."""
        return self.spec.describe()

    def metrics(self) -> dict[str, float]:
        """Numbers for status and monitoring (queue, batch, tokens/s...); empty when not tracked."""
        return {}

    def device_metrics(self) -> dict[str, dict[str, float]]:
        """Each device's own numbers (as :meth:`metrics`), by device name, for an engine that
        spans several devices; empty otherwise."""
        return {}
