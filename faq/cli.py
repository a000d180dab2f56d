"""`rwkv-discord faq QUERY... [--json] [--dir EXTRA_DIR]`: answer a question from the FAQ.

Exit status 0 when a topic answers the question, 1 when none does, 2 for bad arguments.
Problems found in topic folders are printed to stderr, one line each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from faq._matcher import FaqIndex
from faq._render import render_answer
from faq._topics import bundled_topics_dir, load_topics


def _parser() -> argparse.ArgumentParser:
    """The command-line grammar."""
    parser = argparse.ArgumentParser(
        prog="rwkv-discord faq", description="Answer a question from the RWKV FAQ."
    )
    parser.add_argument(
        "query", nargs="+", metavar="QUERY", help="the question or keywords (put -- before a -word)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the answer text"
    )
    parser.add_argument(
        "--dir",
        dest="dirs",
        action="append",
        type=Path,
        default=[],
        metavar="EXTRA_DIR",
        help="extra folder of topic files; overrides bundled topics of the same id (repeatable)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the FAQ command with `argv` (default: sys.argv[1:]) and return its exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    result = load_topics([bundled_topics_dir(), *args.dirs])
    for problem in result.problems:
        print(problem, file=sys.stderr)
    query = " ".join(args.query)
    index = FaqIndex(result.topics.values())
    found = index.best(query)
    if args.json:
        # Without an answer, the confidence is still that of the closest topic, to show how near
        # the question came to the threshold.
        closest = found or next(iter(index.match(query, limit=1)), None)
        payload = {
            "topic": found.topic.id if found else None,
            "title": found.topic.title if found else None,
            "confidence": closest.confidence if closest else 0.0,
            "answer": render_answer(found.topic) if found else None,
        }
        print(json.dumps(payload, ensure_ascii=False))
    elif found is not None:
        print(render_answer(found.topic))
    else:
        print(f"No FAQ entry matches {query!r}.")
    return 0 if found is not None else 1


if __name__ == "__main__":
    sys.exit(main())
