"""The Discord front end, offline: the real bot object, real discord.py objects built from
gateway payloads, and a recording HTTP layer that checks Discord's limits.

The harness uses discord.py internals (the connection state, the HTTP client and the webhook
adapter); it lives in this one module and the project pins discord.py to a minor version.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import discord
import pytest
from discord.http import HTTPClient, Route
from discord.webhook.async_ import AsyncWebhookAdapter, async_context

from bot.client import STOP_EMOJI, RwkvBot, create_bot
from bot.settings import Settings
from bot.streaming import ChannelPacer, ReplyStream, render_thinking
from chat.store import StoreError
from engine.inprocess import ReferenceEngine

GUILD, GENERAL, QUIET, THREAD = 100, 300, 301, 400
BOT_ID, ALICE, MOD, ADMIN = 999, 1, 2, 3
MOD_ROLE, ADMIN_ROLE = 200, 201
MANAGE_MESSAGES = 1 << 13
MANAGE_GUILD = 1 << 5
ROLES = {MOD: [str(MOD_ROLE)], ADMIN: [str(ADMIN_ROLE)]}
NAMES = {ALICE: "alice", MOD: "mod", ADMIN: "admin"}
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
        self.messages: dict[int, dict[str, Any]] = {}
        self.edit_times: dict[int, list[float]] = {}
        self.clock = clock

    async def request(self, route: Route, *, files: Any = None, form: Any = None, **kwargs: Any) -> Any:
        payload = kwargs.get("json") or {}
        self.calls.append((route.method, route.path, payload))
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
            )
            self.messages[int(message["id"])] = message
            return message
        if route.method == "PATCH" and route.path == "/channels/{channel_id}/messages/{message_id}":
            message_id = int(route.url.rsplit("/", 1)[1])
            times = self.edit_times.setdefault(route.channel_id, [])
            times.append(self.clock.now)
            recent = [t for t in times if t > self.clock.now - 5.0]
            assert len(recent) <= 5, "more than 5 edits in 5 seconds in one channel"
            self.messages[message_id] = {**self.messages[message_id], "content": content}
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
    assert service is not None
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
        typed = [
            {
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
            "id": str(next(_ids)),
            "application_id": str(BOT_ID),
            "type": 2,
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
            "data": {"id": "1", "name": name, "type": 1, "options": command_options},
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


@pytest.fixture
async def harness(engine7: ReferenceEngine, tmp_path: Path) -> AsyncIterator[Harness]:
    """A set-up bot (setup_hook run) with #general enabled by a moderator."""
    settings = Settings(
        model=Path("unused.pth"),
        db=tmp_path / "bot.sqlite3",
        token=None,
        chat_max_tokens=40,
        gen_max_tokens=20,
        user_cooldown=0,
        allow_dms=True,
        max_queue=1,
    )
    clock = FakeClock()
    bot = create_bot(settings, engine7, clock=clock, sleep=clock.sleep)
    http = RecordingHTTP(asyncio.get_running_loop(), clock)
    bot.http = http
    bot._connection.http = http
    adapter = RecordingAdapter()
    token = async_context.set(adapter)
    await bot._async_setup_hook()
    await bot.setup_hook()
    state = bot._connection
    state.user = discord.ClientUser(state=state, data=user(BOT_ID, "rwkv", True))  # type: ignore[arg-type]
    state.application_id = BOT_ID
    state._add_guild_from_data(guild_payload())  # type: ignore[arg-type]
    h = Harness(bot, http, adapter, clock)

    @bot.tree.error
    async def record(interaction: discord.Interaction, error: discord.app_commands.AppCommandError) -> None:
        h.errors.append(error)

    await h.slash("rwkv", "enable", author=MOD)
    try:
        yield h
    finally:
        await bot.close()
        async_context.reset(token)
        assert h.errors == [], h.errors


# ---------------------------------------------------------------------------- where it talks


async def test_answers_in_enabled_channel_and_its_threads_only(harness: Harness) -> None:
    """Enabled channel and its threads get replies; other channels stay silent unless mentioned."""
    await harness.say("-top_p=0 Hello", channel=GENERAL)
    assert harness.http.posted_to(GENERAL)
    await harness.say("Hello", channel=THREAD)
    assert harness.http.posted_to(THREAD)
    await harness.say("Hello", channel=QUIET)
    assert not harness.http.posted_to(QUIET)
    await harness.say(f"<@{BOT_ID}> Hello", channel=QUIET, mentions=[BOT_ID])
    replies = harness.http.posted_to(QUIET)
    assert replies


async def test_ignores_bots_and_itself(harness: Harness) -> None:
    """Messages of other bots and of the bot itself get no answer."""
    message = harness.message("Hello")
    message.author = discord.User(state=harness.state, data=user(77, "otherbot", True))  # type: ignore[arg-type]
    await harness.bot.on_message(message)
    await harness.say("Hello", author=BOT_ID)
    assert harness.http.sent() == []


