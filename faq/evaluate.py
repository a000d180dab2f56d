"""Score the matcher on question tables: `python -m faq.evaluate [--tuning | --dev | --heldout |
--cases FILE]`.

Three tables, reported separately:

- the tuning table, `QUESTION_CASES` in tests/faq/test_matcher.py: the questions the matcher was
  tuned on (the quality bar the tests enforce);
- the development set, tests/faq/dev.toml: casual questions written from the RWKV wiki FAQ,
  scored before the matcher was changed for them, and tuned on since;
- the held-out set, tests/faq/heldout.toml: questions written from the RWKV wiki FAQ alone and
  frozen before the matcher was tuned, never used to tune it.

With no option all three are scored. A case is a question and the topic id that should answer it, or
None for a message that should get no answer.

- precision: of the answers given, the share that were the right topic;
- recall: of the questions that have a topic, the share answered with that topic;
- off-topic answered: of the questions without a topic, the share that got an answer anyway.

A tie ("did you mean" with two topics) and a list of suggestions are not answers.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from faq._matcher import FaqIndex
from faq._topics import bundled_topics_dir, load_topics

_TESTS = Path(__file__).resolve().parents[1] / "tests" / "faq"
DEFAULT_CASES = _TESTS / "test_matcher.py"
DEV_CASES = _TESTS / "dev.toml"
HELDOUT_CASES = _TESTS / "heldout.toml"

Case = tuple[str, str | None]


@dataclass(frozen=True)
class Scores:
    """Precision and recall of the matcher on a table, with the questions it got wrong."""

    precision: float
    recall: float
    answered: int
    correct: int
    on_topic: int
    mistakes: list[str]
    off_topic: int = 0
    off_topic_answered: int = 0
    ties: int = 0

    @property
    def off_topic_rate(self) -> float:
        """The share of questions without a topic that got an answer (0 when there are none)."""
        return self.off_topic_answered / self.off_topic if self.off_topic else 0.0


def evaluate(index: FaqIndex, cases: Sequence[Case]) -> Scores:
    """Ask `index` every question of `cases` and score its answers against the expected ids."""
    answered = correct = on_topic = off_topic_answered = ties = 0
    mistakes = []
    for question, expected in cases:
        found = index.lookup(question)
        got = found.answer.topic.id if found.answer else None
        on_topic += expected is not None
        answered += got is not None
        ties += found.tied
        if expected is None and got is not None:
            off_topic_answered += 1
        if got is not None and got == expected:
            correct += 1
        elif got != expected:
            shown = got or (
                "tie: " + " or ".join(m.topic.id for m in found.candidates) if found.tied else None
            )
            mistakes.append(f"{question!r}: expected {expected}, got {shown}")
    return Scores(
        precision=correct / answered if answered else 1.0,
        recall=correct / on_topic if on_topic else 1.0,
        answered=answered,
        correct=correct,
        on_topic=on_topic,
        mistakes=mistakes,
        off_topic=len(cases) - on_topic,
        off_topic_answered=off_topic_answered,
        ties=ties,
    )


def load_cases(path: Path) -> list[Case]:
    """Return `QUESTION_CASES` from the Python file at `path` (the matcher's test module)."""
    spec = importlib.util.spec_from_file_location("_faq_question_cases", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cases: list[Case] = module.QUESTION_CASES
    return cases


def load_heldout(path: Path = HELDOUT_CASES) -> list[Case]:
    """Return the cases of a TOML question file (the held-out or the development set):
    `off_topic = [...]` and `[on_topic]` lists.

    Raises ValueError when the file is not shaped like that.
    """
    with path.open("rb") as file:
        data = tomllib.load(file)
    off_topic = data.get("off_topic", [])
    on_topic = data.get("on_topic", {})
    if not isinstance(off_topic, list) or not isinstance(on_topic, dict):
        raise ValueError(f"{path}: needs an 'off_topic' list and an [on_topic] table")
    cases: list[Case] = []
    for topic_id, questions in on_topic.items():
        if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
            raise ValueError(f"{path}: on_topic.{topic_id} must be a list of questions")
        cases += [(question, topic_id) for question in questions]
    if not all(isinstance(question, str) for question in off_topic):
        raise ValueError(f"{path}: off_topic must be a list of questions")
    cases += [(question, None) for question in off_topic]
    return cases


def report(name: str, index: FaqIndex, cases: Sequence[Case], *, show_mistakes: bool = True) -> list[str]:
    """Score `cases` and return the report lines for them."""
    started = time.perf_counter()
    scores = evaluate(index, cases)
    per_query_ms = (time.perf_counter() - started) * 1000 / max(len(cases), 1)
    lines = [
        f"{name}: {len(cases)} questions ({scores.on_topic} on-topic, {scores.off_topic} off-topic)",
        f"  recall:            {scores.recall:.3f} ({scores.correct}/{scores.on_topic} on-topic right)",
        f"  precision:         {scores.precision:.3f} ({scores.correct}/{scores.answered} answers right)",
        f"  off-topic answered: {scores.off_topic_rate:.3f} ({scores.off_topic_answered}/{scores.off_topic})",
        f'  ties offered:      {scores.ties} ("did you mean" with two topics, not answers)',
        f"  time:              {per_query_ms:.2f} ms per question",
    ]
    if show_mistakes:
        lines += [f"    wrong: {mistake}" for mistake in scores.mistakes]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Print recall, precision, off-topic answers, speed and mistakes on the question tables."""
    parser = argparse.ArgumentParser(
        prog="python -m faq.evaluate",
        description="Score the FAQ matcher on the tuning table, the development set and the frozen "
        "held-out set.",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--cases", type=Path, help="only this Python file with QUESTION_CASES")
    which.add_argument("--heldout", action="store_true", help="only the held-out set")
    which.add_argument("--tuning", action="store_true", help="only the tuning table")
    which.add_argument("--dev", action="store_true", help="only the development set")
    parser.add_argument("--quiet", action="store_true", help="leave out the list of wrong answers")
    args = parser.parse_args(argv)
    every = not (args.tuning or args.dev or args.heldout)
    tables: list[tuple[str, Path, bool]] = []
    if args.cases is not None:
        tables.append((f"cases of {args.cases}", args.cases, False))
    else:
        if every or args.tuning:
            tables.append(("tuning table (tests/faq/test_matcher.py)", DEFAULT_CASES, False))
        if every or args.dev:
            tables.append(("development set (tests/faq/dev.toml)", DEV_CASES, True))
        if every or args.heldout:
            tables.append(("held-out set (tests/faq/heldout.toml)", HELDOUT_CASES, True))
    index = FaqIndex(load_topics([bundled_topics_dir()]).topics.values())
    for name, path, is_toml in tables:
        try:
            cases = load_heldout(path) if is_toml else load_cases(path)
        except (OSError, ImportError, AttributeError, ValueError, tomllib.TOMLDecodeError) as error:
            print(f"cannot read the questions from {path}: {error}", file=sys.stderr)
            return 2
        print("\n".join(report(name, index, cases, show_mistakes=not args.quiet)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
