"""What a message gives back: text pieces while the model writes, then one :class:`Outcome`."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from engine.interface import TextDelta
from engine.thinking import split_thinking, visible_text


class OutcomeKind(enum.StrEnum):
    """What an outcome is, for the front end to show it (and ``--jsonl`` to name it)."""

    REPLY = "reply"  # a chat reply (also ``+``)
    GENERATION = "generation"  # +gen +i +qq +qa ++ +++
    NOTICE = "notice"
    ERROR = "error"
    HELP = "help"
    FAQ = "faq"

    @property
    def from_model(self) -> bool:
        """True for what the model wrote (streamed), False for the bot's own answers."""
        return self in (OutcomeKind.REPLY, OutcomeKind.GENERATION)


@dataclass(frozen=True)
class Outcome:
    """The result of one message: what the front end shows (and ``--jsonl`` prints)."""

    kind: OutcomeKind
    text: str
    notices: tuple[str, ...] = ()
    sampling: dict[str, float] | None = None
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    stop_reason: str | None = None
    thinking: str | None = None  # the text of <think> sections, for a front end to fold or hide

    @property
    def answer(self) -> str:
        """The text without thinking sections."""
        return visible_text(self.text).strip() if self.thinking is not None else self.text

    def as_json(self) -> dict[str, Any]:
        """The JSON object of ``--jsonl`` output."""
        data: dict[str, Any] = {"kind": self.kind.value, "text": self.text}
        if self.notices:
            data["notices"] = list(self.notices)
        if self.sampling is not None:
            data["sampling"] = self.sampling
            data["tokens"] = self.tokens
            data["prompt_tokens"] = self.prompt_tokens
            data["stop_reason"] = self.stop_reason
            data["thinking"] = self.thinking
            data["answer"] = self.answer
        return data


ChatEvent = TextDelta | Outcome

__all__ = ["ChatEvent", "Outcome", "OutcomeKind", "split_thinking"]
