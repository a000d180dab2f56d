"""Loading topics from the bundled folder and an operator's folder."""

from __future__ import annotations

from pathlib import Path

from faq import FaqIndex, bundled_topics_dir, load_topics

GOOD_TOPIC = """+++
title = "Server rules"
keywords = ["rules", "ban"]
aliases = ["what are the rules here"]

[[links]]
title = "Rules channel"
url = "https://discord.com/channels/1/2"
+++
Be kind.
"""


def _write(folder: Path, name: str, text: str) -> Path:
    """Write a topic file into `folder` and return its path."""
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_operator_folder_adds_a_topic(tmp_path: Path) -> None:
    """A topic in the operator folder joins the bundled ones."""
    _write(tmp_path, "rules.md", GOOD_TOPIC)
    result = load_topics([bundled_topics_dir(), tmp_path])
    assert result.problems == []
    rules = result.topics["rules"]
    assert rules.title == "Server rules"
    assert rules.keywords == ("rules", "ban")
    assert rules.aliases == ("what are the rules here",)
    assert rules.links[0].url == "https://discord.com/channels/1/2"
    assert rules.body == "Be kind."
    assert rules.source == tmp_path / "rules.md"
    assert "license" in result.topics


def test_operator_topic_overrides_bundled_topic_by_id(tmp_path: Path) -> None:
    """A later folder's topic replaces the bundled one of the same id, keywords included."""
    _write(
        tmp_path,
        "license.md",
        '+++\ntitle = "Our license"\nkeywords = ["license", "apache 2.0", "legal"]\n+++\nAsk a mod.\n',
    )
    result = load_topics([bundled_topics_dir(), tmp_path])
    assert result.problems == []
    assert result.topics["license"].body == "Ask a mod."
    best = FaqIndex(result.topics.values()).best("legal")
    assert best is not None and best.topic.title == "Our license"


def test_broken_toml_is_reported_with_name_and_line_and_skipped(tmp_path: Path) -> None:
    """Bad TOML names the file and the line of the error; the other topics still load."""
    _write(tmp_path, "rules.md", GOOD_TOPIC)
    bad = _write(tmp_path, "broken.md", '+++\ntitle = "Broken"\nkeywords = ["cats"]\noops\n+++\nB\n')
    result = load_topics([tmp_path])
    assert list(result.topics) == ["rules"]
    assert result.problems == [
        f"{bad}:4: bad TOML front matter: Expected '=' after a key in a key/value pair"
    ]


def test_toml_error_inside_front_matter_points_at_its_line(tmp_path: Path) -> None:
    """A TOML error in the middle of the front matter is reported at that line of the file."""
    bad = _write(tmp_path, "bad.md", '+++\ntitle = "T"\nkeywords = ["a",, "b"]\naliases = ["x"]\n+++\nB\n')
    (problem,) = load_topics([tmp_path]).problems
    assert problem.startswith(f"{bad}:3: bad TOML front matter: ")


def test_non_utf8_file_is_reported_and_skipped(tmp_path: Path) -> None:
    """A file that is not UTF-8 is skipped, with the line of the first bad byte."""
    path = tmp_path / "latin.md"
    path.write_bytes(b'+++\ntitle = "Caf\xe9"\nkeywords = ["cafe"]\n+++\nBody\n')
    result = load_topics([tmp_path])
    assert result.topics == {}
    assert result.problems == [f"{path}:2: not valid UTF-8"]


def test_broken_override_keeps_the_bundled_topic(tmp_path: Path) -> None:
    """An operator file that fails to load does not remove the topic it meant to replace."""
    _write(tmp_path, "license.md", "no front matter here\n")
    result = load_topics([bundled_topics_dir(), tmp_path])
    assert result.problems == [
        f"{tmp_path / 'license.md'}:1: must start with a '+++' line (TOML front matter)"
    ]
    assert result.topics["license"].source.parent == bundled_topics_dir()


def test_missing_title_is_reported(tmp_path: Path) -> None:
    """A file without a title is skipped."""
    path = _write(tmp_path, "notitle.md", '+++\nkeywords = ["x"]\n+++\nBody\n')
    result = load_topics([tmp_path])
    assert result.topics == {}
    assert result.problems == [f"{path}:1: 'title' is missing or not a non-empty string"]


def test_missing_keywords_is_reported(tmp_path: Path) -> None:
    """A file without keywords is skipped."""
    path = _write(tmp_path, "nokeys.md", '+++\ntitle = "T"\nkeywords = []\n+++\nBody\n')
    result = load_topics([tmp_path])
    assert result.topics == {}
    assert result.problems == [f"{path}:3: 'keywords' must be a non-empty list of non-empty strings"]