async def test_each_channel_has_its_own_conversation(harness: Harness) -> None:
    """The thread and its parent channel keep separate conversations."""
    await harness.say("-top_p=0 Hi", channel=GENERAL)
    await harness.say("-top_p=0 Hi", channel=THREAD)
    service = harness.bot.service
    assert service is not None
    assert [t.user_text for t in await service.store.transcript(str(GENERAL))] == ["Hi"]
    assert [t.user_text for t in await service.store.transcript(str(THREAD))] == ["Hi"]


# ---------------------------------------------------------------------------- the grammar


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("+help", "How to talk to me"),
        ("+reset", "Chat reset."),
        ("-temp=abc hi", "needs a number"),
        ("-temp=0.5 -top_p=0.2", "Saved as this channel's defaults"),
        ("+", "no chat reply to retry"),
        ("++", "no free generation to retry"),
        ("+++", "no free generation to continue"),
        ("+nonsense", "Unknown command +nonsense"),
    ],
)
async def test_grammar_answers_through_a_channel(harness: Harness, message: str, expected: str) -> None:
    """Commands that do not generate answer with their notice, as a reply."""
    await harness.say(message)
    assert any(expected in text for text in harness.http.sent()), harness.http.sent()


@pytest.mark.parametrize(
    "message", ["Hello there", "+gen Once upon", "+i list three fruits", "+qq why?", "+qa who are you?"]
)
async def test_generating_commands_stream_a_reply(harness: Harness, message: str) -> None:
    """Chat and free generations send a reply and edit it as the text grows."""
    await harness.say(message)
    sent = harness.http.sent()
    assert len(sent) >= 1
    service = harness.bot.service
    assert service is not None and len(await service.store.transcript(str(GENERAL))) == 1


async def test_retries_and_continuations_through_a_channel(harness: Harness) -> None:
    """+, ++ and +++ after a chat and a free generation produce new replies."""
    for message in ("-top_p=0 Hi", "+", "+gen Story", "++", "+++"):
        await harness.say(message)
    service = harness.bot.service
    assert service is not None
    commands = [t.command for t in await service.store.transcript(str(GENERAL))]
    assert commands == ["chat", "+", "+gen", "++", "+++"]


async def test_faq_in_text_is_an_embed(harness: Harness) -> None:
    """+faq answers with an embed from the knowledge base."""
    await harness.say("+faq what licence is rwkv under")
    embeds = [p.get("embeds") for m, _, p in harness.http.calls if m == "POST" and p.get("embeds")]
    assert embeds and "Apache" in embeds[0][0]["description"]


# ---------------------------------------------------------------------------- streaming


async def test_long_reply_is_split_and_edits_are_throttled(harness: Harness, tmp_path: Path) -> None:
    """A reply longer than 2,000 characters continues in a new message; edits stay rate-limited."""
    service = harness.bot.service
    assert service is not None
    long_replies(harness)
    await harness.say("-top_p=1 -temp=3 write a lot")
    contents = [m["content"] for m in harness.http.posted_to(GENERAL)]
    total = sum(len(c) for c in contents)
    assert total > 2000, "the seeded reply is long enough to need a second message"
    assert len(contents) >= 2 and all(len(c) <= 2000 for c in contents)
    edits = [c for c in harness.http.calls if c[0] == "PATCH"]
    assert edits, "a streamed reply is edited as it grows"


async def test_mentions_in_model_output_never_ping(harness: Harness) -> None:
    """Every message the bot sends has allowed mentions switched off (checked by the recorder)."""
    await harness.say("Say @everyone <@1>")
    assert harness.http.sent()


# ---------------------------------------------------------------------------- moderation


async def test_moderator_commands_refuse_normal_members(harness: Harness) -> None:
    """reset, undo-reset, enable, disable, server and settings changes need Manage Messages."""
    for sub, options in [
        ("reset", {}),
        ("undo-reset", {}),
        ("enable", {}),
        ("disable", {}),
        ("server", {"reset_policy": "moderators"}),
        ("settings", {"temperature": 0.5}),
    ]:
        before = len(harness.adapter.calls)
        await harness.slash("rwkv", sub, author=ALICE, **options)
        assert "Only " in " ".join(harness.adapter.texts()[-1:]), sub
        assert len(harness.adapter.calls) == before + 1


async def test_reset_and_undo_reset(harness: Harness) -> None:
    """/rwkv reset puts the channel back to the start; /rwkv undo-reset restores it."""
    service = harness.bot.service
    assert service is not None
    await harness.say("-top_p=0 Remember this")
    before = await service.states.durable(str(GENERAL), "chat")
    await harness.slash("rwkv", "reset", author=MOD)
    after = await service.states.durable(str(GENERAL), "chat")
    assert before is not None and after is not None
    assert not after.logits.equal(before.logits)
    await harness.slash("rwkv", "undo-reset", author=MOD)
    restored = await service.states.durable(str(GENERAL), "chat")
    assert restored is not None and restored.logits.equal(before.logits)
    assert any("Restored 1" in t for t in harness.adapter.texts())


