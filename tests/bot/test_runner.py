"""Starting the Discord bot against a stand-in for Discord on this machine: a wrong token, a
missing Message Content intent, Discord unreachable, and a SIGTERM during the login.

The bot is the real one (``run_bot`` with a real model file and database); only Discord is
replaced, by a local HTTP server that answers its REST routes and a websocket that plays the
gateway, since the real gateway cannot be reached from here.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yarl
from aiohttp import web
from discord.gateway import DiscordWebSocket
from discord.http import Route

from bot import runner
from bot.runner import run_bot
from bot.settings import ConfigError, Settings

BOT_USER = {"id": "999", "username": "rwkv", "discriminator": "0", "avatar": None, "bot": True}
APPLICATION = {
    "id": "999",
    "name": "rwkv",
    "icon": None,
    "description": "",
    "rpc_origins": [],
    "bot_public": True,
    "bot_require_code_grant": False,
    "owner": {**BOT_USER, "id": "5", "bot": False},
    "verify_key": "",
    "flags": 0,
}


def discord_json(body: dict[str, Any], status: int = 200) -> web.Response:
    """JSON with Discord's exact content type (discord.py compares it as a whole)."""
    return web.Response(
        body=json.dumps(body).encode(), status=status, headers={"Content-Type": "application/json"}
    )


class FakeDiscord:
    """Discord's REST login route and gateway, with the answers a test chooses."""

    def __init__(self) -> None:
        self.login_status = 200
        self.login_delay = 0.0
        self.logins = 0
        self.login_seen = asyncio.Event()
        self.intents_missing = True
        self.identified = asyncio.Event()
        app = web.Application()
        app.router.add_get("/api/v10/users/@me", self.users_me)
        app.router.add_get("/api/v10/oauth2/applications/@me", self.application)
        app.router.add_get("/gateway", self.gateway)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        self.port = 0

    async def users_me(self, request: web.Request) -> web.StreamResponse:
        self.logins += 1
        self.login_seen.set()
        await asyncio.sleep(self.login_delay)
        if self.login_status != 200:
            return discord_json({"message": "401: Unauthorized", "code": 0}, status=self.login_status)
        return discord_json(BOT_USER)

    async def application(self, request: web.Request) -> web.StreamResponse:
        return discord_json(APPLICATION)

    async def gateway(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"op": 10, "d": {"heartbeat_interval": 45000}})
        async for message in ws:
            if message.json().get("op") == 2:  # IDENTIFY
                self.identified.set()
                if self.intents_missing:
                    await ws.close(code=4014, message=b"Disallowed intent(s).")
                break
        return ws

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        await self.runner.cleanup()


@pytest.fixture
async def discord_here(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    fake = FakeDiscord()
    await fake.start()
    monkeypatch.setattr(Route, "BASE", f"http://127.0.0.1:{fake.port}/api/v10")
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(f"ws://127.0.0.1:{fake.port}/gateway"))
    try:
        yield fake
    finally:
        await fake.stop()


def bot_settings(model_dir: Path, tmp_path: Path) -> Settings:
    return Settings(model=model_dir / "v7.pth", db=tmp_path / "bot.sqlite3", token="a-token")  # type: ignore[arg-type]


async def sigterm_when(ready: Callable[[], Any]) -> None:
    """Send this process a SIGTERM (as ``docker stop`` does) once ``ready()`` is true."""
    while not ready():
        await asyncio.sleep(0.02)
    os.kill(os.getpid(), signal.SIGTERM)


async def test_a_wrong_token_is_one_configuration_line(
    discord_here: FakeDiscord, model_dir: Path, tmp_path: Path
) -> None:
    """Discord refusing the token ends the bot with one line naming RWKV_DISCORD_TOKEN."""
    discord_here.login_status = 401
    with pytest.raises(ConfigError) as info:
        await run_bot(bot_settings(model_dir, tmp_path))
    assert "RWKV_DISCORD_TOKEN is wrong" in str(info.value) and "\n" not in str(info.value)
    assert discord_here.logins == 1  # refused for good: not tried again


async def test_a_missing_message_content_intent_is_one_configuration_line(
    discord_here: FakeDiscord, model_dir: Path, tmp_path: Path
) -> None:
    """The gateway closing with 4014 (privileged intent not enabled) says which switch to turn on."""
    with pytest.raises(ConfigError) as info:
        await asyncio.wait_for(run_bot(bot_settings(model_dir, tmp_path)), timeout=120)
    assert discord_here.identified.is_set()
    assert "Message Content Intent" in str(info.value) and "developer portal" in str(info.value)


async def test_discord_unreachable_is_tried_again_until_sigterm(
    monkeypatch: pytest.MonkeyPatch, model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With nothing listening where Discord should be, the login is tried again with a pause
    (one log line each), and a SIGTERM then ends the bot cleanly with 0."""
    monkeypatch.setattr(runner, "LOGIN_RETRY_FIRST", 0.05)
    monkeypatch.setattr(Route, "BASE", "http://127.0.0.1:9/api/v10")  # the discard port: refused
    caplog.set_level("WARNING", logger="bot.runner")

    def retried() -> bool:
        return sum("cannot be reached" in r.getMessage() for r in caplog.records) >= 2

    stopper = asyncio.ensure_future(sigterm_when(retried))
    assert await asyncio.wait_for(run_bot(bot_settings(model_dir, tmp_path)), timeout=120) == 0
    await stopper


async def test_sigterm_during_the_login_exits_cleanly(
    discord_here: FakeDiscord, model_dir: Path, tmp_path: Path
) -> None:
    """A SIGTERM while the login request is in flight ends the bot with 0, not a traceback."""
    discord_here.login_delay = 60.0
    stopper = asyncio.ensure_future(sigterm_when(discord_here.login_seen.is_set))
    assert await asyncio.wait_for(run_bot(bot_settings(model_dir, tmp_path)), timeout=60) == 0
    await stopper
    assert not discord_here.identified.is_set()  # the gateway was never reached
