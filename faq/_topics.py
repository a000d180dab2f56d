"""FAQ topics: the markdown files they live in and how they are loaded.

A topic file is `<topic-id>.md`: TOML front matter between two `+++` lines, then a markdown body.
The front matter has `title`, `keywords`, and optionally `aliases`, `[[links]]` and `[source]`
(the page the answer was written from, shown under every answer).
Topics load from a list of folders (the bundled one first, then the operator's); a later folder
replaces a topic of the same id. A broken file is reported and skipped, so one bad file never
takes the whole FAQ down.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from faq._text import terms

TITLE_LIMIT = 256
"""Discord's limit on an embed title."""

BODY_LIMIT = 4096
"""Discord's limit on an embed description."""

FRONT_MATTER_FENCE = "+++"

_TOPIC_ID = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_KNOWN_KEYS = frozenset({"title", "keywords", "aliases", "links", "source"})
_TOML_POSITION = re.compile(r"\s*\(at (?:line (\d+), column \d+|end of document)\)$")


@dataclass(frozen=True)
class Link:
    """A link shown under an answer."""

    title: str
    url: str


@dataclass(frozen=True)
class Topic:
    """One FAQ entry: what it answers, the words that find it, and the answer itself."""

    id: str
    title: str
    keywords: tuple[str, ...] = field(repr=False)
    aliases: tuple[str, ...] = field(repr=False)
    links: tuple[Link, ...] = field(repr=False)
    body: str = field(repr=False)
    source: Path
    page: Link | None = field(default=None, repr=False)
    """The page the answer was written from (the front matter's `[source]`), if any."""


@dataclass
class LoadResult:
    """Topics by id, and one "<file>:<line>: <message>" line per file that was skipped."""

    topics: dict[str, Topic] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class TopicFileError(ValueError):
    """A topic file that cannot be used, with the line that shows why."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def bundled_topics_dir() -> Path:
    """Return the folder of topic files shipped with the package."""
    return Path(__file__).resolve().parent / "topics"


def load_topics(dirs: Sequence[Path]) -> LoadResult:
    """Load every `*.md` topic file of `dirs`, in order; a later folder overrides by topic id.

    Never raises for bad input: a missing folder, an unreadable or non-UTF-8 file, bad TOML, a
    missing title or keywords, a body too long for an embed, or a keyword that another topic
    already uses is reported in `problems` and the file is skipped (a topic it would have
    replaced stays as it was).
    """
    result = LoadResult()
    keyword_owner: dict[tuple[str, ...], str] = {}
    for folder in dirs:
        try:
            paths = sorted(path for path in folder.iterdir() if path.suffix == ".md")
        except OSError as error:
            result.problems.append(f"{folder}:1: cannot read folder: {error.strerror or error}")
            continue
        for path in paths:
            try:
                parsed = _parse_topic_file(path)
                _claim_keywords(parsed, keyword_owner, result.topics)
            except TopicFileError as error:
                result.problems.append(f"{path}:{error.line}: {error.message}")
                continue
            result.topics[parsed.topic.id] = parsed.topic
    return result


class _ParsedFile(NamedTuple):
    topic: Topic
    keywords_line: int


def _parse_topic_file(path: Path) -> _ParsedFile:
    """Read and check one topic file; raise TopicFileError (with a line number) when unusable."""
    if not _TOPIC_ID.fullmatch(path.stem):
        raise TopicFileError(1, "file name must be a topic id: lowercase letters, digits, hyphens")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TopicFileError(1, f"cannot read file: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise TopicFileError(line, "not valid UTF-8") from None
    return _parse_topic_text(path.stem, text, path)


def _parse_topic_text(topic_id: str, text: str, source: Path) -> _ParsedFile:
    """Build a Topic from the text of a topic file; raise TopicFileError when it is unusable."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != FRONT_MATTER_FENCE:
        raise TopicFileError(1, f"must start with a '{FRONT_MATTER_FENCE}' line (TOML front matter)")
    closing = next(
        (index for index, line in enumerate(lines[1:], 1) if line.strip() == FRONT_MATTER_FENCE),
        None,
    )
    if closing is None:
        raise TopicFileError(1, f"front matter is not closed by a '{FRONT_MATTER_FENCE}' line")
    front_lines = lines[1:closing]
    try:
        meta = tomllib.loads("\n".join(front_lines))
    except tomllib.TOMLDecodeError as error:
        last_line = max((n for n, line in enumerate(front_lines, 2) if line.strip()), default=1)
        raise _toml_problem(error, last_line) from None

    def line_of(key: str) -> int:
        """Line number of `key = ...` in the file, or of the opening fence when it is absent."""
        pattern = re.compile(rf"\s*\[*\s*{re.escape(key)}\s*[=\]]")
        for index, line in enumerate(front_lines, 2):
            if pattern.match(line):
                return index
        return 1

    unknown = sorted(set(meta) - _KNOWN_KEYS)
    if unknown:
        raise TopicFileError(line_of(unknown[0]), f"unknown front matter key {unknown[0]!r}")
    title = meta.get("title")
    if not isinstance(title, str) or not title.strip():
        raise TopicFileError(line_of("title"), "'title' is missing or not a non-empty string")
    if len(title) > TITLE_LIMIT:
        raise TopicFileError(line_of("title"), f"title is longer than {TITLE_LIMIT} characters")
    keywords = _string_list(meta, "keywords", line_of("keywords"), required=True)
    aliases = _string_list(meta, "aliases", line_of("aliases"), required=False)
    links = _links(meta.get("links", []), line_of("links"))
    page = _source(meta["source"], line_of("source")) if "source" in meta else None

    body_line = closing + 2
    body = "\n".join(lines[closing + 1 :]).strip()
    if not body:
        raise TopicFileError(body_line, "the answer (text after the front matter) is empty")
    if len(body) > BODY_LIMIT:
        raise TopicFileError(
            body_line, f"answer is {len(body)} characters, over the embed limit of {BODY_LIMIT}"
        )
    topic = Topic(
        id=topic_id,
        title=title.strip(),
        keywords=tuple(dict.fromkeys(keyword.strip().lower() for keyword in keywords)),
        aliases=tuple(alias.strip() for alias in aliases),
        links=links,
        body=body,
        source=source,
        page=page,
    )
    return _ParsedFile(topic, line_of("keywords"))