async def test_server_wide_reset(harness: Harness) -> None:
    """scope=server resets every conversation of the server."""
    await harness.say("-top_p=0 Hi", channel=GENERAL)
    await harness.say("-top_p=0 Hi", channel=THREAD)
    await harness.slash("rwkv", "reset", author=ADMIN, scope="server")
    assert any("Reset 2 conversation(s)" in t for t in harness.adapter.texts())


async def test_server_wide_actions_need_manage_server(harness: Harness) -> None:
    """Manage Messages in a channel is not enough to reset, undo or set policy for the whole
    server: those need Manage Server, and a refused one changes nothing."""
    service = harness.bot.service
    assert service is not None
    await harness.say("-top_p=0 Hi", channel=THREAD)
    before = await service.states.durable(str(THREAD), "chat")
    for sub, options in [
        ("reset", {"scope": "server"}),
        ("undo-reset", {"scope": "server"}),
        ("server", {"reset_policy": "moderators"}),
    ]:
        await harness.slash("rwkv", sub, author=MOD, **options)
        assert "Manage Server" in harness.adapter.texts()[-1], sub
    after = await service.states.durable(str(THREAD), "chat")
    assert before is not None and after is not None and after.logits.equal(before.logits)
    assert await service.store.guild_settings(str(GUILD)) == {}
    await harness.slash("rwkv", "server", author=ADMIN, reset_policy="moderators")
    assert await service.store.guild_settings(str(GUILD)) == {"reset_policy": "moderators"}


async def test_text_reset_follows_the_server_policy(harness: Harness) -> None:
    """With reset_policy=moderators, +reset from a member is refused and from a moderator done."""
    await harness.slash("rwkv", "server", author=ADMIN, reset_policy="moderators")
    await harness.say("+reset", author=ALICE)
    assert "Only moderators can reset" in harness.http.sent()[-1]
    await harness.say("+reset", author=MOD)
    assert harness.http.sent()[-1] == "Chat reset."


async def test_enable_and_disable(harness: Harness) -> None:
    """A moderator enables #quiet; the bot answers there until it is disabled."""
    await harness.slash("rwkv", "enable", author=MOD, channel=QUIET)
    await harness.say("+help", channel=QUIET)
    assert harness.http.posted_to(QUIET)
    await harness.slash("rwkv", "disable", author=MOD, channel=QUIET)
    count = len(harness.http.posted_to(QUIET))
    await harness.say("+help", channel=QUIET)
    assert len(harness.http.posted_to(QUIET)) == count


async def test_settings_command_validates_and_stores(harness: Harness) -> None:
    """A moderator sets this channel's sampling; an unknown preset is refused."""
    await harness.slash("rwkv", "settings", author=MOD, temperature=0.7, max_tokens=30)
    assert any("Set temperature 0.7, max_tokens 30" in t for t in harness.adapter.texts())
    await harness.slash("rwkv", "settings", author=MOD, preset="no-such-preset")
    assert any("Nothing was changed" in t for t in harness.adapter.texts())
    service = harness.bot.service
    assert service is not None
    assert await service.store.channel_settings(str(GENERAL)) == {"temperature": 0.7, "max_tokens": 30}


async def test_faq_slash_command(harness: Harness) -> None:
    """/faq answers with an embed; an off-topic question gets a polite miss."""
    await harness.slash("faq", "ask", question="is it censored")
    responses = [b for _, _, b in harness.adapter.calls if isinstance(b.get("data"), dict)]
    assert any(r["data"].get("embeds") for r in responses)
    await harness.slash("faq", "ask", question="best pizza in town")
    assert any("No FAQ entry matches" in t for t in harness.adapter.texts())


# ---------------------------------------------------------------------------- concurrency


async def test_queue_and_refusal_when_full(harness: Harness) -> None:
    """While a reply is written, one more message waits (marked with a reaction); the next is refused."""
    service = harness.bot.service
    assert service is not None
    first = await start_long_reply(harness, "a long answer please")
    second = asyncio.ensure_future(harness.say("-top_p=0 second", author=MOD))
    await asyncio.sleep(0.05)
    assert (
        "PUT",
        "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me",
        {},
    ) in harness.http.calls
    await harness.say("third", author=3)
    await harness.settle()
    assert "still answering earlier messages" in harness.http.sent()[-1]
    harness.bot.stop(str(GENERAL))
    await first
    await second
    assert [t.user_text for t in await service.store.transcript(str(GENERAL))] == [
        "a long answer please",
        "second",
    ]


