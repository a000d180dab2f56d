"""The FAQ matcher answers realistic questions with the right topic and stays quiet otherwise."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from faq import DEFAULT_THRESHOLD, FaqIndex, Topic, bundled_topics_dir, is_question, load_topics
from faq.evaluate import evaluate

# (question as a user would type it, expected topic id or None for "no FAQ entry").
# Module-level so that `python -m faq.evaluate` scores the same table.
QUESTION_CASES: list[tuple[str, str | None]] = [
    # next-release
    ("When is the next release?", "next-release"),
    ("when is the next model coming out", "next-release"),
    ("any eta on rwkv 8?", "next-release"),
    ("release date for the new model??", "next-release"),
    ("when will v7 drop", "next-release"),
    ("is there a roadmap", "next-release"),
    ("wen next model", "next-release"),
    # training-data
    ("wat data was it trained on", "training-data"),
    ("What dataset is RWKV trained on?", "training-data"),
    ("training data", "training-data"),
    ("was raven trained on gpt4all?", "training-data"),
    ("is the world model trained on redpajama", "training-data"),
    ("which datasets did u use", "training-data"),
    ("was it trained on the pile", "training-data"),
    # censorship
    ("is it censored?", "censorship"),
    ("Is the RWKV model censored?", "censorship"),
    ("uncensored?", "censorship"),
    ("does it do nsfw", "censorship"),
    ("why does it refuse to answer my questions", "censorship"),
    ("is there censorship", "censorship"),
    ("it keeps saying as an ai it cant help, why", "censorship"),
    # context-length
    ("ctx len", "context-length"),
    ("what's the context length", "context-length"),
    ("what does 8k in the model name mean", "context-length"),
    ("Why do the models have 4k/8k in their names?", "context-length"),
    ("isn't the context supposed to be infinite?", "context-length"),
    ("how many tokens can the context window hold", "context-length"),
    ("can I finetune for a longer context", "context-length"),
    ("max context lenght", "context-length"),
    # license
    ("licence", "license"),
    ("can I use it commercially", "license"),
    ("What is RWKV licensed under?", "license"),
    ("is rwkv open source?", "license"),
    ("apache 2?", "license"),
    ("can i use rwkv in a commercial product", "license"),
    ("what lisence does it use", "license"),
    # raccoon
    ("what is racoon", "raccoon"),
    ("who made raccoon", "raccoon"),
    ("where do I download the raccoon model", "raccoon"),
    ("why is raccoon so rude to me", "raccoon"),
    ("nath's finetune", "raccoon"),
    # chat-commands
    ("what are the chat commands", "chat-commands"),
    ("how do I reset the chat", "chat-commands"),
    ("what does +gen do", "chat-commands"),
    ("how to change temperature", "chat-commands"),
    ("set top_p", "chat-commands"),
    ("+qa vs +i?", "chat-commands"),
    ("how do i make the bot continue its generation", "chat-commands"),
    ("list of bot comands", "chat-commands"),
    # architecture
    ("where can I read about the architecture", "architecture"),
    ("how does time mixing work", "architecture"),
    ("explain the hidden state", "architecture"),
    ("rwkv architecture", "architecture"),
    ("what is channel mixing", "architecture"),
    ("how does rwkv work internally", "architecture"),
    # training-cost
    ("how much would it cost to train a 20b model from scratch", "training-cost"),
    ("how expensive is training", "training-cost"),
    ("can I train rwkv from scratch on one gpu", "training-cost"),
    ("training cost", "training-cost"),
    ("how many gpu hours to pretrain", "training-cost"),
    ("why can't you just tell me the price of training", "training-cost"),
    ("I want to donate compute", "training-cost"),
    # training-parallelization
    ("does rwkv support training parallelization", "training-parallelization"),
    ("retnet says rwkv can't be parallelized, is that true?", "training-parallelization"),
    ("can I train on multiple gpus", "training-parallelization"),
    ("deepspeed", "training-parallelization"),
    ("is rwkv training paralelizable", "training-parallelization"),
    ("is it slower to train than a transformer", "training-parallelization"),
    # found later, phrased differently from anything above
    ("any news on the next version?", "next-release"),
    ("when do we get a new rwkv", "next-release"),
    ("is there a release schedule", "next-release"),
    ("upcoming models?", "next-release"),
    ("has blinkdl said when the next one is out", "next-release"),
    ("rwkv 7 when", "next-release"),
    ("what was raven finetuned on", "training-data"),
    ("what's in the training set", "training-data"),
    ("is it trained on english only or other languages too", "training-data"),
    ("dataset?", "training-data"),
    ("what did you train world on", "training-data"),
    ("is the pile part of the training?", "training-data"),
    ("will it refuse stuff", "censorship"),
    ("does rwkv have guardrails", "censorship"),
    ("is the model filtered", "censorship"),
    ("does it self censor", "censorship"),
    ("does rwkv have any content filter", "censorship"),
    ("will it write nsfw stories", "censorship"),
    ("max tokens?", "context-length"),
    ("what happens if my prompt is longer than 4k", "context-length"),
    ("context size", "context-length"),
    ("is the ctx infinite", "context-length"),
    ("how many tokens can rwkv remember", "context-length"),
    ("does performance degrade past the context length", "context-length"),
    ("whats the licence", "license"),
    ("can i sell stuff made with rwkv", "license"),
    ("is it free for commercial use", "license"),
    ("apache license?", "license"),
    ("is it ok to use in a company product", "license"),
    ("what are the license terms", "license"),
    ("is it apache licensed", "license"),
    ("raccoon model", "raccoon"),
    ("who is nath", "raccoon"),
    ("the insulting bot", "raccoon"),
    ("where's the raccoon huggingface link", "raccoon"),
    ("m8than model", "raccoon"),
    ("-temp", "chat-commands"),
    ("how do I retry", "chat-commands"),
    ("what does +++ do", "chat-commands"),
    ("bot commands", "chat-commands"),
    ("what's the difference between ++ and +", "chat-commands"),
    ("how to use +i", "chat-commands"),
    ("what does the + command do", "chat-commands"),
    ("how to set temp", "chat-commands"),
    ("paper on rwkv internals", "architecture"),
    ("is rwkv an rnn", "architecture"),
    ("how does the wkv work", "architecture"),
    ("token shift", "architecture"),
    ("where is the hidden state explained", "architecture"),
    ("channel mix vs time mix", "architecture"),
    ("how much money to train 14b", "training-cost"),
    ("could I pretrain my own rwkv at home", "training-cost"),
    ("how long would it take on a single a100", "training-cost"),
    ("how much vram do i need to train", "training-cost"),
    ("cost to train from scratch", "training-cost"),
    ("why won't you give a simple number for the training budget", "training-cost"),
    ("how many years would one a100 take", "training-cost"),
    ("does it scale to many gpus", "training-parallelization"),
    ("rwkv vs retnet", "training-parallelization"),
    ("is training parallel", "training-parallelization"),
    ("multi-gpu training", "training-parallelization"),
    ("is rwkv parallelizable during training", "training-parallelization"),
    ("retnet paper claims", "training-parallelization"),
    ("does it use deepspeed for multi gpu", "training-parallelization"),
    # off-topic: no FAQ entry
    ("what's the weather in Paris", None),
    ("write me a poem about cats", None),
    ("how do I bake bread", None),
    ("who won the world cup", None),
    ("what is the capital of France", None),
    ("how much does a used car cost", None),
    ("tell me a joke", None),
    ("can you help me with my python homework", None),
    ("good morning everyone", None),
    ("what time is it in Tokyo", None),
    ("how do I install linux on my laptop", None),
    ("recommend me a good movie", None),
    ("is pineapple on pizza acceptable", None),
    ("what's your favourite colour", None),
    ("how long does it take to boil an egg", None),
    ("hello", None),
    ("how do i cook pasta", None),
    ("what's the best gpu for gaming", None),
    ("who is the president", None),
    ("lol", None),
    ("translate this to german", None),
    ("what is 2+2", None),
    ("can you summarize this article", None),
    ("which phone should I buy", None),
    ("how do I train my dog", None),
    ("what is the meaning of life", None),
    ("is it going to rain tomorrow", None),
    ("what's for dinner", None),
    ("how do I fix my car", None),
    ("explain quantum physics", None),
    ("what's bitcoin price today", None),
    ("any good books?", None),
    # off-topic but sharing words with the FAQ
    ("how do I reset my password", None),
    ("can I use my phone charger for my laptop", None),
    ("where can I download minecraft", None),
    ("what's the context of this meme", None),
    ("what's the release date of gta 6", None),
    ("what license plate is that", None),
    ("how much does a gpu cost", None),
    ("is chatgpt censored", None),
    ("what temperature is it outside", None),
    ("what's the architecture of the eiffel tower", None),
    ("when is the next episode coming out", None),
    ("is this channel for memes", None),
    ("who made this server", None),
    ("how to train a neural network in pytorch", None),
    ("what is a transformer", None),
    ("where do raccoons live", None),
    ("what dataset should I use for my school project", None),
    ("can you write a python script that downloads youtube videos", None),
    ("what's the capital of australia", None),
    ("I love this bot", None),
    ("does rwkv work on windows", None),  # no FAQ entry about platforms
    ("does it work on cpu?", None),
]

# Questions the matcher gets wrong today, kept in the table so that precision and recall are
# honest. Their tests are strict xfails: one that starts passing must be moved out of this set.
KNOWN_MISSES = frozenset(
    {
        "will it write nsfw stories",  # "write" and "stories" weigh more than "nsfw"
        "when is the next episode coming out",  # shares "next" and "come out" with next-release
        # "a100" alone is no keyword of training-cost (so that "what does an a100 cost" gets
        # no answer), and "years" and "take" say little
        "how many years would one a100 take",
    }
)

# Levels reached on the table above (`python -m faq.evaluate`); they may only go up (recall
# went from 131 to 130 of 132 once, for the near miss "what does an a100 cost").
MIN_PRECISION = 0.992
MIN_RECALL = 0.984  # 130 of 132

_TABLE = [
    pytest.param(
        question,
        expected,
        marks=[pytest.mark.xfail(strict=True, reason="known miss")] if question in KNOWN_MISSES else [],
    )
    for question, expected in QUESTION_CASES
]


@pytest.fixture(scope="module")
def index() -> FaqIndex:
    """An index over the bundled topics."""
    result = load_topics([bundled_topics_dir()])
    assert result.problems == []
    return FaqIndex(result.topics.values())


@pytest.mark.parametrize(("question", "expected"), _TABLE)
def test_question_gets_expected_topic(index: FaqIndex, question: str, expected: str | None) -> None:
    """Each question of the table is answered with its topic, or not answered when off-topic."""
    best = index.best(question)
    assert (best.topic.id if best else None) == expected, index.match(question)


def test_table_size() -> None:
    """The table keeps at least 40 on-topic and 10 off-topic questions, each listed once."""
    on_topic = [case for case in QUESTION_CASES if case[1] is not None]
    assert len(on_topic) >= 40
    assert len(QUESTION_CASES) - len(on_topic) >= 10
    assert len({question for question, _ in QUESTION_CASES}) == len(QUESTION_CASES)
    assert {question for question, _ in QUESTION_CASES} >= KNOWN_MISSES


def test_precision_and_recall_stay_at_reached_levels(index: FaqIndex) -> None:
    """Precision and recall over the whole table do not fall below the levels reached."""
    scores = evaluate(index, QUESTION_CASES)
    assert scores.precision >= MIN_PRECISION, scores.mistakes
    assert scores.recall >= MIN_RECALL, scores.mistakes


def test_match_is_sorted_limited_and_bounded(index: FaqIndex) -> None:
    """`match` returns at most `limit` results, best first, with confidences in (0, 1]."""
    matches = index.match("how much does training cost and is training parallel", limit=2)
    assert len(matches) == 2
    assert matches[0].confidence >= matches[1].confidence
    assert all(0.0 < match.confidence <= 1.0 for match in matches)


def test_exact_keyword_is_full_confidence(index: FaqIndex) -> None:
    """A query that is exactly a keyword gets confidence 1."""
    best = index.best("Apache 2.0")
    assert best is not None
    assert (best.topic.id, best.confidence) == ("license", 1.0)


def test_answer_renders_best_topic_or_none(index: FaqIndex) -> None:
    """`answer` gives the rendered text of the best topic, or None when nothing matches."""
    answer = index.answer("is it censored?")
    assert answer is not None and answer.startswith("**Is RWKV censored?**")
    assert index.answer("how do I bake bread") is None


def test_match_is_deterministic(index: FaqIndex) -> None:
    """The same query gives the same ranking every time."""
    assert index.match("training", limit=10) == index.match("training", limit=10)


def test_empty_or_filler_query_has_no_match(index: FaqIndex) -> None:
    """A query without any content word matches nothing."""
    assert index.match("") == []
    assert index.match("?? how is it ??") == []
    assert index.best("what") is None


def test_threshold_decides_between_answer_and_none() -> None:
    """`best` answers only when the confidence reaches the index's threshold."""
    topics = load_topics([bundled_topics_dir()]).topics.values()
    question = "could I pretrain my own rwkv at home"
    confidence = FaqIndex(topics).match(question)[0].confidence
    assert FaqIndex(topics, threshold=confidence).best(question) is not None
    assert FaqIndex(topics, threshold=min(confidence + 0.01, 1.0)).best(question) is None


