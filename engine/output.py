"""The output processor: the stop rules and the streaming of one generation, for both engines.

The reference chat's rules, kept here once (the one-sequence loop of :mod:`engine.generation`
and the batched engine both run them):

- a chat reply ends at its first blank line; with a thinking preset, blank lines inside
  ``<think>...</think>`` do not count; it never ends by end-of-text (the shaping bans it);
- a free generation (+gen, +qa...) ends at end-of-text (not fed, not part of the text), or at
  the first whole character at or after ``max_tokens``, and at ``max_tokens + extra_tokens``
  at the latest;
- text is streamed as it forms: pieces that end inside a multi-byte character are held back
  until the character is whole (or ``PENDING_LIMIT`` tokens did not make one); the rest of the
  text comes before :class:`~engine.interface.Finished`.
"""

from __future__ import annotations

from engine.interface import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    ReplyMode,
    StopReason,
    TextDelta,
)
from engine.state import Snapshot
from engine.thinking import visible_text
from engine.tokenizer import Tokenizer

PENDING_LIMIT = 16  # emit text anyway once this many tokens failed to form whole characters


class OutputProcessor:
    """One generation's tokens, streamed text and stop rules; the engine samples and feeds."""

    def __init__(self, request: GenerationRequest, tokenizer: Tokenizer) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.chat = request.mode is ReplyMode.CHAT
        self.limit = request.max_tokens if self.chat else request.max_tokens + request.extra_tokens
        self.tokens: list[int] = []
        self.emitted = 0  # tokens already turned into streamed text
        self.text = ""

    @property
    def index(self) -> int:
        """The index of the token being generated (from 0)."""
        return len(self.tokens)

    def stop_before_sampling(self) -> StopReason | None:
        """The reason to end before this index's token is sampled, if any."""
        if self.index >= self.limit:
            return StopReason.LENGTH
        if self.request.cancel.is_set():
            return StopReason.CANCELLED
        return None

    def stop_at(self, token: int) -> StopReason | None:
        """The reason to end at a sampled token, before it is fed: end-of-text ends a free
        generation."""
        if not self.chat and token == self.tokenizer.eos_id:
            return StopReason.END_OF_TEXT
        return None

    def accept(self, token: int) -> tuple[list[GenerationEvent], StopReason | None]:
        """After ``token`` was fed: stream its text and apply the stop rules."""
        index = self.index
        self.tokens.append(token)
        events: list[GenerationEvent] = []
        piece = self.tokenizer.decode(self.tokens[self.emitted :])
        clean = "\ufffd" not in piece
        grew = clean or len(self.tokens) - self.emitted >= PENDING_LIMIT
        if grew:
            self.text += piece
            self.emitted = len(self.tokens)
            if piece:
                events.append(TextDelta(piece))
        if self.chat:
            if self.request.thinking:
                ended = "\n\n" in visible_text(self.text)
            else:  # the text before this piece had no blank line: look at the new end only
                ended = grew and "\n\n" in self.text[-len(piece) - 1 :]
            if ended:
                return events, StopReason.END_OF_TURN
        elif clean and index + 1 >= self.request.max_tokens:
            return events, StopReason.LENGTH
        if self.index >= self.limit:
            return events, StopReason.LENGTH
        return events, None

    def rest(self) -> TextDelta | None:
        """The text still held back (the generation is over), if any."""
        if self.emitted >= len(self.tokens):
            return None
        piece = self.tokenizer.decode(self.tokens[self.emitted :])
        self.text += piece
        self.emitted = len(self.tokens)
        return TextDelta(piece) if piece else None

    def finish(self, reason: StopReason, snapshot: Snapshot, prompt_tokens: int) -> list[GenerationEvent]:
        """The text still held back, then :class:`~engine.interface.Finished`."""
        rest = self.rest()
        finished = Finished(snapshot, self.tokens, self.text, reason, prompt_tokens)
        return [finished] if rest is None else [rest, finished]
