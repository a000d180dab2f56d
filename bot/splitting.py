"""Splitting long text into Discord messages (2,000 characters each) without breaking code blocks.

``split_raw`` cuts the text at paragraph, then line, then word boundaries; its pieces concatenate
to the original. ``split_message`` then closes a code block that a cut falls inside and reopens it
(same language) at the top of the next piece, so every message renders on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

DISCORD_LIMIT = 2000
_LANG_MAX = 16  # a fence's language tag longer than this is not carried over
_RESERVE = len("```") + _LANG_MAX + len("\n") + len("\n```")


@dataclass(frozen=True)
class FenceState:
    """Whether a text ends inside a code block, and the block's language."""

    inside: bool = False
    lang: str = ""

    def after(self, text: str) -> FenceState:
        """The state at the end of ``text`` when it starts in this state."""
        inside, lang = self.inside, self.lang
        for line in text.split("\n"):
            stripped = line.strip()
            if stripped.startswith("```"):
                if inside:
                    inside, lang = False, ""
                else:
                    tag = stripped[3:].strip()
                    inside, lang = True, tag if tag.isidentifier() and len(tag) <= _LANG_MAX else ""
        return FenceState(inside, lang)


def _cut(text: str, budget: int) -> int:
    """Where to end the first piece of ``text``: after a blank line, a newline or a space."""
    window = text[:budget]
    for separator in ("\n\n", "\n", " "):
        at = window.rfind(separator)
        if at >= budget // 4:  # a cut that leaves a tiny piece is worse than a finer boundary
            return at + len(separator)
    return budget


def split_raw(text: str, limit: int = DISCORD_LIMIT) -> list[str]:
    """Cut ``text`` into pieces that fit ``limit`` once fences are added; they join to ``text``."""
    budget = limit - _RESERVE
    if budget < 16:
        raise ValueError(f"limit {limit} is too small to split into")
    pieces: list[str] = []
    rest = text
    while len(rest) > budget:
        at = _cut(rest, budget)
        pieces.append(rest[:at])
        rest = rest[at:]
    pieces.append(rest)
    return pieces


def balance(pieces: list[str], start: FenceState | None = None) -> list[str]:
    """Close and reopen code blocks across pieces; empty pieces are dropped."""
    state = start or FenceState()
    out: list[str] = []
    for piece in pieces:
        head = f"```{state.lang}\n" if state.inside else ""
        state = state.after(piece)
        tail = "\n```" if state.inside else ""
        if piece.strip():
            out.append(head + piece + tail)
    return out


def split_message(text: str, limit: int = DISCORD_LIMIT) -> list[str]:
    """Messages of at most ``limit`` characters that show ``text``, code blocks intact."""
    return balance(split_raw(text, limit))
