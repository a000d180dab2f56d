"""The Discord front end, offline: the real bot object on a real chat service, real discord.py
objects built from gateway payloads, and a recording HTTP layer that checks Discord's limits.

The harness uses discord.py internals (the connection state, the HTTP client and the webhook
adapter); it lives in this one module and the project pins discord.py to a minor version. The
``harness`` fixture is offered to every test module of this folder by its conftest.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import pytest
from discord.http import HTTPClient, Route
from discord.webhook.async_ import AsyncWebhookAdapter, async_context

from bot.app import build_service, load_faq
from bot.checks import Refused
from bot.client import RwkvBot
from bot.replies import STOP_EMOJI
from bot.runner import create_bot
from bot.settings import Settings
from engine.inprocess import ReferenceEngine

GUILD, GENERAL, QUIET, THREAD = 100, 300, 301, 400
BOT_ID, ALICE, MOD, ADMIN, TALKER = 999, 1, 2, 3, 4
MOD_ROLE, ADMIN_ROLE, BOT_ROLE, TALKER_ROLE = 200, 201, 202, 203
MANAGE_MESSAGES = 1 << 13
MANAGE_GUILD = 1 << 5
ROLES = {MOD: [str(MOD_ROLE)], ADMIN: [str(ADMIN_ROLE)], TALKER: [str(TALKER_ROLE)]}
NAMES = {ALICE: "alice", MOD: "mod", ADMIN: "admin", TALKER: "talker"}
EVERYONE_PERMS = (1 << 10) | (1 << 11) | (1 << 16) | (1 << 6)  # view, send, read history, react
_ids = itertools.count(10_000)


def user(uid: int, name: str, bot: bool = False) -> dict[str, Any]:
    return {
        "id": str(uid),
        "username": name,
        "discriminator": "0",
        "avatar": None,
        "global_name": name,
        "bot": bot,
    }


def message_payload(channel: int, author: dict[str, Any], content: str, **extra: Any) -> dict[str, Any]:
    """A MESSAGE_CREATE-shaped message object, as Discord returns and the gateway sends it."""
    return {
        "id": str(next(_ids)),
        "channel_id": str(channel),
        "author": author,
        "content": content,
        "timestamp": "2026-01-01T00:00:00+00:00",
        "edited_timestamp": None,
        "tts": False,
        "mention_everyone": False,
        "mentions": [],
        "mention_roles": [],
        "attachments": [],
        "embeds": [],
        "pinned": False,
        "type": 0,
        **extra,
    }


@dataclass(frozen=True)
class RoleOption:
    """A role given as a slash-command option (sent with the role's data, as Discord does)."""

    id: int


class FakeClock:
    """Time that moves only when a test says so (for the edit throttle)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 0.2  # every look at the clock lets a little time pass
        return self.now

    async def sleep(self, seconds: float) -> None:
        """A pause of the bot's (waiting for its turn to edit) passes on this clock at once."""
        self.now += seconds
        await asyncio.sleep(0)


class RecordingHTTP(HTTPClient):
    """Answers the REST calls the bot makes, records them, and enforces Discord's limits."""

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: FakeClock) -> None:
        super().__init__(loop)
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.times: list[float] = []  # when each call came, on the real clock (time.monotonic)
        self.messages: dict[int, dict[str, Any]] = {}
        self.edit_times: dict[int, list[float]] = {}
        self.clock = clock

    async def request(self, route: Route, *, files: Any = None, form: Any = None, **kwargs: Any) -> Any:
        payload = kwargs.get("json") or {}
        self.calls.append((route.method, route.path, payload))
        self.times.append(time.monotonic())
        content = payload.get("content")
        if content is not None:
            assert len(content) <= 2000, f"Discord would refuse {len(content)} characters"
            assert payload.get("allowed_mentions", {}).get("parse") == [], "mentions must stay off"
        if route.method == "POST" and route.path == "/channels/{channel_id}/messages":
            message = message_payload(
                int(route.channel_id or 0),
                user(BOT_ID, "rwkv", True),
                content or "",
                embeds=payload.get("embeds", []),
                components=payload.get("components", []),
            )
            self.messages[int(message["id"])] = message
            return message
        if route.method == "PATCH" and route.path == "/channels/{channel_id}/messages/{message_id}":
            message_id = int(route.url.rsplit("/", 1)[1])
            times = self.edit_times.setdefault(route.channel_id, [])
            times.append(self.clock.now)
            recent = [t for t in times if t > self.clock.now - 5.0]
            assert len(recent) <= 5, "more than 5 edits in 5 seconds in one channel"
            changed = {k: payload[k] for k in ("content", "components") if k in payload}
            self.messages[message_id] = {**self.messages[message_id], **changed}
            return self.messages[message_id]
        return None

    def sent(self) -> list[str]:
        """Contents of the messages the bot created, in order."""
        return [
            p.get("content") or ""
            for m, path, p in self.calls
            if m == "POST" and path == "/channels/{channel_id}/messages"
        ]

    def posted_to(self, channel: int) -> list[dict[str, Any]]:
        return [m for m in self.messages.values() if m["channel_id"] == str(channel)]


