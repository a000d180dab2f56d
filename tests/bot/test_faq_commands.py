"""/faq ask, list and reload (bot/cogs/faq.py) through real discord.py Interaction objects: the
answer with its source page, the list of topics, suggestions when nothing answers, "did you mean"
when two topics tie, and a reload that names broken files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from faq import FaqIndex, Topic, bundled_topics_dir, load_topics
from tests.bot.harness import ALICE, MOD, Harness

EPHEMERAL = 1 << 6
FAQ_PAGE = "https://wiki.rwkv.com/basic/FAQ.html"


def _responses(h: Harness) -> list[dict[str, Any]]:
    """The data of every interaction response, in order."""
    return [
        body["data"]
        for _, path, body in h.adapter.calls
        if path.endswith("/callback") and isinstance(body.get("data"), dict)
    ]


async def test_answer_is_a_public_embed_linking_its_source(harness: Harness) -> None:
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


async def test_list_shows_every_topic(harness: Harness) -> None:
    """/faq list names every topic, to the asker only."""
    await harness.slash("faq", "list")
    data = _responses(harness)[-1]
    assert data["flags"] & EPHEMERAL
    lines = data["content"].splitlines()
    assert lines[0] == "**FAQ topics** (10), for `/faq ask`:"
    assert harness.bot.faq is not None
    assert lines[1:] == [f"- {topic.title}" for topic in harness.bot.faq.topics]


async def test_no_answer_suggests_the_closest_topics(harness: Harness) -> None:
    """A question that no topic answers well gets the closest topics, to the asker only."""
    await harness.slash("faq", "ask", question="tell me about tokens")
    data = _responses(harness)[-1]
    assert data["flags"] & EPHEMERAL
    lines = data["content"].splitlines()
    assert lines[0] == "No FAQ entry matches 'tell me about tokens'."
    assert lines[1] == "The closest topics:"
    assert "- Why do model names include a context length like 4k or 8k?" in lines


async def test_a_suggested_title_answers(harness: Harness) -> None:
    """Asking again with a suggested title (what autocomplete fills in) gives that answer."""
    await harness.slash("faq", "ask", question="Why do model names include a context length like 4k or 8k?")
    (embed,) = _responses(harness)[-1]["embeds"]
    assert embed["title"] == "Why do model names include a context length like 4k or 8k?"


async def test_off_topic_gets_a_pointer_to_the_list(harness: Harness) -> None:
    """Chat far from every topic gets no answer and no suggestions, only a pointer to /faq list."""
    await harness.slash("faq", "ask", question="how do I bake bread <@1>")
    data = _responses(harness)[-1]
    expected = "No FAQ entry matches 'how do I bake bread <@1>'. `/faq list` shows every topic."
    assert data["content"] == expected
    assert data["allowed_mentions"]["parse"] == []
    assert not data.get("embeds")


async def test_tie_asks_did_you_mean(harness: Harness) -> None:
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


async def test_faq_slash_command(harness: Harness) -> None:
    """/faq answers with an embed; an off-topic question gets a polite miss."""
    await harness.slash("faq", "ask", question="is it censored")
    responses = [b for _, _, b in harness.adapter.calls if isinstance(b.get("data"), dict)]
    assert any(r["data"].get("embeds") for r in responses)
    await harness.slash("faq", "ask", question="best pizza in town")
    assert any("No FAQ entry matches" in t for t in harness.adapter.texts())


async def test_faq_reload_reports_broken_files_and_is_for_moderators(
    harness: Harness, tmp_path: Path
) -> None:
    """/rwkv-mod faq-reload reads the operator's folder again; a broken file is named and skipped."""
    folder = tmp_path / "faq"
    folder.mkdir()
    (folder / "broken.md").write_text("+++\ntitle = \n+++\nbody\n")
    (folder / "house-rules.md").write_text(
        '+++\ntitle = "House rules"\nkeywords = ["house rules", "rules"]\n+++\nBe kind to the bot.\n'
    )
    harness.bot.settings = harness.bot.settings.model_copy(update={"faq_dir": folder})
    await harness.slash("rwkv-mod", "faq-reload", author=ALICE)
    assert "Only moderators" in harness.adapter.texts()[-1]
    await harness.slash("rwkv-mod", "faq-reload", author=MOD)
    report = harness.adapter.texts()[-1]
    assert "Skipped" in report and "broken.md" in report
    assert harness.bot.faq is not None and harness.bot.faq.best("what are the house rules") is not None
