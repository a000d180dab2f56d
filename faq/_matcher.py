"""Find the FAQ topic a free-form question is about, with a confidence between 0 and 1.

The score of a topic is the share of the question it explains. Every term of the question has a
weight, its inverse document frequency over the topics (a word found in one topic tells more than
one found in all of them); a term the topic has as a keyword counts fully, one from its title or
aliases counts less, one only in its answer text counts little, and a term no topic knows counts
against every topic. A question made of words the FAQ does not know therefore scores low for all
topics and gets no answer rather than a guess. Typos are caught by fuzzy-matching unknown words
against the words the topics use (rapidfuzz).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from rapidfuzz import fuzz, process

from faq._render import render_answer
from faq._text import SYNONYMS, canonical, raw_tokens, terms
from faq._topics import Topic

DEFAULT_THRESHOLD = 0.55
"""Confidence below which `FaqIndex.best` answers "no entry" instead of guessing."""

# How much a term counts for a topic, by where the topic has it.
_KEYWORD_WEIGHT = 1.0
_TITLE_WEIGHT = 0.75  # title, aliases, and part of a multi-word keyword
_BODY_WEIGHT = 0.3  # answer text and link titles
# Unknown words that contain a digit ("v7", "20b") are usually versions or sizes, not topics.
_UNKNOWN_NUMBER_FACTOR = 0.3
# Unknown words count this much less in a question that names RWKV.
_DOMAIN_UNKNOWN_FACTOR = 0.5
# Fuzzy matching of unknown words: only words this long, with this rapidfuzz ratio (0-100).
_FUZZY_MIN_LENGTH = 5
_FUZZY_CUTOFF = 80.0
# A question is short; reading only this many words bounds the time of a 2000-character message.
_MAX_QUERY_TOKENS = 64

_QUESTION_WORDS = frozenset(
    """
    who what whats wat when wen where why how which whose whom is are was were am can could would
    will should shall does do did has have had any anyone anybody isnt arent doesnt dont cant
    wont didnt
    """.split()  # noqa: SIM905 (a word list reads better as text than as quoted strings)
)
_LEADING_NOISE = re.compile(r"^(?:\s|<[@#][!&]?\d+>|[^\w<])+")


@dataclass(frozen=True)
class Match:
    """A topic with how sure the matcher is that it answers the question (0 to 1)."""

    topic: Topic
    confidence: float


@dataclass(frozen=True)
class _TopicTerms:
    """What the matcher knows of one topic, precomputed."""

    topic: Topic
    weights: dict[str, float]
    phrases: tuple[frozenset[str], ...]


class FaqIndex:
    """Ranks topics for a question; build once, query many times (deterministic, pure)."""

    def __init__(self, topics: Iterable[Topic], threshold: float = DEFAULT_THRESHOLD) -> None:
        """Index `topics`; `best` answers None below `threshold` (0 to 1)."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be between 0 and 1, not {threshold}")
        self.threshold = threshold
        self._entries = tuple(_index_topic(topic) for topic in sorted(topics, key=lambda t: t.id))
        self._by_title = sorted(
            (entry.topic for entry in self._entries), key=lambda t: (t.title.casefold(), t.id)
        )
        document_frequency = Counter(term for entry in self._entries for term in entry.weights)
        count = len(self._entries)
        self._idf = {term: _idf(frequency, count) for term, frequency in document_frequency.items()}
        # A word no topic knows weighs as much as one that only a single topic knows.
        self._unknown_idf = _idf(1, count)
        self._lexicon = _lexicon(self._entries, self._idf)
        self._lexicon_by_initial: dict[str, list[str]] = defaultdict(list)
        for word in self._lexicon:
            self._lexicon_by_initial[word[0]].append(word)

    @property
    def topics(self) -> list[Topic]:
        """The indexed topics, in title order."""
        return list(self._by_title)

    def match(self, query: str, limit: int = 3) -> list[Match]:
        """Return up to `limit` topics with a confidence above 0, best first (ties by id).

        Unlike `best`, this includes topics below the threshold, for "did you mean" lists.
        """
        known, unknown_weight = self._analyse(query)
        if not known:
            return []
        total = sum(self._idf[term] for term in known) + unknown_weight
        matches = []
        for entry in self._entries:
            confidence = _coverage(entry, known, self._idf) / total
            if confidence > 0.0:
                matches.append(Match(entry.topic, round(min(confidence, 1.0), 4)))
        matches.sort(key=lambda m: (-m.confidence, m.topic.id))
        return matches[: max(limit, 0)]

    def best(self, query: str) -> Match | None:
        """Return the best match if its confidence reaches the threshold, otherwise None."""
        matches = self.match(query, limit=1)
        if matches and matches[0].confidence >= self.threshold:
            return matches[0]
        return None

    def answer(self, query: str) -> str | None:
        """Return the rendered answer of the best topic, or None below the threshold.

        This makes the index usable wherever only text is needed (the chat's `+faq` command).
        """
        found = self.best(query)
        return render_answer(found.topic) if found is not None else None

    def autocomplete(self, prefix: str, limit: int = 25) -> list[Topic]:
        """Return topics for a slash-command autocomplete, at most `limit` (Discord allows 25).

        An empty prefix lists every topic in title order. Otherwise titles that start with the
        prefix come first, then topics with a word of their title, keywords or aliases starting
        with it, then any containing it, then those the matcher finds for it (typos); each
        group in title order.
        """
        needle = " ".join(prefix.casefold().split())
        if not needle:
            return self._by_title[: max(limit, 0)]
        ranked: dict[str, tuple[int, Topic]] = {}
        for topic in self._by_title:
            title = topic.title.casefold()
            texts = [title, *topic.keywords, *(alias.casefold() for alias in topic.aliases)]
            if title.startswith(needle):
                tier = 0
            elif any(f" {needle}" in f" {text}" for text in texts):
                tier = 1
            elif any(needle in text for text in texts):
                tier = 2
            else:
                continue
            ranked[topic.id] = (tier, topic)
        for found in self.match(prefix, limit=len(self._entries)):
            if found.confidence >= self.threshold:
                ranked.setdefault(found.topic.id, (3, found.topic))
        order = {topic.id: position for position, topic in enumerate(self._by_title)}
        ordered = sorted(ranked.values(), key=lambda item: (item[0], order[item[1].id]))
        return [topic for _, topic in ordered[: max(limit, 0)]]

    def _analyse(self, query: str) -> tuple[dict[str, float], float]:
        """Split a query into its known terms (with match quality) and the weight of the rest."""
        known: dict[str, float] = {}
        unknown_weight = 0.0
        tokens = raw_tokens(query)[:_MAX_QUERY_TOKENS]
        # Naming RWKV says the question is about this domain, so words the FAQ does not know
        # are more likely detail ("at home", "on my laptop") than a different subject.
        unknown_factor = _DOMAIN_UNKNOWN_FACTOR if any("rwkv" in token for token in tokens) else 1.0
        for token in tokens:
            term = canonical(token)
            if term is None:
                continue
            quality = 1.0
            if term not in self._idf:
                fuzzy = self._fuzzy(token, term)
                if fuzzy is None:
                    has_digit = any(char.isdigit() for char in term)
                    factor = _UNKNOWN_NUMBER_FACTOR if has_digit else 1.0
                    unknown_weight += self._unknown_idf * factor * unknown_factor
                    continue
                term, quality = fuzzy
            known[term] = max(known.get(term, 0.0), quality)
        return known, unknown_weight

    def _fuzzy(self, token: str, term: str) -> tuple[str, float] | None:
        """Return the known term a misspelt word most likely means, with a 0-1 quality."""
        if len(token) < _FUZZY_MIN_LENGTH:
            return None
        best: tuple[str, float] | None = None
        for word in (token, term):
            candidates = self._lexicon_by_initial.get(word[0], [])
            found = process.extractOne(word, candidates, scorer=fuzz.ratio, score_cutoff=_FUZZY_CUTOFF)
            if found is not None and (best is None or found[1] / 100.0 > best[1]):
                best = (self._lexicon[found[0]], found[1] / 100.0)
        return best