class RecordingAdapter(AsyncWebhookAdapter):
    """Records interaction responses and follow-ups."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    async def request(
        self, route: Route, session: Any, *, payload: dict[str, Any] | None = None, **kwargs: Any
    ) -> Any:
        body = payload or {}
        self.calls.append((route.method, route.path, body))
        data = body.get("data") if isinstance(body.get("data"), dict) else body
        if data and data.get("content") is not None:
            assert len(data["content"]) <= 2000
        if route.path.endswith("/callback"):
            return {"interaction": {"id": str(route.webhook_id), "type": 2}}
        if route.method == "POST" and "webhooks" in route.path:
            return message_payload(
                GENERAL,
                user(BOT_ID, "rwkv", True),
                body.get("content", ""),
                embeds=body.get("embeds", []),
                flags=body.get("flags", 0),
            )
        return None

    def texts(self) -> list[str]:
        out = []
        for _, _, body in self.calls:
            data = body.get("data") if isinstance(body.get("data"), dict) else body
            if data and data.get("content"):
                out.append(data["content"])
        return out


LONG_REPLY_SEED = 1


def long_replies(harness: Harness) -> None:
    """Let chat replies run long (random models never end a turn by themselves)."""
    service = harness.bot.service
    service.config = service.config.__class__(**{**service.config.__dict__, "chat_max_tokens": 900})
    service._seeds = random.Random(LONG_REPLY_SEED)  # a sampled reply that runs long, every time


async def start_long_reply(harness: Harness, text: str, **options: Any) -> asyncio.Future[None]:
    """Send a message that gets a long sampled reply; return once its first text is on Discord."""
    long_replies(harness)
    task = asyncio.ensure_future(harness.say(f"-top_p=1 -temp=3 {text}", **options))
    while not harness.bot.by_reply:
        await asyncio.sleep(0.01)
    return task


async def react(
    harness: Harness, message_id: int, user_id: int, channel: int, member_roles: list[str] | None = None
) -> None:
    """A stop reaction, as the gateway's MESSAGE_REACTION_ADD delivers it."""
    data: dict[str, Any] = {
        "message_id": str(message_id),
        "channel_id": str(channel),
        "user_id": str(user_id),
        "guild_id": str(GUILD),
        "type": 0,
        "burst": False,
    }
    event = discord.RawReactionActionEvent(
        data=data,
        emoji=discord.PartialEmoji(name=STOP_EMOJI),  # type: ignore[arg-type]
        event_type="REACTION_ADD",
    )
    guild = harness.state._get_guild(GUILD)
    if member_roles is not None and guild is not None:
        event.member = discord.Member(
            data={
                "user": user(user_id, f"u{user_id}"),
                "roles": member_roles,
                "flags": 0,  # type: ignore[typeddict-item]
                "joined_at": "2025-01-01T00:00:00+00:00",
                "deaf": False,
                "mute": False,
            },
            guild=guild,
            state=harness.state,
        )
    await harness.bot.on_raw_reaction_add(event)


