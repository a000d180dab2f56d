"""Who may talk to the bot: roles allowed or denied per server and per channel, its managed
role's mention, and hints instead of silence (bot/replies.py, bot/cogs/moderation.py)."""

from __future__ import annotations

from typing import Any

import discord

from bot.replies import ATTACHMENTS_UNREAD, DMS_OFF, ROLE_REFUSED
from tests.bot.harness import (
    ADMIN,
    ALICE,
    BOT_ROLE,
    GENERAL,
    MOD,
    QUIET,
    TALKER,
    TALKER_ROLE,
    Harness,
    RoleOption,
)


async def replies_to(harness: Harness, author: int, channel: int = GENERAL) -> list[str]:
    await harness.say("+help", author=author, channel=channel)
    await harness.settle()
    return harness.http.sent()


async def test_allowed_roles_per_channel(harness: Harness) -> None:
    """Once a role is allowed in a channel, only its members (and moderators) are answered; the
    others get a hint, once; removing the rule opens the channel again."""
    await harness.slash("rwkv-mod", "roles", author=MOD, role=RoleOption(TALKER_ROLE), rule="allow")
    assert "allowed in this channel" in harness.adapter.texts()[-1]
    assert "How to talk to me" in (await replies_to(harness, TALKER))[-1]
    assert (await replies_to(harness, ALICE))[-1] == ROLE_REFUSED
    count = len(harness.http.sent())
    await replies_to(harness, ALICE)
    assert len(harness.http.sent()) == count  # the hint is not repeated at once
    assert "How to talk to me" in (await replies_to(harness, MOD))[-1]
    await replies_to(harness, ALICE, channel=QUIET)  # another channel: not enabled, silent anyway
    await harness.slash("rwkv-mod", "roles", author=MOD, role=RoleOption(TALKER_ROLE), rule="remove")
    assert "How to talk to me" in (await replies_to(harness, ALICE))[-1]


async def test_denied_roles_per_server_need_manage_server(harness: Harness) -> None:
    """Denying a role server-wide needs Manage Server; then its members are not answered in any
    channel."""
    await harness.slash(
        "rwkv-mod", "roles", author=MOD, role=RoleOption(TALKER_ROLE), rule="deny", scope="server"
    )
    assert "Manage Server" in harness.adapter.texts()[-1]
    await harness.slash(
        "rwkv-mod", "roles", author=ADMIN, role=RoleOption(TALKER_ROLE), rule="deny", scope="server"
    )
    assert "denied in this server" in harness.adapter.texts()[-1]
    assert (await replies_to(harness, TALKER))[-1] == ROLE_REFUSED
    assert "How to talk to me" in (await replies_to(harness, ALICE))[-1]


async def test_mention_of_the_bots_managed_role_is_answered(harness: Harness) -> None:
    """A mention of the bot's own role works like a mention of the bot, and is not read as text."""
    message = harness.message(f"<@&{BOT_ROLE}> +help", channel=QUIET)
    message._handle_mention_roles([BOT_ROLE])  # type: ignore[attr-defined]
    await harness.bot.on_message(message)
    assert "How to talk to me" in harness.http.posted_to(QUIET)[-1]["content"]


async def test_attachment_only_message_gets_a_hint(harness: Harness) -> None:
    """An image alone gets a short hint that only text is read, not once per image."""
    attachment: dict[str, Any] = {
        "id": "1",
        "filename": "cat.png",
        "size": 10,
        "url": "https://cdn.example/cat.png",
        "proxy_url": "https://cdn.example/cat.png",
    }
    for _ in range(2):
        message = harness.message("")
        message.attachments = [discord.Attachment(data=attachment, state=harness.state)]  # type: ignore[arg-type]
        await harness.bot.on_message(message)
    await harness.settle()
    assert harness.http.sent() == [ATTACHMENTS_UNREAD]


async def test_direct_message_when_dms_are_off_gets_a_hint(harness: Harness) -> None:
    """With DMs off, a DM gets one hint saying where to talk instead."""
    harness.bot.settings = harness.bot.settings.model_copy(update={"allow_dms": False})
    await harness.say("Hello", channel=555, guild=False)
    await harness.say("Hello again", channel=555, guild=False)
    await harness.settle()
    assert [m["content"] for m in harness.http.posted_to(555)] == [DMS_OFF]


async def test_buttons_follow_the_roles_too(harness: Harness) -> None:
    """A member whose roles may not talk here cannot press Retry either."""
    await harness.say("-top_p=0 Hello", author=TALKER)
    reply = harness.http.posted_to(GENERAL)[-1]
    await harness.slash("rwkv-mod", "roles", author=MOD, role=RoleOption(TALKER_ROLE), rule="deny")
    await harness.press(f"rwkv:retry:{GENERAL}", int(reply["id"]), author=TALKER)
    assert harness.adapter.texts()[-1] == ROLE_REFUSED
    assert len(await harness.bot.service.store.transcripts.turns(str(GENERAL))) == 1


async def test_an_allowed_member_may_press_retry_under_an_allow_rule(harness: Harness) -> None:
    """Under an allow rule, Retry by a member of the allowed role is answered: the presser's
    roles count, not those of the reply's author (the bot)."""
    await harness.slash("rwkv-mod", "roles", author=MOD, role=RoleOption(TALKER_ROLE), rule="allow")
    await harness.say("-top_p=0 Hello", author=TALKER)
    reply = harness.http.posted_to(GENERAL)[-1]
    await harness.press(f"rwkv:retry:{GENERAL}", int(reply["id"]), author=TALKER)
    await harness.settle()
    assert ROLE_REFUSED not in harness.http.sent()
    assert [t.command for t in await harness.bot.service.store.transcripts.turns(str(GENERAL))] == [
        "chat",
        "+",
    ]
