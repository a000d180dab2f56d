"""A scripted conversation in many channels, resumable: the program the kill test kills.

Run as ``python tests/scripted_channels.py MODEL DB CHANNELS ROUNDS``, with the settings in the
environment (``RWKV_DISCORD_*``). It goes round the channels in order; each round sends every
channel its next scripted message, unless the channel's transcript shows it was answered before
(by an earlier run that was killed). After each answered message it prints one JSON line
``{"channel", "round", "text"}`` and flushes, so whoever reads the output knows what was answered
before a kill; at the end it prints ``DONE``. Replies are greedy (``top_p`` 0 for every channel).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

# Every message makes exactly one transcript line, so a channel's transcript length is the number
# of its messages answered so far.
SCRIPT = (
    "Hello from channel {c}",
    "+",
    "+gen Once upon a time in channel {c}",
    "++",
    "+++",
    "What happened next in {c}?",
    "+reset",
    "A fresh start for {c}",
    "+qa What is RWKV?",
    "And one more thing, {c}",
    "+",
    "Tell me a long story about {c} and the river",
)


def message(channel: int, index: int) -> str:
    """The scripted message number ``index`` of a channel."""
    return SCRIPT[index % len(SCRIPT)].format(c=channel)


async def run(model: Path, db: Path, channels: int, rounds: int) -> None:
    from bot.app import open_chat
    from bot.settings import load_settings
    from chat.session import ChatService

    settings = load_settings(model=model, db=db)
    service: ChatService
    async with open_chat(settings) as service:
        for channel in range(channels):
            await service.update_settings(str(channel), top_p=0.0)
        for index in range(rounds):
            for channel in range(channels):
                name = str(channel)
                if len(await service.store.transcripts.turns(name)) > index:
                    continue  # answered before the last kill
                outcome = await service.respond(name, message(channel, index))
                line = {"channel": name, "round": index, "kind": outcome.kind, "text": outcome.text}
                print(json.dumps(line), flush=True)
    print("DONE", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    asyncio.run(run(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