class Harness:
    """A bot wired to the recording layers, a server with #general (enabled), #quiet and a thread."""

    def __init__(
        self, bot: RwkvBot, http: RecordingHTTP, adapter: RecordingAdapter, clock: FakeClock
    ) -> None:
        self.bot, self.http, self.adapter, self.clock = bot, http, adapter, clock
        self.state = bot._connection
        self.errors: list[BaseException] = []

    def message(
        self,
        content: str,
        *,
        author: int = ALICE,
        channel: int = GENERAL,
        mentions: list[int] | None = None,
        guild: bool = True,
    ) -> discord.Message:
        name = NAMES.get(author, f"user{author}")
        mentioned = [user(m, "rwkv" if m == BOT_ID else f"u{m}", m == BOT_ID) for m in mentions or []]
        data = message_payload(channel, user(author, name), content, mentions=mentioned)
        if guild:
            data["guild_id"] = str(GUILD)
            data["member"] = {
                "roles": ROLES.get(author, []),
                "joined_at": "2025-01-01T00:00:00+00:00",
                "deaf": False,
                "mute": False,
                "flags": 0,
            }
            target = self.state._get_guild(GUILD).get_channel_or_thread(channel)  # type: ignore[union-attr]
        else:
            target = self.state._get_private_channel(channel) or discord.DMChannel(
                me=self.bot.user,
                state=self.state,  # type: ignore[arg-type]
                data={"id": str(channel), "type": 1, "recipients": [user(author, name)]},  # type: ignore[typeddict-item]
            )
        return discord.Message(state=self.state, channel=target, data=data)  # type: ignore[arg-type]

    async def say(self, content: str, **options: Any) -> None:
        await self.bot.on_message(self.message(content, **options))

    async def press(
        self, custom_id: str, message_id: int, *, author: int = ALICE, channel: int = GENERAL
    ) -> None:
        """Press a button of one of the bot's messages, as the gateway's INTERACTION_CREATE
        (type 3, a component) delivers it, and wait for the bot's handling."""
        perms = EVERYONE_PERMS | (MANAGE_MESSAGES if author in (MOD, ADMIN) else 0)
        data = {
            **self._interaction_base(author, channel, perms),
            "type": 3,
            "message": self.http.messages[message_id],
            "data": {"component_type": 2, "custom_id": custom_id},
        }
        self.state.parse_interaction_create(data)  # type: ignore[arg-type]
        pending = [t for t in asyncio.all_tasks() if t.get_name().startswith("discord-ui-dynamic-item")]
        await asyncio.gather(*pending)

    async def restart(self) -> None:
        """Close the bot and start a new bot object on the same chat service and database (the
        messages Discord holds are kept), as a restart of the process would."""
        old = self.bot
        await old.close()
        self.bot = await create_bot(
            old.settings, old.engine, old.service, old.faq, clock=self.clock, sleep=self.clock.sleep
        )
        messages = self.http.messages
        self.http = await connect(self.bot, self.clock)
        self.http.messages.update(messages)
        self.state = self.bot._connection

    def _interaction_base(self, author: int, channel: int, perms: int) -> dict[str, Any]:
        return {
            "id": str(next(_ids)),
            "application_id": str(BOT_ID),
            "token": "tok",
            "version": 1,
            "guild_id": str(GUILD),
            "channel_id": str(channel),
            "channel": {
                "id": str(channel),
                "type": 0,
                "guild_id": str(GUILD),
                "name": "general",
                "position": 0,
            },
            "member": {
                "user": user(author, NAMES.get(author, f"user{author}")),
                "roles": ROLES.get(author, []),
                "permissions": str(perms),
                "joined_at": "2025-01-01T00:00:00+00:00",
                "deaf": False,
                "mute": False,
                "flags": 0,
            },
            "app_permissions": str(EVERYONE_PERMS),
            "locale": "en-US",
            "guild_locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {},
            "context": 0,
            "attachment_size_limit": 8_000_000,
        }

    async def settle(self) -> None:
        """Wait for the small background calls (reminders, refusals) to reach the recorder."""
        if self.bot._side_tasks:
            await asyncio.wait(set(self.bot._side_tasks), timeout=5)

    async def slash(
        self,
        name: str,
        sub: str | None = None,
        *,
        author: int = ALICE,
        channel: int = GENERAL,
        **options: Any,
    ) -> None:
        perms = EVERYONE_PERMS | (MANAGE_MESSAGES if author in (MOD, ADMIN) else 0)
        perms |= MANAGE_GUILD if author == ADMIN else 0
        resolved = {
            str(v.id): next(r for r in guild_payload()["roles"] if r["id"] == str(v.id))
            for v in options.values()
            if isinstance(v, RoleOption)
        }
        typed = [
            {"name": k, "type": 8, "value": str(v.id)}
            if isinstance(v, RoleOption)
            else {
                "name": k,
                "type": 5
                if isinstance(v, bool)
                else 10
                if isinstance(v, float)
                else 4
                if isinstance(v, int)
                else 3,
                "value": v,
            }
            for k, v in options.items()
        ]
        command_options = [{"name": sub, "type": 1, "options": typed}] if sub else typed
        data = {
            **self._interaction_base(author, channel, perms),
            "type": 2,
            "data": {
                "id": "1",
                "name": name,
                "type": 1,
                "options": command_options,
                "resolved": {"roles": resolved},
            },
        }
        interaction = discord.Interaction(data=data, state=self.state)  # type: ignore[arg-type]
        await self.bot.tree._call(interaction)