def test_threshold_out_of_range_is_refused() -> None:
    """A threshold outside 0..1 is a programming error."""
    with pytest.raises(ValueError, match="threshold"):
        FaqIndex([], threshold=1.5)


def test_default_threshold_is_a_probability() -> None:
    """The default threshold lies strictly between 0 and 1."""
    assert 0.0 < DEFAULT_THRESHOLD < 1.0


def test_empty_index_matches_nothing() -> None:
    """An index without topics answers None and completes nothing."""
    index = FaqIndex([])
    assert index.best("license") is None
    assert index.autocomplete("") == []


def test_queries_are_fast(index: FaqIndex) -> None:
    """A query takes well under 5 ms on average."""
    questions = [question for question, _ in QUESTION_CASES]
    started = time.perf_counter()
    for question in questions:
        index.match(question)
    assert (time.perf_counter() - started) / len(questions) < 0.005


def test_autocomplete_empty_prefix_lists_all_in_title_order(index: FaqIndex) -> None:
    """An empty prefix lists every topic, sorted by title."""
    titles = [topic.title for topic in index.autocomplete("")]
    assert titles == sorted(titles, key=str.casefold)
    assert len(titles) == len(index.topics)


def test_autocomplete_puts_title_prefix_first(index: FaqIndex) -> None:
    """Titles starting with the prefix come before topics that only mention it."""
    found = index.autocomplete("what l")
    assert found[0].id == "license"


