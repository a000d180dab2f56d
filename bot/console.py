"""The terminal chat: the same session logic and database as the Discord bot, on stdin/stdout."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from typing import TextIO

from chat.outcome import Outcome, OutcomeKind
from chat.session import ChatService
from engine.interface import TextDelta


class _LineReader:
    """Lines of input, read by a daemon thread so that a stop never waits for the next line.

    Bytes that are not valid in the input's encoding become U+FFFD instead of ending the chat
    (a strict UTF-8 desktop locale would otherwise stop at the first stray byte).
    """

    def __init__(self, stream: TextIO, loop: asyncio.AbstractEventLoop) -> None:
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._loop = loop
        self._stream = stream
        threading.Thread(target=self._read, name="stdin", daemon=True).start()

    def _read(self) -> None:
        raw = getattr(self._stream, "buffer", None)
        encoding = getattr(self._stream, "encoding", None) or "utf-8"
        try:
            while True:
                if raw is not None:
                    data = raw.readline()
                    line = data.decode(encoding, errors="replace") if data else ""
                else:
                    line = self._stream.readline()
                if line == "":
                    break
                self._loop.call_soon_threadsafe(self._lines.put_nowait, line.rstrip("\r\n"))
        except (OSError, ValueError):  # the input was closed under us
            pass
        self._loop.call_soon_threadsafe(self._lines.put_nowait, None)

    async def next(self) -> str | None:
        """The next line, or None at the end of the input."""
        return await self._lines.get()


async def run_console(
    service: ChatService,
    channel: str,
    jsonl: bool,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    *,
    stop: asyncio.Event | None = None,
) -> int:
    """Read one message per line until end of input (or ``stop``); answer each. Returns 0.

    Setting ``stop`` (SIGTERM) cuts the reply being written, which is stored as far as it got,
    and ends the chat without waiting for more input.
    """
    stop = stop or asyncio.Event()
    if hasattr(stdout, "reconfigure"):
        stdout.reconfigure(errors="replace")  # a terminal that cannot show a character gets "?"
    interactive = stdin.isatty() and not jsonl
    if interactive:
        sys.stderr.write(f"{service.engine.describe()} - channel {channel!r} - +help for commands\n")
    reader = _LineReader(stdin, asyncio.get_running_loop())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            if interactive:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = asyncio.ensure_future(reader.next())
            await asyncio.wait({line, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not line.done():
                line.cancel()
                break
            message = line.result()
            if message is None:
                break
            await _answer(service, channel, message, jsonl=jsonl, stdout=stdout, stop=stop)
    finally:
        stopped.cancel()
    return 0


async def _answer(
    service: ChatService, channel: str, message: str, *, jsonl: bool, stdout: TextIO, stop: asyncio.Event
) -> None:
    cancel = threading.Event()
    watcher = asyncio.ensure_future(stop.wait())
    watcher.add_done_callback(lambda _: cancel.set())
    streamed = False
    try:
        async for event in service.handle(channel, message, cancel=cancel):
            if isinstance(event, TextDelta):
                if not jsonl:
                    stdout.write(event.text)
                    stdout.flush()
                    streamed = True
            elif jsonl:
                stdout.write(json.dumps(event.as_json(), ensure_ascii=False) + "\n")
                stdout.flush()
            else:
                _print_outcome(event, streamed, stdout)
    finally:
        watcher.cancel()


def _print_outcome(outcome: Outcome, streamed: bool, stdout: TextIO) -> None:
    for notice in outcome.notices:
        sys.stderr.write(f"[{notice}]\n")
    if streamed:
        stdout.write("\n" if outcome.kind is OutcomeKind.REPLY else "\n\n")
    else:
        stdout.write(outcome.text + "\n")
    stdout.flush()
