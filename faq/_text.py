"""Text normalisation shared by the topic loader and the matcher.

A query and a topic are compared as lists of *terms*: lowercase tokens with spelling variants,
synonyms and simple inflections folded together, and filler words dropped. The loader uses the
same terms to decide whether two keywords clash, so "Licence" and "licenses" count as one keyword.
"""

from __future__ import annotations

import re
import unicodedata

# Multi-word spellings folded into one token before splitting, so that both halves are not
# scored separately ("open source" is one idea, "open" and "source" alone are not).
_PHRASES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(rf"\b{pattern}\b"), replacement)
    for pattern, replacement in (
        (r"open[ -]?sourced?", "opensource"),
        (r"fine[ -]?tun(?:e|ed|ing|es)", "finetune"),
        (r"data[ -]sets?", "dataset"),
        (r"train(?:ing)?[ -](?:sets?|corpus|corpora)", "dataset"),
        (r"top[ _-]?p", "topp"),
        (r"(?:come|comes|coming|came) out", "release"),
        (r"multi(?:ple)?[ -]gpus?", "multigpu"),
        (r"(?:many|several) gpus", "multigpu"),
        (r"self[ -]censor(?:ed|ing|s|ship)?", "selfcensor"),
        (r"as an ai", "refusal"),
        (r"hugging ?face", "huggingface"),
    )
)

# Single-token variants: British spellings, abbreviations, chat slang, and words that mean the
# same thing here. Values are raw words; they still go through the stemmer.
SYNONYMS: dict[str, str] = {
    "licence": "license",
    "licences": "license",
    "licenced": "license",
    "licencing": "license",
    "licensing": "license",
    "licensed": "license",
    "commercially": "commercial",
    "commerce": "commercial",
    "business": "commercial",
    "company": "commercial",
    "companies": "commercial",
    "enterprise": "commercial",
    "hf": "huggingface",
    "ctx": "context",
    "len": "length",
    "wat": "what",
    "wut": "what",
    "wen": "when",
    "whats": "what",
    "u": "you",
    "ur": "your",
    "r": "are",
    "y": "why",
    "pls": "please",
    "plz": "please",
    "thx": "thanks",
    "max": "limit",
    "maximum": "limit",
    "cmd": "command",
    "cmds": "command",
    "temp": "temperature",
    "racoon": "raccoon",
    "uncensored": "censor",
    "refuse": "refusal",
    "refuses": "refusal",
    "refused": "refusal",
    "refusing": "refusal",
    "refusals": "refusal",
    "censorship": "censor",
    "nsfw": "censor",
    "oss": "opensource",
    "foss": "opensource",
    "data": "dataset",
    "corpus": "dataset",
    "parallelism": "parallel",
    "parallelization": "parallel",
    "parallelisation": "parallel",
    "parallelize": "parallel",
    "parallelise": "parallel",
    "parallelized": "parallel",
    "parallelised": "parallel",
    "parallelizing": "parallel",
    "parallelising": "parallel",
    "expensive": "cost",
    "costly": "cost",
    "pricey": "cost",
    "price": "cost",
    "pricing": "cost",
    "money": "cost",
    "launch": "release",
    "launched": "release",
    "drop": "release",
    "dropping": "release",
    "ship": "release",
    "upcoming": "next",
    "eta": "next",
    "multigpus": "multigpu",
    "pretrain": "pretraining",
    "pretrained": "pretraining",
    "used": "use",
    "using": "use",
}

# Words that carry no topic of their own. "rwkv" and "model" are in every answer, so they cannot
# tell topics apart; the rest are question words, pronouns and chat filler.
STOPWORDS: frozenset[str] = frozenset(
    """
    a an the and or but if of to in on at by for with about from as into onto is are was were be
    been being am do does did doing done have has had having can could would should will shall
    may might must i me my mine we us our you your yours he she it its they them their this that
    these those there here what which who whom whose when where why how not no yes so than then
    too very just also any some all each every more most such only own same other else again ever
    even out up down over under off please thanks thank hi hello hey yo guys guy anyone someone
    somebody anybody know tell question wondering wonder want wanna gonna need get got let lets
    like really actually basically pretty kind sort thing things stuff way able possible rwkv
    model models ok okay lol bro dude sir mate im ive id youre dont doesnt didnt cant isnt arent
    wont wasnt whats hows whys wheres whos much many go going keep say said help
    make made makes making vs versus difference between compared
    """.split()  # noqa: SIM905 (a word list reads better as text than as 180 quoted strings)
)

# A token is a run of letters and digits, or a chat command made of "+" signs and letters
# ("+gen", "+++", "+"), which the FAQ has to recognise as such.
_TOKEN = re.compile(r"(?<![a-z0-9+])\++[a-z]*|[a-z0-9]+")
_APOSTROPHE_S = re.compile(r"'s\b")


def fold(text: str) -> str:
    """Return `text` case-folded, accent-free and with multi-word phrases joined into one token."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(char for char in text if not unicodedata.combining(char)).casefold()
    text = text.replace("\u2019", "'")
    text = _APOSTROPHE_S.sub("", text).replace("'", "").replace("_", " ")
    for pattern, replacement in _PHRASES:
        text = pattern.sub(replacement, text)
    return text


def raw_tokens(text: str) -> list[str]:
    """Split `text` into folded tokens, keeping filler words (the fuzzy matcher needs them)."""
    return _TOKEN.findall(fold(text))


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

    Bare numbers ("2" of "Apache 2.0", "2+2") name no topic; "4k" or "a100" are kept.
    """
    token = SYNONYMS.get(token, token)
    if token in STOPWORDS or token.isdigit():
        return None
    term = stem(token)
    return None if term in STOPWORDS else term


def terms(text: str) -> list[str]:
    """Return the terms of `text` in order, without filler words."""
    return [term for term in map(canonical, raw_tokens(text)) if term is not None]