def is_question(text: str) -> bool:
    """Tell whether a chat message looks like a question (for the optional auto-answer).

    True when it ends with "?" or starts with a question word ("how", "is", "can", ...) and has
    at least three words; leading mentions and punctuation are ignored.
    """
    stripped = text.strip()
    if not stripped:
        return False
    if stripped.rstrip(" !.)\"'*_~`").endswith("?"):
        return True
    words = raw_tokens(_LEADING_NOISE.sub("", stripped))
    return len(words) >= 3 and words[0] in _QUESTION_WORDS


def _idf(frequency: int, count: int) -> float:
    """Inverse document frequency, smoothed so that it stays positive for tiny topic sets."""
    return math.log((count + 1) / (frequency + 0.5)) + 1.0


def _index_topic(topic: Topic) -> _TopicTerms:
    """Precompute the weighted terms of a topic."""
    weights: dict[str, float] = {}

    def add(words: Iterable[str], weight: float) -> None:
        for word in words:
            weights[word] = max(weights.get(word, 0.0), weight)

    add(terms(topic.body), _BODY_WEIGHT)
    for link in topic.links:
        add(terms(link.title), _BODY_WEIGHT)
    add(terms(topic.title), _TITLE_WEIGHT)
    for alias in topic.aliases:
        add(terms(alias), _TITLE_WEIGHT)
    phrases = []
    for keyword in topic.keywords:
        keyword_terms = terms(keyword)
        if len(keyword_terms) == 1:
            add(keyword_terms, _KEYWORD_WEIGHT)
        elif keyword_terms:
            add(keyword_terms, _TITLE_WEIGHT)
            phrases.append(frozenset(keyword_terms))
    return _TopicTerms(topic, weights, tuple(phrases))


def _coverage(entry: _TopicTerms, known: dict[str, float], idf: dict[str, float]) -> float:
    """Sum of idf * match quality * topic weight over the query's known terms."""
    weights = entry.weights
    complete = [phrase for phrase in entry.phrases if phrase <= known.keys()]
    if complete:
        weights = dict(weights)
        for phrase in complete:
            weights.update(dict.fromkeys(phrase, _KEYWORD_WEIGHT))
    return sum(idf[term] * quality * weights.get(term, 0.0) for term, quality in known.items())


def _lexicon(entries: Iterable[_TopicTerms], idf: dict[str, float]) -> dict[str, str]:
    """Map every word the topics use, and every known synonym, to its term (for typos)."""
    words: list[str] = list(SYNONYMS)
    for entry in entries:
        topic = entry.topic
        texts = [topic.title, topic.body, *topic.keywords, *topic.aliases]
        texts += [link.title for link in topic.links]
        for text in texts:
            words += raw_tokens(text)
    lexicon: dict[str, str] = {}
    for word in words:
        term = canonical(word)
        if term is not None and term in idf:
            lexicon.setdefault(word, term)
    return lexicon
