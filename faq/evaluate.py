"""Score the matcher on a table of questions: `python -m faq.evaluate [--cases FILE]`.

The table is `QUESTION_CASES` in tests/faq/test_matcher.py (the quality bar the tests enforce):
pairs of (question, expected topic id or None for "no entry").

- precision: of the answers given, the share that were the right topic;
- recall: of the questions that have a topic, the share answered with that topic.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from faq._matcher import FaqIndex
from faq._topics import bundled_topics_dir, load_topics

DEFAULT_CASES = Path(__file__).resolve().parents[1] / "tests" / "faq" / "test_matcher.py"


@dataclass(frozen=True)
class Scores:
    """Precision and recall of the matcher on a table, with the questions it got wrong."""

    precision: float
    recall: float
    answered: int
    correct: int
    on_topic: int
    mistakes: list[str]


def evaluate(index: FaqIndex, cases: Sequence[tuple[str, str | None]]) -> Scores:
    """Ask `index` every question of `cases` and score its answers against the expected ids."""
    answered = correct = on_topic = 0
    mistakes = []
    for question, expected in cases:
        found = index.best(question)
        got = found.topic.id if found else None
        on_topic += expected is not None
        answered += got is not None
        if got is not None and got == expected:
            correct += 1
        elif got != expected:
            mistakes.append(f"{question!r}: expected {expected}, got {got}")
    return Scores(
        precision=correct / answered if answered else 1.0,
        recall=correct / on_topic if on_topic else 1.0,
        answered=answered,
        correct=correct,
        on_topic=on_topic,
        mistakes=mistakes,
    )


def load_cases(path: Path) -> list[tuple[str, str | None]]:
    """Return `QUESTION_CASES` from the Python file at `path` (the matcher's test module)."""
    spec = importlib.util.spec_from_file_location("_faq_question_cases", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cases: list[tuple[str, str | None]] = module.QUESTION_CASES
    return cases


def main(argv: list[str] | None = None) -> int:
    """Print precision, recall, speed and the mistakes of the matcher on the question table."""
    parser = argparse.ArgumentParser(prog="python -m faq.evaluate", description=__doc__)
    parser.add_argument("--cases", type=Path, default=DEFAULT_CASES, help="file with QUESTION_CASES")
    args = parser.parse_args(argv)
    try:
        cases = load_cases(args.cases)
    except (OSError, ImportError, AttributeError) as error:
        print(f"cannot read the question table from {args.cases}: {error}", file=sys.stderr)
        return 2
    index = FaqIndex(load_topics([bundled_topics_dir()]).topics.values())
    started = time.perf_counter()
    scores = evaluate(index, cases)
    per_query_ms = (time.perf_counter() - started) * 1000 / max(len(cases), 1)
    print(f"questions: {len(cases)} ({scores.on_topic} on-topic, {len(cases) - scores.on_topic} off-topic)")
    print(f"precision: {scores.precision:.3f} ({scores.correct}/{scores.answered} answers right)")
    print(f"recall:    {scores.recall:.3f} ({scores.correct}/{scores.on_topic} on-topic answered)")
    print(f"time:      {per_query_ms:.2f} ms per question")
    for mistake in scores.mistakes:
        print(f"  wrong: {mistake}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