async def test_simultaneous_messages_respect_the_queue_limit(harness: Harness) -> None:
    """Messages arriving together are counted before any of them is answered."""
    harness.bot.settings = harness.bot.settings.model_copy(update={"max_queue": 0})
    await asyncio.gather(*(harness.say(f"-top_p=0 hello {i}", author=10 + i) for i in range(3)))
    await harness.settle()
    service = harness.bot.service
    assert service is not None
    assert len(await service.store.transcript(str(GENERAL))) == 1
    assert sum("still answering" in text for text in harness.http.sent()) == 2


async def test_cooldown_per_user(harness: Harness) -> None:
    """A user who writes again within the cooldown is asked to wait; others are not."""
    harness.bot.settings = harness.bot.settings.model_copy(update={"user_cooldown": 3600.0})
    await harness.say("+help", author=ALICE)
    await harness.say("+help", author=ALICE)
    await harness.say("+help", author=ALICE)
    await harness.settle()
    assert "Please wait" in harness.http.sent()[-1]
    assert (
        sum("Please wait" in text for text in harness.http.sent()) == 1
    )  # one reminder, not one per message
    await harness.say("+help", author=MOD)
    assert "How to talk to me" in harness.http.sent()[-1]


async def test_stop_reaction_and_command(harness: Harness) -> None:
    """/rwkv stop or a stop reaction ends the reply early; what was written is kept."""
    service = harness.bot.service
    assert service is not None
    task = await start_long_reply(harness, "go on and on")
    await harness.slash("rwkv", "stop", author=ALICE)
    await task
    turns = await service.store.transcript(str(GENERAL))
    assert len(turns) == 1 and turns[0].reply_tokens < 900
    assert "stopped" in harness.http.posted_to(GENERAL)[-1]["content"]

    task = await start_long_reply(harness, "again")
    reply_id = next(iter(harness.bot.by_reply))
    await react(harness, reply_id, ALICE, GENERAL)
    await task
    assert "stopped" in harness.http.posted_to(GENERAL)[-1]["content"]
    assert len(await service.store.transcript(str(GENERAL))) == 2


async def test_moderator_can_stop_a_reply_in_a_thread_by_reaction(harness: Harness) -> None:
    """A moderator's stop reaction works in threads too; another member's does not."""
    task = await start_long_reply(harness, "thread talk", channel=THREAD)
    reply_id = next(iter(harness.bot.by_reply))
    await react(harness, reply_id, 3, THREAD)
    generation = harness.bot.by_reply[reply_id]
    assert not generation.cancel.is_set()
    await react(harness, reply_id, MOD, THREAD, member_roles=[str(MOD_ROLE)])
    assert generation.cancel.is_set()
    await task


async def test_stop_while_the_prompt_is_read_changes_nothing(harness: Harness) -> None:
    """Stopping before the first token leaves the conversation untouched and says so."""
    service = harness.bot.service
    assert service is not None
    task = asyncio.ensure_future(harness.say("+gen " + "a long prompt " * 600))
    while not harness.bot.running:
        await asyncio.sleep(0.001)
    assert harness.bot.stop(str(GENERAL))
    await task
    assert await service.store.transcript(str(GENERAL)) == []


async def test_event_loop_keeps_running_during_a_reply(harness: Harness) -> None:
    """Loop lag stays small while the bot writes a reply (the gateway heartbeat depends on it)."""
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    done = threading.Event()

    async def ticker() -> None:
        last = loop.time()
        while not done.is_set():
            await asyncio.sleep(0.01)
            gaps.append(loop.time() - last)
            last = loop.time()

    tick = asyncio.ensure_future(ticker())
    await harness.say("+gen " + "a long prompt " * 150)
    done.set()
    await tick
    assert max(gaps) < 0.25


# ---------------------------------------------------------------------------- shutdown and failure


async def test_shutdown_cuts_a_reply_in_flight(harness: Harness) -> None:
    """Closing the bot during a reply ends it with an interruption note and stores the turn."""
    service = harness.bot.service
    assert service is not None
    long_replies(harness)
    task = asyncio.ensure_future(harness.bot.on_message(harness.message("-top_p=1 -temp=3 long story")))
    while not harness.bot.by_reply:
        await asyncio.sleep(0.01)
    store = service.store
    await harness.bot.close()
    await task
    assert "interrupted" in harness.http.posted_to(GENERAL)[-1]["content"]
    # the turn was stored before the database closed
    import sqlite3

    rows = (
        sqlite3.connect(store.path)
        .execute("SELECT command FROM turns WHERE channel_id = ?", (str(GENERAL),))
        .fetchall()
    )
    assert rows == [("chat",)]


