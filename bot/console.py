"""The terminal chat: the same session logic and database as the Discord bot, on stdin/stdout."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import TextIO

from chat.session import ChatService, Outcome
from engine.interface import TextDelta


async def _lines(stream: TextIO, prompt: str | None) -> list[str] | None:
    if prompt:
        sys.stderr.write(prompt)
        sys.stderr.flush()
    line = await asyncio.to_thread(stream.readline)
    return None if line == "" else [line.rstrip("\n")]


async def run_console(
    service: ChatService,
    channel: str,
    jsonl: bool,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
) -> int:
    """Read one message per line until end of input; answer each. Returns the exit status."""
    interactive = stdin.isatty() and not jsonl
    if interactive:
        sys.stderr.write(f"{service.engine.describe()} - channel {channel!r} - +help for commands\n")
    while True:
        got = await _lines(stdin, "> " if interactive else None)
        if got is None:
            return 0
        message = got[0]
        if jsonl:
            outcome = await service.respond(channel, message)
            stdout.write(json.dumps(outcome.as_json(), ensure_ascii=False) + "\n")
            stdout.flush()
            continue
        streamed = False
        async for event in service.handle(channel, message):
            if isinstance(event, TextDelta):
                stdout.write(event.text)
                stdout.flush()
                streamed = True
            else:
                _print_outcome(event, streamed, stdout)


def _print_outcome(outcome: Outcome, streamed: bool, stdout: TextIO) -> None:
    for notice in outcome.notices:
        sys.stderr.write(f"[{notice}]\n")
    if streamed:
        stdout.write("\n" if outcome.kind == "reply" else "\n\n")
    else:
        stdout.write(outcome.text + "\n")
    stdout.flush()
