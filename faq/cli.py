"""`rwkv-discord faq QUERY... [--json] [--dir EXTRA_DIR]`: answer a question from the FAQ.

Without an answer it names the closest topics, or the two topics that tie ("did you mean").
`rwkv-discord faq --list` lists the topics. Exit status 0 when a topic answers the question (or
for `--list`), 1 when none does, 2 for bad arguments. Problems found in topic folders are printed
to stderr, one line each. Nothing here imports torch or the bot, so it answers at once.
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
        "query", nargs="*", metavar="QUERY", help="the question or keywords (put -- before a -word)"
    )
    parser.add_argument("--list", action="store_true", help="list the topics (id and title)")
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
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if not args.query and not args.list:
            parser.error("give a QUERY, or --list")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    result = load_topics([bundled_topics_dir(), *args.dirs])
    for problem in result.problems:
        print(problem, file=sys.stderr)
    index = FaqIndex(result.topics.values())
    if args.list:
        return _list(index, as_json=args.json)
    query = " ".join(args.query)
    found = index.lookup(query)
    answer = found.answer
    if args.json:
        # Without an answer, the confidence is still that of the closest topic, to show how near
        # the question came to the threshold.
        closest = answer or next(iter(index.match(query, limit=1)), None)
        payload = {
            "topic": answer.topic.id if answer else None,
            "title": answer.topic.title if answer else None,
            "confidence": closest.confidence if closest else 0.0,
            "answer": render_answer(answer.topic) if answer else None,
            "tied": found.tied,
            "suggestions": [
                {"topic": m.topic.id, "title": m.topic.title, "confidence": m.confidence}
                for m in found.candidates
            ],
        }
        print(json.dumps(payload, ensure_ascii=False))
    elif answer is not None:
        print(render_answer(answer.topic))
    else:
        print(f"No FAQ entry matches {query!r}.")
        if found.candidates:
            print("Did you mean one of these?" if found.tied else "Closest topics:")
            for candidate in found.candidates:
                print(f"- {candidate.topic.title} ({candidate.topic.id})")
    return 0 if answer is not None else 1


def _list(index: FaqIndex, *, as_json: bool) -> int:
    """Print the topics in title order, as lines or as one JSON array."""
    if as_json:
        print(json.dumps([{"topic": t.id, "title": t.title} for t in index.topics], ensure_ascii=False))
    else:
        for topic in index.topics:
            print(f"{topic.id}: {topic.title}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
