"""The development set: casual questions scored at the levels the README reports."""

from __future__ import annotations

import pytest

from faq import FaqIndex, bundled_topics_dir, load_topics
from faq.evaluate import DEV_CASES, Scores, evaluate, load_heldout, main

# Levels reached on tests/faq/dev.toml (README, FAQ section); they may only go up.
MIN_RECALL = 0.967  # 176 of 182
MIN_PRECISION = 0.994  # 176 of 177
MAX_OFF_TOPIC_RATE = 0.013  # 1 of 77


@pytest.fixture(scope="module")
def scores() -> Scores:
    """The matcher's scores on the development set."""
    index = FaqIndex(load_topics([bundled_topics_dir()]).topics.values())
    return evaluate(index, load_heldout(DEV_CASES))


def test_dev_set_size_and_labels() -> None:
    """At least 100 on-topic questions covering every topic and 40 off-topic, each once."""
    cases = load_heldout(DEV_CASES)
    questions = [question for question, _ in cases]
    assert len(questions) == len(set(questions))
    on_topic = [topic for _, topic in cases if topic is not None]
    assert len(on_topic) >= 100 and len(cases) - len(on_topic) >= 40
    assert set(on_topic) == set(load_topics([bundled_topics_dir()]).topics)


def test_dev_set_stays_at_reached_levels(scores: Scores) -> None:
    """Recall, precision and the share of off-topic messages answered keep their levels."""
    assert scores.recall >= MIN_RECALL, scores.mistakes
    assert scores.precision >= MIN_PRECISION, scores.mistakes
    assert scores.off_topic_rate <= MAX_OFF_TOPIC_RATE, scores.mistakes


def test_evaluate_command_only_dev(capsys: pytest.CaptureFixture[str]) -> None:
    """--dev scores only the development set, with its size and mistakes."""
    assert main(["--dev"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("development set (tests/faq/dev.toml): 259 questions (182 on-topic, 77 off-topic)")
    assert "tuning table" not in out and "held-out set" not in out
    assert "wrong:" in out
