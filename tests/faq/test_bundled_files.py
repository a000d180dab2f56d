"""Every bundled FAQ file is valid, and every question of the RWKV wiki FAQ has a topic."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from faq import BODY_LIMIT, TITLE_LIMIT, bundled_topics_dir, load_topics, render_answer, render_embed
from faq._topics import keyword_key

# One topic per "##" question of the RWKV wiki's FAQ page (the source the answers were written
# from). Hard-coded so that the tests do not need that page.
EXPECTED_TOPIC_IDS = {
    "next-release",  # When is the next RWKV model coming out?
    "training-data",  # What is the dataset that RWKV is trained on?
    "censorship",  # Is the RWKV model censored?
    "context-length",  # Why does the various model have context length (4k/8k) listed in their name?
    "license",  # What is RWKV licensed under?
    "raccoon",  # What is racoon?
    "chat-commands",  # What are the RWKV chat commands?
    "architecture",  # I would like to study more on the architecture ..., where should I go?
    "training-cost",  # How much would it cost to train RWKV >20B from scratch? ...
    "training-parallelization",  # Does RWKV support "Training Parallelization"? ... RetNet ...
}

BUNDLED_FILES = sorted(bundled_topics_dir().glob("*.md"))


def _front_matter(path: Path) -> dict[str, object]:
    """The TOML front matter of a topic file, parsed independently of the loader."""
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "+++", f"{path.name}: must start with +++"
    closing = lines.index("+++", 1)
    return tomllib.loads("\n".join(lines[1:closing]))


def test_every_wiki_question_has_a_topic() -> None:
    """The bundled topics are exactly the expected ones."""
    assert {path.stem for path in BUNDLED_FILES} == EXPECTED_TOPIC_IDS


def test_bundled_files_load_without_problems() -> None:
    """The loader accepts every bundled file."""
    result = load_topics([bundled_topics_dir()])
    assert result.problems == []
    assert set(result.topics) == EXPECTED_TOPIC_IDS


@pytest.mark.parametrize("path", BUNDLED_FILES, ids=lambda path: path.stem)
def test_front_matter_is_complete(path: Path) -> None:
    """Title and keywords are present, lowercase keywords, and no unknown keys."""
    meta = _front_matter(path)
    assert set(meta) <= {"title", "keywords", "aliases", "links", "source"}
    title = meta["title"]
    assert isinstance(title, str) and title.strip()
    # Autocomplete choices in Discord hold 100 characters, less than an embed title's 256.
    assert len(title) <= min(100, TITLE_LIMIT)
    keywords = meta["keywords"]
    assert isinstance(keywords, list) and keywords
    assert all(isinstance(k, str) and k == k.strip().lower() and k for k in keywords)
    assert len(set(keywords)) == len(keywords)


@pytest.mark.parametrize("path", BUNDLED_FILES, ids=lambda path: path.stem)
def test_links_are_web_urls(path: Path) -> None:
    """Every link has a title and an http(s) URL."""
    links = _front_matter(path).get("links", [])
    assert isinstance(links, list)
    for link in links:
        assert isinstance(link, dict) and link.get("title")
        assert str(link.get("url")).startswith(("https://", "http://"))


@pytest.mark.parametrize("path", BUNDLED_FILES, ids=lambda path: path.stem)
def test_every_topic_names_its_source_page(path: Path) -> None:
    """Every bundled answer was written from the RWKV wiki's FAQ page and links to it."""
    assert _front_matter(path).get("source") == {
        "title": "RWKV wiki: Frequently Asked Questions",
        "url": "https://wiki.rwkv.com/basic/FAQ.html",
    }
    topic = load_topics([bundled_topics_dir()]).topics[path.stem]
    assert topic.page is not None
    assert topic.page.url in render_answer(topic)
    embed = render_embed(topic)
    assert embed["url"] == topic.page.url
    assert any(topic.page.url in field["value"] for field in embed["fields"])


def test_architecture_answer_says_rwkv_is_an_rnn() -> None:
    """The architecture topic answers its own example question: RWKV is a recurrent network."""
    topic = load_topics([bundled_topics_dir()]).topics["architecture"]
    assert "RNN" in topic.title
    assert topic.body.startswith("Yes. RWKV is a recurrent neural network (RNN)")
    assert "in parallel" in topic.body


@pytest.mark.parametrize("path", BUNDLED_FILES, ids=lambda path: path.stem)
def test_body_fits_an_embed(path: Path) -> None:
    """The answer fits an embed description and stays short enough to read in chat."""
    topic = load_topics([bundled_topics_dir()]).topics[path.stem]
    assert len(topic.body) <= BODY_LIMIT
    assert len(topic.body) < 1500


def test_keywords_are_unique_across_topics() -> None:
    """No keyword (compared as the matcher sees it) belongs to two topics."""
    owners: dict[tuple[str, ...], str] = {}
    for path in BUNDLED_FILES:
        keywords = _front_matter(path)["keywords"]
        assert isinstance(keywords, list)
        for key in {keyword_key(keyword) for keyword in keywords}:
            assert key not in owners, f"{key} in {path.stem} and {owners.get(key)}"
            owners[key] = path.stem