def test_autocomplete_finds_keywords_and_typos(index: FaqIndex) -> None:
    """A keyword, or a misspelt question, completes to its topic."""
    assert index.autocomplete("deepspeed")[0].id == "training-parallelization"
    assert "license" in [topic.id for topic in index.autocomplete("lisence")]


def test_autocomplete_respects_limit(index: FaqIndex) -> None:
    """No more than `limit` topics are returned."""
    assert len(index.autocomplete("", limit=3)) == 3
    assert index.autocomplete("", limit=0) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("is it censored?", True),
        ("what is the context length", True),
        ("How do I reset the chat", True),
        ("<@1234> can I use it commercially", True),
        ("does it work on cpu?!", True),
        ("wat data was it trained on", True),
        ("licence", False),
        ("nice, thanks", False),
        ("what", False),
        ("I trained a model yesterday.", False),
        ("", False),
    ],
)
def test_is_question(text: str, expected: bool) -> None:
    """Questions are recognised by a final "?" or a leading question word."""
    assert is_question(text) is expected


def _topic(topic_id: str, title: str, keywords: tuple[str, ...]) -> Topic:
    """A topic built in memory."""
    return Topic(topic_id, title, keywords, (), (), "Answer.", Path(f"{topic_id}.md"))


def test_works_with_operator_topics_only() -> None:
    """An index of a few custom topics ranks by their keywords."""
    index = FaqIndex(
        [
            _topic("rules", "Server rules", ("rules", "ban")),
            _topic("invite", "How do I invite the bot?", ("invite link",)),
        ]
    )
    best = index.best("where is the invite link")
    assert best is not None and best.topic.id == "invite"
    assert index.best("what are the server rules") is not None
    assert index.best("how do I bake bread") is None
