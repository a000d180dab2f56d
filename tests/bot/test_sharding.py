"""The bot as shards of a sharded bot: built from the settings, answering as the unsharded one,
and its IDENTIFYs waiting for the slot they share with the bot's other processes.

The gateway is a stand-in on this machine (a websocket that records each IDENTIFY), as in
``test_runner.py``; the bots are the real ones, logging in and connecting with discord.py's own
``AutoShardedClient``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import discord
import pytest
import yarl
from aiohttp import web
from discord.gateway import DiscordWebSocket
from discord.http import Route

from bot.app import build_service, load_faq
from bot.client import RwkvBot, ShardedRwkvBot
from bot.limits import LocalLimits
from bot.runner import create_bot
from bot.settings import Settings
from engine.inprocess import ReferenceEngine
from tests.bot.harness import GENERAL, Harness

BOT_USER = {"id": "999", "username": "rwkv", "discriminator": "0", "avatar": None, "bot": True}


def discord_json(body: dict[str, Any]) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})


class ShardedGateway:
    """Discord's login routes, GET /gateway/bot with its ``max_concurrency``, and a gateway that
    records when each shard IDENTIFYs (and then stays quiet until closed)."""

    def __init__(self, max_concurrency: int) -> None:
        self.max_concurrency = max_concurrency
        self.identified: list[tuple[int, float]] = []  # (shard, time.monotonic())
        self.gateway_asked = 0
        app = web.Application()
        app.router.add_get("/api/v10/users/@me", self.users_me)
        app.router.add_get("/api/v10/oauth2/applications/@me", self.application)
        app.router.add_get("/api/v10/gateway/bot", self.gateway_bot)
        app.router.add_get("/gateway", self.gateway)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        self.port = 0

    async def users_me(self, request: web.Request) -> web.StreamResponse:
        return discord_json(BOT_USER)

    async def application(self, request: web.Request) -> web.StreamResponse:
        owner = {**BOT_USER, "id": "5", "bot": False}
        fields = {"description": "", "rpc_origins": [], "verify_key": "", "flags": 0, "icon": None}
        return discord_json(
            {
                "id": "999",
                "name": "rwkv",
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": owner,
                **fields,
            }
        )

    async def gateway_bot(self, request: web.Request) -> web.StreamResponse:
        self.gateway_asked += 1
        limit = {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": self.max_concurrency}
        return discord_json({"url": f"ws://127.0.0.1:{self.port}", "shards": 4, "session_start_limit": limit})

    async def gateway(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"op": 10, "d": {"heartbeat_interval": 45000}})
        async for message in ws:
            data = message.json()
            if data.get("op") == 2:  # IDENTIFY
                shard = data["d"].get("shard", [0, 1])[0]
                self.identified.append((shard, time.monotonic()))
        return ws

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def times(self, shard: int) -> list[float]:
        return [at for s, at in self.identified if s == shard]


@pytest.fixture
async def gateway(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ShardedGateway]:
    fake = ShardedGateway(max_concurrency=2)
    await fake.start()
    monkeypatch.setattr(Route, "BASE", f"http://127.0.0.1:{fake.port}/api/v10")
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(f"ws://127.0.0.1:{fake.port}/gateway"))
    try:
        yield fake
    finally:
        await fake.runner.cleanup()


async def build(engine: ReferenceEngine, tmp_path: Path, limits: LocalLimits, **shards: Any) -> RwkvBot:
    settings = Settings(model=Path("unused.pth"), db=tmp_path / "bot.sqlite3", token="a-token", **shards)  # type: ignore[arg-type]
    faq, _ = load_faq(settings)
    service = await build_service(settings, engine, faq)
    return await create_bot(settings, engine, service, faq, limits=limits)


async def run_until(bots: list[RwkvBot], done: Any, timeout: float = 20.0) -> None:
    """Log the bots in and connect them, until ``done()``; then close them and their services."""

    async def serve(bot: RwkvBot) -> None:
        async with bot:
            await bot.login("a-token")
            await bot.connect(reconnect=False)

    tasks = [asyncio.ensure_future(serve(bot)) for bot in bots]
    try:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "the shards did not identify in time"
            for task in tasks:
                if task.done():
                    task.result()  # a failure of the bot: raise it here
            await asyncio.sleep(0.02)
    finally:
        for bot in bots:
            await bot.close()
        await asyncio.wait(tasks, timeout=10)
        for bot in bots:
            await bot.service.close()


async def test_a_sharded_bot_is_built_from_the_settings(engine7: ReferenceEngine, tmp_path: Path) -> None:
    """With a shard count, the bot is discord.py's AutoShardedBot over this process's shards (all
    of them when none are listed); without one, the plain unsharded bot of a single process."""
    bots: list[RwkvBot] = []
    for name, shards in [
        ("some", {"shard_count": 16, "shard_ids": "0-3"}),
        ("all", {"shard_count": 3}),
        ("one", {}),
    ]:
        (tmp_path / name).mkdir()
        bots.append(await build(engine7, tmp_path / name, LocalLimits(), **shards))
    try:
        some, every, plain = bots
        assert isinstance(some, ShardedRwkvBot) and isinstance(some, discord.AutoShardedClient)
        assert some.shard_ids == [0, 1, 2, 3] and some.shard_count == 16
        assert isinstance(every, ShardedRwkvBot) and every.shard_ids == [0, 1, 2] and every.shard_count == 3
        assert not isinstance(plain, discord.AutoShardedClient) and plain.shard_count is None
    finally:
        for bot in bots:
            await bot.service.close()


@pytest.mark.parametrize("harness", [{"shard_count": 4, "shard_ids": "1,3"}], indirect=True)
async def test_a_sharded_bot_answers_as_the_unsharded_one(harness: Harness) -> None:
    """Messages of its servers are answered as by the unsharded bot: the reply is streamed and
    ends with the finished reply's buttons."""
    assert isinstance(harness.bot, discord.AutoShardedClient)
    await harness.say("-top_p=0 Hello there")
    replies = harness.http.posted_to(GENERAL)
    assert len(replies) == 1 and replies[0]["content"].strip()
    assert replies[0]["components"], "the finished reply has its buttons"