def _toml_problem(error: tomllib.TOMLDecodeError, last_line: int) -> TopicFileError:
    """Turn a TOML error into a file problem at the right line of the file.

    The front matter starts on the file's line 2; an error "at end of document" is reported at
    its last non-blank line.
    """
    message = str(error)
    position = _TOML_POSITION.search(message)
    if position is None:
        return TopicFileError(1, f"bad TOML front matter: {message}")
    line = int(position.group(1)) + 1 if position.group(1) else last_line
    return TopicFileError(line, f"bad TOML front matter: {message[: position.start()]}")


def _string_list(meta: dict[str, Any], key: str, line: int, *, required: bool) -> list[str]:
    """Return `meta[key]` as a list of non-empty strings, or raise TopicFileError."""
    value = meta.get(key, None if required else [])
    if (
        not isinstance(value, list)
        or (required and not value)
        or not all(isinstance(item, str) and item.strip() for item in value)
    ):
        kind = "a non-empty list" if required else "a list"
        raise TopicFileError(line, f"{key!r} must be {kind} of non-empty strings")
    return value


def _links(value: object, line: int) -> tuple[Link, ...]:
    """Return the `[[links]]` tables as Links, or raise TopicFileError."""
    if not isinstance(value, list):
        raise TopicFileError(line, "'links' must be a list of {title, url} tables")
    links = []
    for item in value:
        if not isinstance(item, dict) or set(item) != {"title", "url"}:
            raise TopicFileError(line, "each link must have exactly 'title' and 'url'")
        links.append(_link(item["title"], item["url"], line, "link"))
    return tuple(links)


def _source(value: object, line: int) -> Link:
    """Return the `[source]` table as a Link, or raise TopicFileError."""
    if not isinstance(value, dict) or set(value) != {"title", "url"}:
        raise TopicFileError(line, "'source' must be a table with exactly 'title' and 'url'")
    return _link(value["title"], value["url"], line, "source")


def _link(title: object, url: object, line: int, what: str) -> Link:
    """Return a checked Link, or raise TopicFileError naming `what` it is."""
    if not isinstance(title, str) or not title.strip():
        raise TopicFileError(line, f"a {what} title must be a non-empty string")
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise TopicFileError(line, f"{what} url must start with http:// or https://: {url!r}")
    return Link(title=title.strip(), url=url)


def keyword_key(keyword: str) -> tuple[str, ...]:
    """Return the form in which two keywords are compared: "Licences" and "license" are equal."""
    return tuple(terms(keyword))


def _claim_keywords(parsed: _ParsedFile, owner: dict[tuple[str, ...], str], topics: dict[str, Topic]) -> None:
    """Record that the topic owns its keywords; raise TopicFileError if another topic has one.

    A topic that replaces one of the same id takes over that topic's keywords.
    """
    topic = parsed.topic
    keys = [keyword_key(keyword) for keyword in topic.keywords]
    for keyword, key in zip(topic.keywords, keys, strict=True):
        if not key:
            raise TopicFileError(
                parsed.keywords_line, f"keyword {keyword!r} has only filler words, it never matches"
            )
        other = owner.get(key)
        if other is not None and other != topic.id:
            raise TopicFileError(
                parsed.keywords_line, f"keyword {keyword!r} is already used by topic {other!r}"
            )
    previous = topics.get(topic.id)
    if previous is not None:
        for keyword in previous.keywords:
            owner.pop(keyword_key(keyword), None)
    owner.update(dict.fromkeys(keys, topic.id))