def test_body_too_long_is_reported_at_its_first_line(tmp_path: Path) -> None:
    """An answer longer than an embed description is skipped."""
    path = _write(tmp_path, "long.md", '+++\ntitle = "T"\nkeywords = ["x"]\n+++\n' + "a" * 4097)
    result = load_topics([tmp_path])
    assert result.topics == {}
    assert result.problems == [f"{path}:5: answer is 4097 characters, over the embed limit of 4096"]


def test_keyword_clash_is_reported_and_skipped(tmp_path: Path) -> None:
    """A keyword another topic owns (even spelt differently) skips the later file."""
    path = _write(tmp_path, "mine.md", '+++\ntitle = "Mine"\nkeywords = ["cats", "Licences"]\n+++\nB\n')
    result = load_topics([bundled_topics_dir(), tmp_path])
    assert "mine" not in result.topics
    assert result.problems == [f"{path}:3: keyword 'licences' is already used by topic 'license'"]


def test_unknown_key_and_bad_link_are_reported(tmp_path: Path) -> None:
    """A misspelt front matter key and a non-web link are reported, not ignored."""
    typo = _write(tmp_path, "typo.md", '+++\ntitle = "T"\nkeyword = ["x"]\n+++\nB\n')
    link = _write(
        tmp_path,
        "link.md",
        '+++\ntitle = "T"\nkeywords = ["y"]\n[[links]]\ntitle = "L"\nurl = "ftp://x"\n+++\nB\n',
    )
    result = load_topics([tmp_path])
    assert result.topics == {}
    assert result.problems == [
        f"{link}:4: link url must start with http:// or https://: 'ftp://x'",
        f"{typo}:3: unknown front matter key 'keyword'",
    ]


def test_bad_file_name_and_missing_folder_are_reported(tmp_path: Path) -> None:
    """A file name that is not a topic id, and a folder that does not exist, are reported."""
    _write(tmp_path, "Read Me.md", GOOD_TOPIC)
    missing = tmp_path / "nowhere"
    result = load_topics([tmp_path, missing])
    assert result.topics == {}
    assert len(result.problems) == 2
    assert result.problems[0].startswith(f"{tmp_path / 'Read Me.md'}:1: file name")
    assert result.problems[1].startswith(f"{missing}:1: cannot read folder")


def test_optional_fields_may_be_empty_or_absent(tmp_path: Path) -> None:
    """Aliases and links are optional; an empty list is accepted."""
    _write(tmp_path, "plain.md", '+++\ntitle = "Plain"\nkeywords = ["plain"]\naliases = []\n+++\nB\n')
    result = load_topics([tmp_path])
    assert result.problems == []
    assert (result.topics["plain"].aliases, result.topics["plain"].links) == ((), ())


def test_other_files_are_ignored(tmp_path: Path) -> None:
    """Only `*.md` files are topics."""
    _write(tmp_path, "notes.txt", "not a topic")
    assert load_topics([tmp_path]).problems == []


def test_source_page_is_read(tmp_path: Path) -> None:
    """`[source]` names the page the answer was written from."""
    _write(
        tmp_path,
        "sourced.md",
        '+++\ntitle = "S"\nkeywords = ["sourced"]\n[source]\ntitle = "Wiki"\nurl = "https://w.example/faq"\n+++\nB\n',
    )
    result = load_topics([tmp_path])
    assert result.problems == []
    page = result.topics["sourced"].page
    assert page is not None and (page.title, page.url) == ("Wiki", "https://w.example/faq")


def test_bad_source_is_reported(tmp_path: Path) -> None:
    """A `source` that is not a {title, url} table with a web URL skips the file."""
    plain = _write(
        tmp_path, "plain.md", '+++\ntitle = "T"\nkeywords = ["x"]\nsource = "https://w.example"\n+++\nB\n'
    )
    ftp = _write(
        tmp_path,
        "ftp.md",
        '+++\ntitle = "T"\nkeywords = ["y"]\n[source]\ntitle = "W"\nurl = "ftp://w"\n+++\nB\n',
    )
    result = load_topics([tmp_path])
    assert result.topics == {}
    assert result.problems == [
        f"{ftp}:4: source url must start with http:// or https://: 'ftp://w'",
        f"{plain}:4: 'source' must be a table with exactly 'title' and 'url'",
    ]
