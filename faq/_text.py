"""Text normalisation shared by the topic loader and the matcher.

A query and a topic are compared as lists of *terms*: lowercase tokens with spelling variants,
synonyms and simple inflections folded together, and filler words dropped. The loader uses the
same terms to decide whether two keywords clash, so "Licence" and "licenses" count as one keyword.
"""

from __future__ import annotations

import re
import unicodedata

from faq._lexicon import PHRASES, STOPWORD_TEXT, SYNONYM_GROUPS

# Multi-word spellings folded into one token before splitting (see `faq._lexicon.PHRASES`).
_PHRASES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(rf"\b{pattern}\b"), f" {replacement} ")
    for replacement, patterns in PHRASES.items()
    for pattern in patterns
)

SYNONYMS: dict[str, str] = {word: target for target, words in SYNONYM_GROUPS.items() for word in words}
"""Single-word variants and the word each stands for (from `faq._lexicon.SYNONYM_GROUPS`)."""

STOPWORDS: frozenset[str] = frozenset(STOPWORD_TEXT.split())
"""Words that carry no topic of their own (from `faq._lexicon.STOPWORD_TEXT`)."""

VERSION = "version"
"""The term a version token stands for: "v5", "rwkv6", the "6" of "rwkv 6"."""

KILO_TOKENS = "ktokens"
"""The term a token count such as "4k", "8k" or "32k" stands for."""

# "rwkv6", "v5", "ctx4096", "raven14b": a name glued to a number is split in two.
_GLUED = re.compile(r"(rwkv|raven|world|ctx|v)(\d[a-z0-9]*)")
_VERSION_NUMBER = re.compile(r"\d{1,2}(?:[a-z])?")
_KILO = re.compile(r"\d+k")
_SIZE = re.compile(r"\d+[bm]")

# A token is a run of letters and digits, or a chat command made of "+" signs and letters
# ("+gen", "+++", "+"), which the FAQ has to recognise as such.
_TOKEN = re.compile(r"(?<![a-z0-9+])\++[a-z]*|[a-z0-9]+")
_APOSTROPHE_S = re.compile(r"'s\b")
# A sampling setting given a value ("-top_p=0", "-temp=0.7") sets it for the message; it does not
# ask about it ("-temp", "-temp=" without a value, or "top_p", still do).
_SETTING = re.compile(r"(?<![\w-])-[a-z_]+=[^\s=]+")
# Links name hosts and paths, not what a text is about.
_URL = re.compile(r"https?://\S+|www\.\S+")
# A currency sign asks about money: "how much $ to train".
_CURRENCY = re.compile(r"[$\u20ac\u00a3]+")


def fold(text: str) -> str:
    """Return `text` case-folded, accent-free, without links, with currency signs as "money" and
    with multi-word phrases replaced by their words (`faq._lexicon.PHRASES`)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(char for char in text if not unicodedata.combining(char)).casefold()
    text = text.replace("\u2019", "'")
    text = _URL.sub(" ", text)
    text = _SETTING.sub(" ", text)
    text = _CURRENCY.sub(" money ", text)
    text = _APOSTROPHE_S.sub("", text).replace("'", "").replace("_", " ")
    for pattern, replacement in _PHRASES:
        text = pattern.sub(replacement, text)
    return text


def raw_tokens(text: str) -> list[str]:
    """Split `text` into folded tokens, keeping filler words (the fuzzy matcher needs them).

    Version and file-name tokens are split: "rwkv6" gives "rwkv" and "version", "v5" gives
    "version", "ctx4096" gives "ctx" and "4096"; a number right after "rwkv" is a version too.
    """
    tokens: list[str] = []
    for token in _TOKEN.findall(fold(text)):
        glued = _GLUED.fullmatch(token)
        if glued is None:
            after_rwkv = bool(tokens) and tokens[-1] == "rwkv"
            is_version = after_rwkv and _VERSION_NUMBER.fullmatch(token) is not None
            tokens.append(VERSION if is_version else token)
            continue
        name, number = glued.groups()
        is_version = name in ("rwkv", "v") and _VERSION_NUMBER.fullmatch(number) is not None
        if name != "v":
            tokens.append(name)
        tokens.append(VERSION if is_version else number)
    return tokens


def stem(word: str) -> str:
    """Strip common English inflections so that "trained", "training" and "trains" agree.

    This is deliberately crude: it only has to map a word and its variants to the *same* string,
    not to a real dictionary word, because queries and topics go through the same function.
    """
    if word.startswith("+") or not word.isalpha():
        return word
    # Repeat until nothing changes, so that stem(stem(w)) == stem(w): "filtered" -> "filter"
    # -> "filt" agrees with "filter" -> "filt".
    while True:
        shorter = _strip_suffix(word)
        if shorter == word:
            return word
        word = shorter


def _strip_suffix(word: str) -> str:
    """Remove one inflection suffix (one step of `stem`)."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    for suffix, keep in (("ing", ""), ("ed", ""), ("ally", "al"), ("ly", ""), ("er", "")):
        if len(word) > 5 and word.endswith(suffix):
            return word[: -len(suffix)] + keep
    if len(word) > 4 and word.endswith("e"):
        return word[:-1]
    return word


def canonical(token: str) -> str | None:
    """Return the term a folded token stands for, or None for a filler word or a bare number.

    Bare numbers ("2" of "Apache 2.0", "2+2") and model sizes ("14b") name no topic; token counts
    ("4k", "32k") all stand for one term; "a100" is kept.
    """
    token = SYNONYMS.get(token, token)
    if token in STOPWORDS or token.isdigit() or _SIZE.fullmatch(token):
        return None
    if _KILO.fullmatch(token):
        return KILO_TOKENS
    term = stem(token)
    return None if term in STOPWORDS else term


def terms(text: str) -> list[str]:
    """Return the terms of `text` in order, without filler words."""
    return [term for term in map(canonical, raw_tokens(text)) if term is not None]