async def test_engine_failure_fails_one_reply_and_the_bot_goes_on(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model failure midway answers with an error; the next message is served."""
    engine = harness.bot.engine
    assert isinstance(engine, ReferenceEngine)
    real = engine._runner.forward
    calls = {"n": 0}

    def failing(tokens: list[int], state: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(tokens, state)

    monkeypatch.setattr(engine._runner, "forward", failing)
    await harness.say("-top_p=0 Hello")
    assert any("failed" in m["content"] for m in harness.http.posted_to(GENERAL))
    await harness.say("-top_p=0 Hello again")
    service = harness.bot.service
    assert service is not None and len(await service.store.transcript(str(GENERAL))) == 1


# ---------------------------------------------------------------------------- stream details


async def test_typing_indicator_while_the_prompt_is_read(harness: Harness) -> None:
    """The bot shows 'typing' before the first text of a reply."""
    await harness.say("-top_p=0 Hello")
    paths = [path for method, path, _ in harness.http.calls if method == "POST"]
    assert "/channels/{channel_id}/typing" in paths
    assert paths.index("/channels/{channel_id}/typing") < paths.index("/channels/{channel_id}/messages")


async def test_edit_throttle_with_a_fake_clock(harness: Harness) -> None:
    """Pushing text every 0.1 s edits the reply at most once per second, plus the final edit."""
    now = {"t": 0.0}

    async def sleep(seconds: float) -> None:
        now["t"] += seconds

    reply_to = harness.message("hi")
    pacer = ChannelPacer(1.0, clock=lambda: now["t"], sleep=sleep)
    stream = ReplyStream(reply_to, interval=1.0, clock=lambda: now["t"], pacer=pacer)
    for _ in range(50):
        now["t"] += 0.1
        await stream.push("word ")
    await stream.finish()
    edits = [c for c in harness.http.calls if c[0] == "PATCH"]
    assert 1 <= len(edits) <= 5 + 1  # 5 s of pushes: at most one edit a second, then the final one
    assert harness.http.posted_to(GENERAL)[-1]["content"] == ("word " * 50).strip()


@pytest.mark.parametrize(
    ("display", "expected"),
    [("show", "<think>plan</think>Answer"), ("hide", "Answer"), ("fold", "> thoughts: ||plan||\nAnswer")],
)
def test_thinking_display(display: str, expected: str) -> None:
    """Thinking sections are shown, hidden, or folded into a spoiler."""
    assert render_thinking("<think>plan</think>Answer", display) == expected
    assert render_thinking("<think>still going", "hide") == "*(thinking...)*"


async def test_channel_thinking_setting_hides_thoughts(harness: Harness) -> None:
    """With thinking=hide, a reply's <think> section never reaches Discord."""
    await harness.slash("rwkv", "settings", author=MOD, thinking="hide")
    reply_to = harness.message("hi")
    service = harness.bot.service
    assert service is not None
    settings = await service.store.channel_settings(str(GENERAL))
    stream = ReplyStream(reply_to, thinking=str(settings["thinking"]))
    await stream.push("<think>secret plan</think>The answer.")
    await stream.finish()
    assert harness.http.posted_to(GENERAL)[-1]["content"] == "The answer."


async def test_on_ready_again_does_not_set_up_again(harness: Harness) -> None:
    """A reconnect's on_ready leaves the service and the enabled channels as they were."""
    service, enabled = harness.bot.service, set(harness.bot.enabled)
    await harness.bot.on_ready()
    await harness.bot.on_ready()
    assert harness.bot.service is service and harness.bot.enabled == enabled


async def test_faq_reload_reports_broken_files_and_is_for_moderators(
    harness: Harness, tmp_path: Path
) -> None:
    """/faq reload reads the operator's folder again; a broken file is named and skipped."""
    folder = tmp_path / "faq"
    folder.mkdir()
    (folder / "broken.md").write_text("+++\ntitle = \n+++\nbody\n")
    (folder / "house-rules.md").write_text(
        '+++\ntitle = "House rules"\nkeywords = ["house rules", "rules"]\n+++\nBe kind to the bot.\n'
    )
    harness.bot.settings = harness.bot.settings.model_copy(update={"faq_dir": folder})
    await harness.slash("faq", "reload", author=ALICE)
    assert "Only moderators" in harness.adapter.texts()[-1]
    await harness.slash("faq", "reload", author=MOD)
    report = harness.adapter.texts()[-1]
    assert "Skipped" in report and "broken.md" in report
    assert harness.bot.faq is not None and harness.bot.faq.best("what are the house rules") is not None


async def test_automatic_faq_answers_are_opt_in(harness: Harness) -> None:
    """A clear FAQ question goes to the model unless the channel turned faq_auto on."""
    service = harness.bot.service
    assert service is not None
    await harness.say("-top_p=0 What license is RWKV under?")
    assert len(await service.store.transcript(str(GENERAL))) == 1
    await harness.slash("rwkv", "settings", author=MOD, faq_auto=True)
    await harness.say("What license is RWKV under?")
    assert len(await service.store.transcript(str(GENERAL))) == 1  # answered without the model
    embeds = [p["embeds"] for m, _, p in harness.http.calls if m == "POST" and p.get("embeds")]
    assert embeds and "Apache" in embeds[-1][0]["description"]
    await harness.say("-top_p=0 how are you today?")
    assert len(await service.store.transcript(str(GENERAL))) == 2  # not an FAQ question


async def test_system_and_empty_messages_are_ignored(harness: Harness) -> None:
    """Join notices and image-only posts get no answer; a bare mention gets the help text."""
    join = harness.message("")
    join.type = discord.MessageType.new_member
    await harness.bot.on_message(join)
    await harness.say("")
    assert harness.http.sent() == []
    await harness.say(f"<@{BOT_ID}>", mentions=[BOT_ID])
    assert "How to talk to me" in harness.http.sent()[-1]


async def test_direct_messages_follow_the_setting(harness: Harness) -> None:
    """DMs are answered only when the operator allows them."""
    await harness.say("+help", channel=555, guild=False)
    assert harness.http.posted_to(555)
    harness.bot.settings = harness.bot.settings.model_copy(update={"allow_dms": False})
    count = len(harness.http.posted_to(555))
    await harness.say("+help", channel=555, guild=False)
    assert len(harness.http.posted_to(555)) == count


async def test_mentions_outside_enabled_channels_follow_the_setting(harness: Harness) -> None:
    """With respond_to_mentions off, a mention in a channel that is not enabled is ignored."""
    harness.bot.settings = harness.bot.settings.model_copy(update={"respond_to_mentions": False})
    await harness.say(f"<@{BOT_ID}> +help", channel=QUIET, mentions=[BOT_ID])
    assert not harness.http.posted_to(QUIET)


async def test_failed_typing_request_does_not_break_the_reply(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Discord refusing the typing indicator still gives a reply, and stop keeps working after."""
    real = harness.http.request

    async def no_typing(route: Route, **kwargs: Any) -> Any:
        if route.path.endswith("/typing"):
            raise discord.Forbidden(FakeResponse(403), "Missing Access")
        return await real(route, **kwargs)

    monkeypatch.setattr(harness.http, "request", no_typing)
    await harness.say("-top_p=0 Hello")
    assert harness.http.posted_to(GENERAL)
    assert harness.bot.running == {} and harness.bot.generations == {}


async def test_waiting_message_is_not_started_at_shutdown(harness: Harness) -> None:
    """At shutdown the reply in flight is cut and a waiting message gets a 'send it again'."""
    first = await start_long_reply(harness, "a long one")
    second = asyncio.ensure_future(harness.say("-top_p=0 waiting", author=MOD))
    await asyncio.sleep(0.05)
    await harness.bot.close()
    await first
    await second
    texts = [m["content"] for m in harness.http.posted_to(GENERAL)]
    assert any("interrupted" in t for t in texts)
    assert any("restarting" in t for t in texts)


class FakeResponse:
    """The little of aiohttp's response that discord.HTTPException reads."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.reason = "Forbidden"


def test_prometheus_collector_exposes_engine_and_bot_numbers() -> None:
    """Every number of the metrics source becomes a gauge with the project's prefix."""
    from prometheus_client import CollectorRegistry, generate_latest

    from bot.metrics import EngineCollector

    registry = CollectorRegistry()
    registry.register(EngineCollector(lambda: {"queue": 3, "tokens_per_s": 512.5, "ttft_p50_s": 0.09}))
    text = generate_latest(registry).decode()
    assert "rwkv_discord_queue 3.0" in text
    assert "rwkv_discord_tokens_per_s 512.5" in text


def test_prometheus_collector_labels_each_device_s_numbers() -> None:
    """With several devices, each device's numbers are gauges labelled with the device."""
    from prometheus_client import CollectorRegistry, generate_latest

    from bot.metrics import EngineCollector

    registry = CollectorRegistry()
    devices = {"cuda:0": {"batch": 12.0, "queue": 0.0}, "cuda:1": {"batch": 3.0}}
    registry.register(EngineCollector(lambda: {"batch": 15.0}, lambda: devices))
    text = generate_latest(registry).decode()
    assert "rwkv_discord_batch 15.0" in text
    assert 'rwkv_discord_device_batch{device="cuda:0"} 12.0' in text
    assert 'rwkv_discord_device_batch{device="cuda:1"} 3.0' in text
    assert 'rwkv_discord_device_queue{device="cuda:0"} 0.0' in text
    assert 'device="cuda:1"} 0.0' not in text


async def test_status_shows_engine_numbers(harness: Harness) -> None:
    """/rwkv status answers with the model, queues and the engine's numbers."""
    await harness.say("-top_p=0 hi")
    await harness.slash("rwkv", "status")
    status = harness.adapter.texts()[-1]
    assert "Model: RWKV-7" in status and "Replies being written: 0" in status
    assert "States: 1 channels on the device" in status
    metrics = harness.bot.metrics()
    assert "messages_waiting" in metrics and metrics["states_device_channels"] == 1
    assert "cuda:" not in status


async def test_status_shows_each_device(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """With several GPUs, /rwkv status has a line for each."""
    numbers = {"batch": 7.0, "resident": 20.0, "queue": 1.0, "tokens_per_s": 3210.4}
    devices = {"cuda:0": numbers, "cuda:1": {**numbers, "batch": 2.0}}
    monkeypatch.setattr(harness.bot.engine, "device_metrics", lambda: devices)
    assert harness.bot.service is not None
    monkeypatch.setattr(harness.bot.service.states.tiers, "device_usage", lambda: {"cuda:1": 3 * 2**20})
    await harness.slash("rwkv", "status")
    status = harness.adapter.texts()[-1]
    assert "cuda:0: batch 7, 20 resident, 1 queued, 3210 tokens/s, 0 MB of states" in status
    assert "cuda:1: batch 2, 20 resident, 1 queued, 3210 tokens/s, 3 MB of states" in status
    assert harness.bot.device_metrics()["cuda:1"]["states_bytes"] == 3 * 2**20
    assert "channels on the 2 devices (" in status and " MB on each)" in status


async def wait_for(condition: Any, timeout: float = 5.0) -> None:
    """Let dispatched event handlers (tasks) run until ``condition()`` holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "the event was not handled in time"
        await asyncio.sleep(0.01)


async def test_deleted_threads_and_channels_are_purged(harness: Harness) -> None:
    """Deleting a thread or a channel on Discord deletes its stored conversation and transcript."""
    service = harness.bot.service
    assert service is not None
    await harness.say("-top_p=0 Hi", channel=GENERAL)
    await harness.say("-top_p=0 Hi", channel=THREAD)

    async def gone(channel: int) -> bool:
        assert service is not None
        return not await service.store.transcript(str(channel)) and not await service.store.heads(
            str(channel)
        )

    harness.state.parse_thread_delete(
        {"id": str(THREAD), "guild_id": str(GUILD), "parent_id": str(GENERAL), "type": 11}
    )
    await wait_for(lambda: gone(THREAD))
    assert not await gone(GENERAL)
    harness.state.parse_channel_delete({"id": str(GENERAL), "guild_id": str(GUILD), "type": 0})
    await wait_for(lambda: gone(GENERAL))
    assert GENERAL not in harness.bot.enabled
    assert str(GENERAL) not in await service.store.enabled_channels()


async def test_a_deleted_channel_takes_its_archived_threads_with_it(harness: Harness) -> None:
    """A thread discord.py no longer holds (archived) is purged with its channel all the same."""
    service = harness.bot.service
    assert service is not None
    await harness.say("-top_p=0 Hi", channel=GENERAL)
    await harness.say("-top_p=0 Hi", channel=THREAD)
    await harness.say(f"<@{BOT_ID}> -top_p=0 Hi", channel=QUIET, mentions=[BOT_ID])
    assert await service.store.threads_of(str(GENERAL)) == [str(THREAD)]
    guild = harness.bot.get_guild(GUILD)
    assert guild is not None
    guild._remove_thread(discord.Object(THREAD))  # archived: out of discord.py's cache

    async def gone(channel: int) -> bool:
        assert service is not None
        return not await service.store.transcript(str(channel))

    harness.state.parse_channel_delete({"id": str(GENERAL), "guild_id": str(GUILD), "type": 0})
    await wait_for(lambda: gone(THREAD))
    await wait_for(lambda: gone(GENERAL))
    assert not await gone(QUIET)
    assert await service.store.threads_of(str(GENERAL)) == []


async def test_a_thread_enabled_or_set_but_silent_goes_with_its_channel(harness: Harness) -> None:
    """A thread given settings or enabled by a moderator, where nobody talked, is purged with its
    channel (discord.py may no longer hold it, if it was archived)."""
    service = harness.bot.service
    assert service is not None
    await harness.slash("rwkv", "settings", author=MOD, channel=THREAD, temperature=0.5)
    await harness.slash("rwkv", "enable", author=MOD, channel=THREAD)
    assert await service.store.channel_settings(str(THREAD)) == {"temperature": 0.5}
    assert str(THREAD) in await service.store.enabled_channels()
    assert await service.store.threads_of(str(GENERAL)) == [str(THREAD)]
    guild = harness.bot.get_guild(GUILD)
    assert guild is not None
    guild._remove_thread(discord.Object(THREAD))
    harness.state.parse_channel_delete({"id": str(GENERAL), "guild_id": str(GUILD), "type": 0})

    async def gone() -> bool:
        assert service is not None
        return str(THREAD) not in await service.store.enabled_channels()

    await wait_for(gone)
    assert await service.store.channel_settings(str(THREAD)) == {}
    assert THREAD not in harness.bot.enabled


async def test_a_purge_that_fails_does_not_stop_the_others(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a thread's purge fails (say the database is busy), the channel is purged all the same."""
    service = harness.bot.service
    assert service is not None
    await harness.say("-top_p=0 Hi", channel=GENERAL)
    await harness.say("-top_p=0 Hi", channel=THREAD)
    purge = service.purge

    async def flaky(channel_id: str) -> bool:
        if channel_id == str(THREAD):
            raise StoreError("the database is locked")
        return await purge(channel_id)

    monkeypatch.setattr(service, "purge", flaky)
    harness.state.parse_channel_delete({"id": str(GENERAL), "guild_id": str(GUILD), "type": 0})

    async def general_gone() -> bool:
        assert service is not None
        return not await service.store.transcript(str(GENERAL))

    await wait_for(general_gone)
    assert await service.store.transcript(str(THREAD))  # its purge failed (and was logged)


async def test_removed_from_a_server_forgets_its_conversations(harness: Harness) -> None:
    """When the bot is removed from a server, its conversations and settings are purged."""
    service = harness.bot.service
    assert service is not None
    await harness.say("-top_p=0 Hi", channel=GENERAL)
    await service.store.set_guild_settings(str(GUILD), {"reset_policy": "moderators"})

    async def forgotten() -> bool:
        assert service is not None
        return (
            not await service.store.transcript(str(GENERAL))
            and not await service.store.guild_settings(str(GUILD))
            and not await service.store.enabled_channels()
        )

    harness.state.parse_guild_delete({"id": str(GUILD)})
    await wait_for(forgotten)
    assert GENERAL not in harness.bot.enabled


# ---------------------------------------------------------------------------- faults under load


async def test_disable_in_a_thread_of_an_enabled_channel_stops_the_bot_there(harness: Harness) -> None:
    """/rwkv disable in a thread of an enabled channel really stops the bot there (and after a
    restart); /rwkv enable in the thread brings it back."""
    await harness.slash("rwkv", "disable", author=MOD, channel=THREAD)
    assert "won't answer" in harness.adapter.texts()[-1]
    await harness.say("+help", channel=THREAD)
    assert not harness.http.posted_to(THREAD)
    await harness.say("+help", channel=GENERAL)
    assert harness.http.posted_to(GENERAL)  # the channel itself is still on
    service = harness.bot.service
    assert service is not None
    assert await service.store.disabled_threads() == {str(THREAD)}
    harness.bot.disabled.clear()
    await harness.bot.setup_hook()  # a restart reads it back
    assert harness.bot.disabled == {THREAD}
    await harness.slash("rwkv", "enable", author=MOD, channel=THREAD)
    await harness.say("+help", channel=THREAD)
    assert harness.http.posted_to(THREAD)
    assert await service.store.disabled_threads() == set()


async def test_edits_keep_discord_s_pace_per_channel_across_replies(harness: Harness) -> None:
    """Three members posting at once in several channels, two rounds, long streamed replies:
    every channel's writes (sends and edits, final ones included) stay at least a second apart
    and at most five in five seconds, across replies."""
    long_replies(harness)
    service = harness.bot.service
    assert service is not None
    service.config = service.config.__class__(**{**service.config.__dict__, "chat_max_tokens": 120})
    harness.bot.settings = harness.bot.settings.model_copy(update={"max_queue": 3})
    channels = [GENERAL, QUIET]
    await harness.slash("rwkv", "enable", author=MOD, channel=QUIET)
    writes: dict[str, list[float]] = {}
    request = harness.http.request

    async def timed(route: Route, **kwargs: Any) -> Any:
        if route.path in ("/channels/{channel_id}/messages", "/channels/{channel_id}/messages/{message_id}"):
            writes.setdefault(str(route.channel_id), []).append(harness.clock.now)
        return await request(route, **kwargs)

    harness.http.request = timed  # type: ignore[method-assign]
    for _ in range(2):
        await asyncio.gather(
            *(
                harness.say(f"-top_p=1 -temp=3 tell me more {member}", author=20 + member, channel=channel)
                for channel in channels
                for member in range(3)
            )
        )
    for channel in channels:
        times = writes[str(channel)]
        assert len(times) >= 6, times  # several replies, several writes each
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) >= harness.bot.settings.edit_interval - 1e-9, gaps
        assert all(times[i + 5] - times[i] > 5.0 for i in range(len(times) - 5)), times


async def test_messages_are_answered_and_stored_in_arrival_order(harness: Harness) -> None:
    """A question (which the FAQ check reads the database for) sent just before two statements
    is answered and stored first: a message takes its place in the channel's line on arrival."""
    harness.bot.settings = harness.bot.settings.model_copy(update={"max_queue": 3})
    await harness.slash("rwkv", "settings", author=MOD, faq_auto=True)
    texts = ["-top_p=0 what is your favourite colour?", "-top_p=0 I like blue.", "-top_p=0 And green."]
    await asyncio.gather(*(harness.say(text, author=30 + i) for i, text in enumerate(texts)))
    service = harness.bot.service
    assert service is not None
    stored = [t.user_text for t in await service.store.transcript(str(GENERAL))]
    assert stored == [t.removeprefix("-top_p=0 ") for t in texts]