async def test_identifies_of_one_bucket_wait_for_the_shared_slot(
    gateway: ShardedGateway, engine7: ReferenceEngine, tmp_path: Path
) -> None:
    """Two processes' worth of shards (0-1 and 2-3 of 4, Discord allowing 2 IDENTIFYs at once:
    buckets {0, 2} and {1, 3}) connecting together: within a bucket, IDENTIFYs are a slot apart
    (0.5 s here, 5 s on Discord); each bot asks Discord its max_concurrency once."""
    every = 0.5
    limits = LocalLimits(identify_every=every)  # one process's limits, shared by both bots
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = await build(engine7, tmp_path / "a", limits, shard_count=4, shard_ids="0-1")
    second = await build(engine7, tmp_path / "b", limits, shard_count=4, shard_ids="2-3")
    started = time.monotonic()
    await run_until([first, second], lambda: len(gateway.identified) == 4)
    (zero,), (one,), (two,), (three,) = (gateway.times(s) for s in range(4))
    assert abs(zero - two) >= every - 0.02 and abs(one - three) >= every - 0.02
    assert min(zero, two) - started < every  # the first of a bucket does not wait
    assert gateway.gateway_asked == 2


async def test_an_unsharded_bot_identifies_at_once(
    gateway: ShardedGateway, engine7: ReferenceEngine, tmp_path: Path
) -> None:
    """The single-process bot identifies without asking for the session start limit, at once."""
    bot = await build(engine7, tmp_path, LocalLimits(identify_every=30.0))
    started = time.monotonic()
    await run_until([bot], lambda: len(gateway.identified) == 1)
    assert gateway.identified[0][1] - started < 5.0 and gateway.gateway_asked == 0
