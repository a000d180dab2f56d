"""Turn a topic into a reply: plain text for a message, or the fields of an embed.

Nothing here imports discord; the bot builds its `discord.Embed` from `render_embed`'s dict.
"""

from __future__ import annotations

from typing import TypedDict

from faq._topics import BODY_LIMIT, TITLE_LIMIT, Link, Topic

FIELD_VALUE_LIMIT = 1024
"""Discord's limit on an embed field value."""

_ELLIPSIS = "\u2026"


class EmbedField(TypedDict):
    """One embed field, shaped like Discord's."""

    name: str
    value: str
    inline: bool


class EmbedData(TypedDict):
    """The parts of an embed, shaped like Discord's embed object."""

    title: str
    description: str
    url: str | None
    fields: list[EmbedField]


def render_answer(topic: Topic, limit: int = BODY_LIMIT) -> str:
    """Return the answer as one markdown text: bold title, body, links not in the body, source.

    The text never exceeds `limit` characters (4096, an embed description, by default; pass 2000
    for a plain message); when it would, the body is shortened at a word and ends with an ellipsis.
    """
    head = f"**{topic.title}**\n\n"
    lines = [f"- [{link.title}]({link.url})" for link in _extra_links(topic)]
    if topic.page is not None:
        lines.append(f"Source: [{topic.page.title}]({topic.page.url})")
    tail = "\n\n" + "\n".join(lines) if lines else ""
    room = limit - len(head) - len(tail)
    if room < 1:
        return _shorten(head + topic.body, limit)
    return head + _shorten(topic.body, room) + tail


def render_embed(topic: Topic) -> EmbedData:
    """Return the embed parts of an answer, each within Discord's limits.

    The title links to the topic's source page, or else to its first link (if any); links not
    already in the body are listed in a "Links" field, and the source page in a "Source" field.
    """
    lines: list[str] = []
    for link in _extra_links(topic):
        line = f"[{link.title}]({link.url})"
        if len("\n".join([*lines, line])) > FIELD_VALUE_LIMIT:
            break
        lines.append(line)
    fields = [EmbedField(name="Links", value="\n".join(lines), inline=False)] if lines else []
    page = topic.page
    if page is not None:
        source = _shorten(f"[{page.title}]({page.url})", FIELD_VALUE_LIMIT)
        fields.append(EmbedField(name="Source", value=source, inline=False))
    first = page or (topic.links[0] if topic.links else None)
    return EmbedData(
        title=_shorten(topic.title, TITLE_LIMIT),
        description=_shorten(topic.body, BODY_LIMIT),
        url=first.url if first is not None else None,
        fields=fields,
    )


def _extra_links(topic: Topic) -> list[Link]:
    """The topic's links whose URL the body does not already show."""
    return [link for link in topic.links if link.url not in topic.body]


def _shorten(text: str, limit: int) -> str:
    """Return `text` cut to at most `limit` characters, at a word where possible, with an ellipsis."""
    if len(text) <= limit:
        return text
    cut = text[: max(limit - 1, 0)]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip() + _ELLIPSIS if limit > 0 else ""
