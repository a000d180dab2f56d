"""``<think>`` sections, the one definition: what a reply shows, and what it thought.

Models of the G1 family may think before they answer, inside ``<think>...</think>``. The stop
rules (:mod:`engine.output`), the chat's outcomes and the front ends' display all read these
sections through this module (no torch: it is plain text).
"""

from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def visible_text(text: str) -> str:
    """The reply text outside ``<think>...</think>`` sections (an open one hides the rest)."""
    out = []
    rest = text
    while True:
        start = rest.find(THINK_OPEN)
        if start < 0:
            out.append(rest)
            break
        out.append(rest[:start])
        end = rest.find(THINK_CLOSE, start)
        if end < 0:
            break
        rest = rest[end + len(THINK_CLOSE) :]
    return "".join(out)


# Group 1: the thoughts; group 2: "</think>", or "" while the section is still open.
THINK_SECTION = re.compile(r"<think>(.*?)(</think>|$)", re.DOTALL)


def split_thinking(text: str) -> str | None:
    """The content of the ``<think>`` sections of a reply, or None when it has none."""
    parts = [match.group(1).strip() for match in THINK_SECTION.finditer(text)]
    return "\n".join(parts) if parts else None
