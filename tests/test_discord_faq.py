"""/faq through real discord.py Interaction objects: the answer with its source page, the list of
topics, suggestions when nothing answers, and "did you mean" when two topics tie.

Uses the offline harness of test_discord_bot.py (recorded HTTP and webhook layers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from faq import FaqIndex, Topic, bundled_topics_dir, load_topics
from tests.test_discord_bot import Harness, harness  # noqa: F401 (harness is a fixture)

EPHEMERAL = 1 << 6
FAQ_PAGE = "https://wiki.rwkv.com/basic/FAQ.html"


def _responses(h: Harness) -> list[dict[str, Any]]:
    """The data of every interaction response, in order."""
    return [
        body["data"]
        for _, path, body in h.adapter.calls
        if path.endswith("/callback") and isinstance(body.get("data"), dict)
    ]


async def test_answer_is_a_public_embed_linking_its_source(harness: Harness) -> None:  # noqa: F811
    """An answer is an embed whose title links to the wiki FAQ page, with a Source field."""
    await harness.slash("faq", "ask", question="is rwkv an rnn or a transformer?")
    data = _responses(harness)[-1]
    assert not data.get("flags", 0) & EPHEMERAL
    (embed,) = data["embeds"]
    assert embed["title"] == "Is RWKV an RNN, and where can I learn about its architecture?"
    assert embed["description"].startswith("Yes. RWKV is a recurrent neural network (RNN)")
    assert embed["url"] == FAQ_PAGE
    fields = {field["name"]: field["value"] for field in embed["fields"]}
    assert FAQ_PAGE in fields["Source"]
    assert "https://wiki.rwkv.com/advance/architecture.html" in fields["Links"]


async def test_list_shows_every_topic(harness: Harness) -> None:  # noqa: F811
    """/faq list names every topic, to the asker only."""
    await harness.slash("faq", "list")
    data = _responses(harness)[-1]
    assert data["flags"] & EPHEMERAL
    lines = data["content"].splitlines()
    assert lines[0] == "**FAQ topics** (10), for `/faq ask`:"
    assert harness.bot.faq is not None
    assert lines[1:] == [f"- {topic.title}" for topic in harness.bot.faq.topics]


async def test_no_answer_suggests_the_closest_topics(harness: Harness) -> None:  # noqa: F811
    """A question that no topic answers well gets the closest topics, to the asker only."""
    await harness.slash("faq", "ask", question="how many tokens can rwkv remember")
    data = _responses(harness)[-1]
    assert data["flags"] & EPHEMERAL
    lines = data["content"].splitlines()
    assert lines[0] == "No FAQ entry matches 'how many tokens can rwkv remember'."
    assert lines[1] == "The closest topics:"
    assert "- Why do model names include a context length like 4k or 8k?" in lines


async def test_a_suggested_title_answers(harness: Harness) -> None:  # noqa: F811
    """Asking again with a suggested title (what autocomplete fills in) gives that answer."""
    await harness.slash("faq", "ask", question="Why do model names include a context length like 4k or 8k?")
    (embed,) = _responses(harness)[-1]["embeds"]
    assert embed["title"] == "Why do model names include a context length like 4k or 8k?"


async def test_off_topic_gets_a_pointer_to_the_list(harness: Harness) -> None:  # noqa: F811
    """Chat far from every topic gets no answer and no suggestions, only a pointer to /faq list."""
    await harness.slash("faq", "ask", question="how do I bake bread <@1>")
    data = _responses(harness)[-1]
    expected = "No FAQ entry matches 'how do I bake bread <@1>'. `/faq list` shows every topic."
    assert data["content"] == expected
    assert data["allowed_mentions"]["parse"] == []
    assert not data.get("embeds")


async def test_tie_asks_did_you_mean(harness: Harness) -> None:  # noqa: F811
    """Two topics that fit a question equally well are both offered instead of one picked."""
    bundled = load_topics([bundled_topics_dir()]).topics.values()
    harness.bot.faq = FaqIndex(
        [
            *bundled,
            Topic("cats", "Cats and dogs", ("cats",), (), (), "A.", Path("cats.md")),
            Topic("dogs", "Dogs and cats", ("dogs",), (), (), "B.", Path("dogs.md")),
        ]
    )
    await harness.slash("faq", "ask", question="cats dogs?")
    lines = _responses(harness)[-1]["content"].splitlines()
    assert lines[1] == "Did you mean one of these?"
    assert set(lines[2:4]) == {"- Cats and dogs", "- Dogs and cats"}
