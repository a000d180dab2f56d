"""The FAQ knowledge base: bundled markdown answers about RWKV, found by keyword or question.

Typical use::

    result = load_topics([bundled_topics_dir(), operator_dir])
    for problem in result.problems:
        log.warning("FAQ: %s", problem)
    index = FaqIndex(result.topics.values())
    found = index.lookup("can I use it commercially?")
    if found.answer is not None:
        embed = render_embed(found.answer.topic)
    else:
        reply = render_miss("can I use it commercially?", found)  # "did you mean" or suggestions
"""

from faq._matcher import DEFAULT_THRESHOLD, FaqIndex, Lookup, Match, is_question
from faq._render import EmbedData, EmbedField, render_answer, render_embed
from faq._replies import render_miss, render_topic_list
from faq._topics import (
    BODY_LIMIT,
    TITLE_LIMIT,
    Link,
    LoadResult,
    Topic,
    bundled_topics_dir,
    load_topics,
)

__all__ = [
    "BODY_LIMIT",
    "DEFAULT_THRESHOLD",
    "TITLE_LIMIT",
    "EmbedData",
    "EmbedField",
    "FaqIndex",
    "Link",
    "LoadResult",
    "Lookup",
    "Match",
    "Topic",
    "bundled_topics_dir",
    "is_question",
    "load_topics",
    "render_answer",
    "render_embed",
    "render_miss",
    "render_topic_list",
]
