"""Short replies around the answers: a miss with its suggestions, and the list of topics.

Plain text within Discord's 2000 characters of a message; nothing here imports discord.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from faq._topics import Topic

if TYPE_CHECKING:  # the matcher builds its misses with render_miss
    from faq._matcher import Lookup

MESSAGE_LIMIT = 2000
"""Discord's limit on a message's text."""

_QUESTION_SHOWN = 200  # characters of the question repeated in a miss


def render_miss(question: str, found: Lookup, limit: int = MESSAGE_LIMIT) -> str:
    """Return the reply to a question without an answer: the two tied topics ("did you mean"),
    or the closest topics, or a pointer to the list of topics when none is close."""
    shown = " ".join(question.split())
    if len(shown) > _QUESTION_SHOWN:
        shown = shown[: _QUESTION_SHOWN - 1] + "\u2026"
    head = f"No FAQ entry matches {shown!r}."
    if not found.candidates:
        return _fit([f"{head} `/faq list` shows every topic."], limit)
    intro = "Did you mean one of these?" if found.tied else "The closest topics:"
    lines = [head, intro, *(f"- {match.topic.title}" for match in found.candidates)]
    return _fit([*lines, "Ask again with one of these titles (`/faq ask` completes them)."], limit)


def render_topic_list(topics: Sequence[Topic], limit: int = MESSAGE_LIMIT) -> str:
    """Return the list of topics, one title a line, within `limit` characters."""
    if not topics:
        return "The FAQ has no topics."
    lines = [f"**FAQ topics** ({len(topics)}), for `/faq ask`:", *(f"- {topic.title}" for topic in topics)]
    return _fit(lines, limit)


def _fit(lines: list[str], limit: int) -> str:
    """Join `lines`, dropping whole lines from the end (with a note of how many) to fit `limit`."""
    text = "\n".join(lines)
    kept = len(lines)
    while len(text) > limit and kept > 1:
        kept -= 1
        text = "\n".join([*lines[:kept], f"\u2026 and {len(lines) - kept} more"])
    return text[:limit]