def guild_payload() -> dict[str, Any]:
    role = {"hoist": False, "managed": False, "mentionable": False, "flags": 0, "color": 0}
    channel = {"type": 0, "guild_id": str(GUILD), "permission_overwrites": [], "nsfw": False}
    member = {"roles": [], "joined_at": "2025-01-01T00:00:00+00:00", "deaf": False, "mute": False, "flags": 0}
    return {
        "id": str(GUILD),
        "name": "RWKV fans",
        "owner_id": "5",
        "afk_timeout": 300,
        "verification_level": 0,
        "default_message_notifications": 0,
        "explicit_content_filter": 0,
        "features": [],
        "mfa_level": 0,
        "emojis": [],
        "stickers": [],
        "premium_tier": 0,
        "member_count": 3,
        "large": False,
        "roles": [
            {
                **role,
                "id": str(GUILD),
                "name": "@everyone",
                "permissions": str(EVERYONE_PERMS),
                "position": 0,
            },
            {**role, "id": str(MOD_ROLE), "name": "mods", "permissions": str(MANAGE_MESSAGES), "position": 1},
            {**role, "id": str(TALKER_ROLE), "name": "talkers", "permissions": "0", "position": 1},
            {  # the bot's own managed role, which Discord creates when it joins
                **role,
                "id": str(BOT_ROLE),
                "name": "rwkv",
                "managed": True,
                "tags": {"bot_id": str(BOT_ID)},
                "permissions": "0",
                "position": 1,
            },
            {
                **role,
                "id": str(ADMIN_ROLE),
                "name": "admins",
                "permissions": str(MANAGE_MESSAGES | MANAGE_GUILD),
                "position": 2,
            },
        ],
        "channels": [
            {**channel, "id": str(GENERAL), "name": "general", "position": 0},
            {**channel, "id": str(QUIET), "name": "quiet", "position": 1},
        ],
        "threads": [
            {
                "id": str(THREAD),
                "type": 11,
                "parent_id": str(GENERAL),
                "name": "a thread",
                "guild_id": str(GUILD),
                "owner_id": str(ALICE),
                "member_count": 1,
                "message_count": 1,
                "thread_metadata": {
                    "archived": False,
                    "auto_archive_duration": 60,
                    "locked": False,
                    "archive_timestamp": "2026-01-01T00:00:00+00:00",
                },
            }
        ],
        "members": [
            {**member, "user": user(BOT_ID, "rwkv", True)},
            {**member, "user": user(ALICE, "alice")},
            {**member, "user": user(MOD, "mod"), "roles": [str(MOD_ROLE)]},
            {**member, "user": user(ADMIN, "admin"), "roles": [str(ADMIN_ROLE)]},
        ],
    }


async def connect(bot: RwkvBot, clock: FakeClock) -> RecordingHTTP:
    """Wire a new bot to a recording HTTP layer and run its set-up as a connection would."""
    http = RecordingHTTP(asyncio.get_running_loop(), clock)
    bot.http = http
    bot._connection.http = http
    await bot._async_setup_hook()
    await bot.setup_hook()
    state = bot._connection
    state.user = discord.ClientUser(state=state, data=user(BOT_ID, "rwkv", True))  # type: ignore[arg-type]
    state.application_id = BOT_ID
    state._add_guild_from_data(guild_payload())  # type: ignore[arg-type]
    return http


@pytest.fixture
async def harness(
    engine7: ReferenceEngine, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Harness]:
    """A set-up bot (setup_hook run) with #general enabled by a moderator. Indirect
    parametrization gives settings of its own (e.g. ``{"shard_count": 2}``)."""
    settings = Settings(
        model=Path("unused.pth"),
        db=tmp_path / "bot.sqlite3",
        token=None,
        chat_max_tokens=40,
        gen_max_tokens=20,
        user_cooldown=0,
        allow_dms=True,
        max_queue=1,
        **getattr(request, "param", {}),
    )
    clock = FakeClock()
    faq, _ = load_faq(settings)
    service = await build_service(settings, engine7, faq)
    bot = await create_bot(settings, engine7, service, faq, clock=clock, sleep=clock.sleep)
    adapter = RecordingAdapter()
    token = async_context.set(adapter)
    http = await connect(bot, clock)
    h = Harness(bot, http, adapter, clock)
    answer = bot.tree.on_error

    async def record(interaction: discord.Interaction, error: discord.app_commands.AppCommandError) -> None:
        """Every error but a refusal is recorded (a test that expects one takes it out), then
        answered as the bot's own handler does."""
        if not isinstance(error, Refused):
            h.errors.append(error)
        await answer(interaction, error)

    bot.tree.error(record)
    await h.slash("rwkv-mod", "enable", author=MOD)
    http.calls.clear()  # tests start after the enabling (its public notice is tested on its own)
    http.messages.clear()
    try:
        yield h
    finally:
        await h.bot.close()
        await service.close()
        async_context.reset(token)
        assert h.errors == [], h.errors


class FakeResponse:
    """The little of aiohttp's response that discord.HTTPException reads."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.reason = "Forbidden"


async def wait_for(condition: Any, timeout: float = 5.0) -> None:
    """Let dispatched event handlers (tasks) run until ``condition()`` holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "the event was not handled in time"
        await asyncio.sleep(0.01)
