"""One process of the Discord tier, for the cluster test of the shared limits: it joins the Ray
cluster through the bot's own settings, waits until its peers have joined, then IDENTIFYs a
shard while it streams replies through the shared REST budget, and prints what it did as JSON.

``python -m tests.bot.limits_worker ADDRESS SHARD READY_DIR PEERS``
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from bot.limits import Limits
from bot.runner import open_limits
from bot.settings import Settings

RATE = 10  # the shared budget: requests a second over every process
STREAMS = 20  # replies streaming at once in this process
STREAMING = 2.0  # seconds each reply asks for an edit every 0.1 s before its final text


async def stream(limits: Limits, writes: list[tuple[str, float]]) -> None:
    started = time.monotonic()
    while time.monotonic() - started < STREAMING:
        if await limits.try_take():
            writes.append(("edit", time.time()))
        await asyncio.sleep(0.1)
    await limits.take()
    writes.append(("final", time.time()))


async def main(address: str, shard: int, ready: Path, peers: int) -> None:
    limits = open_limits(Settings(cluster=address, token="one-bot-token", rest_rate=RATE))  # type: ignore[arg-type]
    (ready / str(shard)).touch()
    while len(list(ready.iterdir())) < peers:
        await asyncio.sleep(0.05)
    writes: list[tuple[str, float]] = []
    identified: list[float] = []

    async def identify() -> None:
        await limits.identify(shard, 2)
        identified.append(time.time())

    await asyncio.gather(identify(), *(stream(limits, writes) for _ in range(STREAMS)))
    print(json.dumps({"shard": shard, "identified": identified[0], "writes": writes}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])))
