"""Rendering a topic as text and as embed parts, within Discord's limits."""

from __future__ import annotations

from pathlib import Path

from faq import BODY_LIMIT, Link, Topic, bundled_topics_dir, load_topics, render_answer, render_embed


def _topic(body: str, links: tuple[Link, ...] = (), title: str = "A title") -> Topic:
    """A topic built in memory."""
    return Topic("t", title, ("k",), (), links, body, Path("t.md"))


def test_answer_has_title_body_and_links_not_in_body() -> None:
    """The text shows the bold title, the body, and only the links the body does not show."""
    inline = Link("Inline", "https://a.example/")
    extra = Link("Extra", "https://b.example/")
    text = render_answer(_topic("See https://a.example/ here.", (inline, extra)))
    assert text == "**A title**\n\nSee https://a.example/ here.\n\n- [Extra](https://b.example/)"


def test_long_answer_is_shortened_to_the_limit() -> None:
    """A body that would overflow is cut at a word, with an ellipsis, and links survive."""
    link = Link("L", "https://x.example/")
    text = render_answer(_topic("word " * 900, (link,)), limit=2000)
    assert len(text) <= 2000
    assert "word\u2026\n\n- [L](https://x.example/)" in text


def test_bundled_answers_fit_an_embed_and_a_message() -> None:
    """Every bundled answer fits 4096 characters, and fits 2000 when asked."""
    for topic in load_topics([bundled_topics_dir()]).topics.values():
        assert len(render_answer(topic)) <= BODY_LIMIT
        assert len(render_answer(topic, limit=2000)) <= 2000


def test_embed_parts() -> None:
    """The embed has the title, the body, the first link as URL and a Links field."""
    links = (Link("One", "https://1.example/"), Link("Two", "https://2.example/"))
    embed = render_embed(_topic("Body.", links))
    assert embed == {
        "title": "A title",
        "description": "Body.",
        "url": "https://1.example/",
        "fields": [
            {
                "name": "Links",
                "value": "[One](https://1.example/)\n[Two](https://2.example/)",
                "inline": False,
            }
        ],
    }


def test_embed_without_links_has_no_url_and_no_fields() -> None:
    """A topic without links gives url None and no fields."""
    embed = render_embed(_topic("Body."))
    assert embed["url"] is None
    assert embed["fields"] == []


def test_embed_parts_stay_within_discord_limits() -> None:
    """Title, description and field value are cut to 256, 4096 and 1024 characters."""
    links = tuple(Link(f"Link {i}", f"https://example.com/{i:040d}") for i in range(40))
    embed = render_embed(_topic("b" * 5000, links, title="t" * 300))
    assert len(embed["title"]) <= 256
    assert len(embed["description"]) <= 4096
    assert 0 < len(embed["fields"][0]["value"]) <= 1024


def test_faq_package_does_not_import_discord() -> None:
    """faq/ holds data and pure functions; only bot/ speaks Discord."""
    package = Path(render_answer.__code__.co_filename).parent
    for source in package.glob("*.py"):
        text = source.read_text(encoding="utf-8")
        assert "import discord" not in text and "from discord" not in text, source.name


def test_source_page_ends_the_answer_and_titles_the_embed() -> None:
    """The source page is the last line of the text, the embed's title link and a field of its own."""
    page = Link("Wiki FAQ", "https://w.example/faq")
    extra = Link("Extra", "https://b.example/")
    topic = Topic("t", "A title", ("k",), (), (extra,), "Body.", Path("t.md"), page)
    text = render_answer(topic)
    assert text.endswith("- [Extra](https://b.example/)\nSource: [Wiki FAQ](https://w.example/faq)")
    embed = render_embed(topic)
    assert embed["url"] == "https://w.example/faq"
    assert embed["fields"][-1] == {
        "name": "Source",
        "value": "[Wiki FAQ](https://w.example/faq)",
        "inline": False,
    }
