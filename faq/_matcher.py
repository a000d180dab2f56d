"""Find the FAQ topic a free-form question is about, with a confidence between 0 and 1.

The score of a topic is the share of the question it explains. Every term of the question has a
weight, its inverse document frequency over the topics (a word found in one topic tells more than
one found in all of them); a term the topic has as a keyword counts fully, one from its title or
aliases counts less, one only in its answer text counts little, and a term no topic knows counts
against every topic. A question made of words the FAQ does not know therefore scores low for all
topics and gets no answer rather than a guess. A word the topics have only in answer text counts
half in that share, a model name ("raven") beside other words too, an unknown word of one or two
letters ("rp") half against. Typos are caught by fuzzy-matching unknown words against the words
the topics use (rapidfuzz).

On top of the score, `FaqIndex.lookup` decides what to say:

- an answer needs real evidence: a keyword, or a title word that only one topic has; a single
  word that several topics share ("bot", "gpu") is not enough; a question that names neither
  RWKV, its models nor the bot needs a keyword, or three words of the topic's title and aliases;
- a question that names another product ("is claude censored", "when does the new iphone come
  out") is answered only when it also names RWKV, one of its models or the bot;
- two topics that score alike are told apart by their keyword evidence (a keyword is stronger than
  a title word); when that is equal too, the question is a tie and both are offered ("did you
  mean"), so the order of topic ids never picks an answer;
- without an answer, the closest topics are offered as suggestions.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from rapidfuzz import fuzz, process

from faq._lexicon import DOMAIN_WORDS, MODEL_NAMES, OTHER_PRODUCTS, OWN_NAMES
from faq._render import render_answer
from faq._replies import render_miss
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
# Unknown words count this much less in a question that names RWKV or the bot.
_DOMAIN_UNKNOWN_FACTOR = 0.5
# Unknown words of one or two letters ("rp", "gf") are mostly chat abbreviations.
_SHORT_UNKNOWN_FACTOR = 0.5
# A word the FAQ has only in answer text says little about what a question asks: it counts this
# much of its weight in the share a topic has to explain (a keyword, title or alias word counts
# fully, an unknown word too).
_BODY_ONLY_FACTOR = 0.5
# Model names (`faq._lexicon.MODEL_NAMES`) count this much beside other words.
_MODEL_NAME_FACTOR = 0.5
# Evidence an answer needs: the sum of idf * weight over the question's terms that the topic has
# as a keyword, title or alias word, as a share of the idf of a word only one topic uses. With the
# ten bundled topics, one keyword that at most three topics use, or one title word that only this
# topic uses, is enough; a word shared by several topics is not.
_MIN_EVIDENCE = 0.6
# Without RWKV or the bot named and without a keyword, a topic needs this many of the question's
# words in its title or aliases ("how long would training take on one gpu").
_MIN_TITLE_TERMS = 3
# Two topics whose confidences are this close are compared by their keyword evidence instead.
_TIE_MARGIN = 0.03
# Suggestions offered when nothing answers: at most this many, each at least this confident.
_SUGGESTIONS = 3
_SUGGESTION_FLOOR = 0.2
# Fuzzy matching of unknown words: only words this long, with this rapidfuzz ratio (0-100).
_FUZZY_MIN_LENGTH = 5
_FUZZY_CUTOFF = 80.0
# A question is short; reading only this many words bounds the time of a 2000-character message.
_MAX_QUERY_TOKENS = 64
_MAX_QUERY_CHARS = 1000

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
class Lookup:
    """What the FAQ has for a question.

    `answer` is the topic that answers it, or None. Without an answer, `candidates` are the two
    topics that tie (`tied` is True: "did you mean one of these?") or the closest topics below
    the threshold, best first (possibly none).
    """

    answer: Match | None
    candidates: tuple[Match, ...] = ()
    tied: bool = False


@dataclass(frozen=True)
class _Scored:
    """A topic's score for one question, with the evidence behind it."""

    match: Match
    evidence: float  # coverage by the terms the topic has as keyword, title or alias words
    keyword_evidence: float  # the same, for keywords (and complete multi-word keywords) only
    title_terms: int  # how many of the question's terms the topic has as keyword, title or alias


@dataclass(frozen=True)
class _Query:
    """A question split into what the matcher needs."""

    known: dict[str, float]  # term -> match quality (1, or less for a fuzzy match)
    emphasis: dict[str, float]  # term -> how much it counts in the question (1, or less)
    unknown_weight: float
    names_domain: bool
    names_product: bool
    names_own: bool  # RWKV or the bot by name (not only "model")


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
        # How much of its weight a term counts in the share of the question a topic must explain.
        strongest: dict[str, float] = defaultdict(float)
        for entry in self._entries:
            for term, weight in entry.weights.items():
                strongest[term] = max(strongest[term], weight)
        self._share = {
            term: 1.0 if weight >= _TITLE_WEIGHT else _BODY_ONLY_FACTOR for term, weight in strongest.items()
        }
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
        """Return up to `limit` topics with a confidence above 0, best first.

        Unlike `best`, this includes topics below the threshold, for "did you mean" lists. Equal
        confidences are ordered by keyword evidence, then by title.
        """
        return [scored.match for scored in self._score(self._analyse(query))[: max(limit, 0)]]

    def lookup(self, query: str) -> Lookup:
        """Return the answer to `query`, or the two tied topics, or the closest topics.

        The best score must reach the threshold; of the topics within the tie margin below it, the
        one with the most keyword evidence answers (its own score may lie inside that margin).
        """
        analysed = self._analyse(query)
        ranked = self._score(analysed)
        suggestions = tuple(
            scored.match for scored in ranked[:_SUGGESTIONS] if scored.match.confidence >= _SUGGESTION_FLOOR
        )
        if not ranked or ranked[0].match.confidence < self.threshold:
            return Lookup(None, suggestions)
        if analysed.names_product and not analysed.names_own:
            return Lookup(None, suggestions)
        close = [
            scored for scored in ranked if scored.match.confidence >= ranked[0].match.confidence - _TIE_MARGIN
        ]
        strongest = max(scored.keyword_evidence for scored in close)
        leaders = [scored for scored in close if scored.keyword_evidence >= strongest - 1e-9]
        if max(scored.evidence for scored in leaders) < _MIN_EVIDENCE * self._unknown_idf:
            return Lookup(None, suggestions)
        # Without RWKV, a model or the bot named, a keyword of the topic, or several words of its
        # title and aliases, say what the question is about: "how much does a gpu cost" shares
        # two title words with the training cost topic, but none of its keywords.
        title_terms = max(scored.title_terms for scored in leaders)
        if not analysed.names_domain and strongest == 0.0 and title_terms < _MIN_TITLE_TERMS:
            return Lookup(None, suggestions)
        if len(leaders) > 1:
            return Lookup(None, tuple(scored.match for scored in leaders[:2]), tied=True)
        return Lookup(leaders[0].match)

    def best(self, query: str) -> Match | None:
        """Return the topic that answers `query` (see `lookup`), or None."""
        return self.lookup(query).answer

    def answer(self, query: str) -> str | None:
        """Return the rendered answer of the best topic, or None below the threshold.

        This makes the index usable wherever only text is needed (the chat's `+faq` command).
        """
        found = self.best(query)
        return render_answer(found.topic) if found is not None else None

    def miss(self, query: str) -> str:
        """The reply to a question without an answer: the tied or closest topics to ask again
        with, or a pointer to the list (for the chat's ``+faq``, as ``/faq ask`` does)."""
        return render_miss(query, self.lookup(query))

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

    def _score(self, query: _Query) -> list[_Scored]:
        """Score every topic that shares a term with the query, best first."""
        if not query.known:
            return []
        total = query.unknown_weight + sum(
            self._idf[term] * self._share[term] * query.emphasis[term] for term in query.known
        )
        title_rank = {topic.id: position for position, topic in enumerate(self._by_title)}
        scored = []
        for entry in self._entries:
            coverage, evidence, keyword_evidence, title_terms = _coverage(entry, query, self._idf)
            if coverage > 0.0:
                confidence = round(min(coverage / total, 1.0), 4)
                found = Match(entry.topic, confidence)
                scored.append(_Scored(found, evidence, keyword_evidence, title_terms))
        scored.sort(key=lambda s: (-s.match.confidence, -s.keyword_evidence, title_rank[s.match.topic.id]))
        return scored

    def _analyse(self, query: str) -> _Query:
        """Split a query into its known terms (with match quality) and the weight of the rest."""
        known: dict[str, float] = {}
        emphasis: dict[str, float] = {}
        unknown_weight = 0.0
        # A question is short: a pasted wall of text is read from its start only, and cut
        # before the phrase patterns run over it.
        tokens = raw_tokens(query[:_MAX_QUERY_CHARS])[:_MAX_QUERY_TOKENS]
        # Naming RWKV says the question is about this domain, so words the FAQ does not know
        # are more likely detail ("at home", "on my laptop") than a different subject.
        names_domain = any(token in DOMAIN_WORDS or token.startswith("rwkv") for token in tokens)
        names_product = any(token in OTHER_PRODUCTS for token in tokens)
        names_own = any(token in OWN_NAMES or token.startswith("rwkv") for token in tokens)
        unknown_factor = _DOMAIN_UNKNOWN_FACTOR if names_domain else 1.0
        for token in tokens:
            # Another product's name neither helps nor hurts a topic's score: whether the
            # question is about that product is the product check's to decide (see `lookup`).
            term = None if token in OTHER_PRODUCTS else canonical(token)
            if term is None:
                continue
            quality = 1.0
            if term not in self._idf:
                # A word the lexicon knows as something else ("windows") is no typo.
                fuzzy = None if token in SYNONYMS else self._fuzzy(token, term)
                if fuzzy is None:
                    has_digit = any(char.isdigit() for char in term)
                    factor = _UNKNOWN_NUMBER_FACTOR if has_digit else 1.0
                    factor *= _SHORT_UNKNOWN_FACTOR if len(term) <= 2 else 1.0
                    unknown_weight += self._unknown_idf * factor * unknown_factor
                    continue
                term, quality = fuzzy
            known[term] = max(known.get(term, 0.0), quality)
            emphasis[term] = min(emphasis.get(term, 1.0), _MODEL_NAME_FACTOR if token in MODEL_NAMES else 1.0)
        if len(known) == 1:
            emphasis = dict.fromkeys(known, 1.0)
        return _Query(known, emphasis, unknown_weight, names_domain, names_product, names_own)

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


def _coverage(entry: _TopicTerms, query: _Query, idf: dict[str, float]) -> tuple[float, float, float, int]:
    """Return the topic's coverage of the query's known terms (idf * quality * emphasis * topic
    weight), its evidence (idf * quality * weight over keyword, title and alias words), its keyword
    evidence (the idf-weighted terms it has as keywords) and how many terms it has as keyword,
    title or alias words."""
    weights = entry.weights
    known = query.known
    complete = [phrase for phrase in entry.phrases if phrase <= known.keys()]
    if complete:
        weights = dict(weights)
        for phrase in complete:
            weights.update(dict.fromkeys(phrase, _KEYWORD_WEIGHT))
    coverage = evidence = keyword_evidence = 0.0
    title_terms = 0
    for term, quality in known.items():
        weight = weights.get(term, 0.0)
        value = idf[term] * quality
        coverage += value * weight * query.emphasis[term]
        if weight >= _TITLE_WEIGHT:
            evidence += value * weight
            title_terms += 1
        if weight >= _KEYWORD_WEIGHT:
            keyword_evidence += value * query.emphasis[term]
    return coverage, evidence, keyword_evidence, title_terms


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
