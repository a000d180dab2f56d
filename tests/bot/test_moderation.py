"""/rwkv-mod reset, undo-reset, enable, disable, server and faq-reload (bot/cogs/moderation.py): who may use
them, and what they change."""

from __future__ import annotations

from tests.bot.harness import (
    ADMIN,
    ALICE,
    GENERAL,
    GUILD,
    MANAGE_MESSAGES,
    MOD,
    QUIET,
    THREAD,
    Harness,
)


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
        await harness.slash("rwkv" if sub == "settings" else "rwkv-mod", sub, author=ALICE, **options)
        assert "Only " in " ".join(harness.adapter.texts()[-1:]), sub
        assert len(harness.adapter.calls) == before + 1


async def test_reset_and_undo_reset(harness: Harness) -> None:
    """/rwkv-mod reset puts the channel back to the start; /rwkv-mod undo-reset restores it."""
    service = harness.bot.service
    await harness.say("-top_p=0 Remember this")
    before = await service.states.durable(str(GENERAL), "chat")
    await harness.slash("rwkv-mod", "reset", author=MOD)
    after = await service.states.durable(str(GENERAL), "chat")
    assert before is not None and after is not None
    assert not after.logits.equal(before.logits)
    await harness.slash("rwkv-mod", "undo-reset", author=MOD)
    restored = await service.states.durable(str(GENERAL), "chat")
    assert restored is not None and restored.logits.equal(before.logits)
    assert any("Restored 1" in t for t in harness.adapter.texts())


async def test_server_wide_reset(harness: Harness) -> None:
    """scope=server resets every conversation of the server."""
    await harness.say("-top_p=0 Hi", channel=GENERAL)
    await harness.say("-top_p=0 Hi", channel=THREAD)
    await harness.slash("rwkv-mod", "reset", author=ADMIN, scope="server")
    assert any("Reset 2 conversation(s)" in t for t in harness.adapter.texts())


async def test_server_wide_actions_need_manage_server(harness: Harness) -> None:
    """Manage Messages in a channel is not enough to reset, undo or set policy for the whole
    server: those need Manage Server, and a refused one changes nothing."""
    service = harness.bot.service
    await harness.say("-top_p=0 Hi", channel=THREAD)
    before = await service.states.durable(str(THREAD), "chat")
    for sub, options in [
        ("reset", {"scope": "server"}),
        ("undo-reset", {"scope": "server"}),
        ("server", {"reset_policy": "moderators"}),
    ]:
        await harness.slash("rwkv-mod", sub, author=MOD, **options)
        assert "Manage Server" in harness.adapter.texts()[-1], sub
    after = await service.states.durable(str(THREAD), "chat")
    assert before is not None and after is not None and after.logits.equal(before.logits)
    assert await service.store.channels.guild_settings(str(GUILD)) == {}
    await harness.slash("rwkv-mod", "server", author=ADMIN, reset_policy="moderators")
    assert await service.store.channels.guild_settings(str(GUILD)) == {"reset_policy": "moderators"}


async def test_text_reset_follows_the_server_policy(harness: Harness) -> None:
    """With reset_policy=moderators, +reset from a member is refused and from a moderator done."""
    await harness.slash("rwkv-mod", "server", author=ADMIN, reset_policy="moderators")
    await harness.say("+reset", author=ALICE)
    assert "Only moderators can reset" in harness.http.sent()[-1]
    await harness.say("+reset", author=MOD)
    assert harness.http.sent()[-1] == "Chat reset."


async def test_enable_and_disable(harness: Harness) -> None:
    """A moderator enables #quiet; the bot answers there until it is disabled."""
    await harness.slash("rwkv-mod", "enable", author=MOD, channel=QUIET)
    await harness.say("+help", channel=QUIET)
    assert harness.http.posted_to(QUIET)
    await harness.slash("rwkv-mod", "disable", author=MOD, channel=QUIET)
    count = len(harness.http.posted_to(QUIET))
    await harness.say("+help", channel=QUIET)
    assert len(harness.http.posted_to(QUIET)) == count


async def test_disable_in_a_thread_of_an_enabled_channel_stops_the_bot_there(harness: Harness) -> None:
    """/rwkv-mod disable in a thread of an enabled channel really stops the bot there (and after a
    restart); /rwkv-mod enable in the thread brings it back."""
    await harness.slash("rwkv-mod", "disable", author=MOD, channel=THREAD)
    assert "won't answer" in harness.adapter.texts()[-1]
    await harness.say("+help", channel=THREAD)
    assert not harness.http.posted_to(THREAD)
    await harness.say("+help", channel=GENERAL)
    assert harness.http.posted_to(GENERAL)  # the channel itself is still on
    service = harness.bot.service
    assert await service.store.channels.disabled_threads() == {str(THREAD)}
    harness.bot.disabled.clear()
    await harness.bot.setup_hook()  # a restart reads it back
    assert harness.bot.disabled == {THREAD}
    await harness.slash("rwkv-mod", "enable", author=MOD, channel=THREAD)
    await harness.say("+help", channel=THREAD)
    assert harness.http.posted_to(THREAD)
    assert await service.store.channels.disabled_threads() == set()


async def test_members_never_see_the_moderators_group(harness: Harness) -> None:
    """/rwkv-mod asks Discord to show it only to Manage Messages; /rwkv and /faq (help,
    status, stop, ask) carry no such default and are shown to everyone."""
    tree = harness.bot.tree
    payloads = {c.name: c.to_dict(tree) for c in tree.get_commands()}
    assert payloads["rwkv-mod"]["default_member_permissions"] == MANAGE_MESSAGES
    assert payloads["rwkv"]["default_member_permissions"] is None
    assert payloads["faq"]["default_member_permissions"] is None
    members = {o["name"] for o in payloads["rwkv"]["options"]}
    assert {"help", "status", "stop"} <= members
    assert not members & {"reset", "undo-reset", "enable", "disable", "server"}
    assert {o["name"] for o in payloads["faq"]["options"]} == {"ask", "list"}


async def test_enable_tells_the_channel_publicly(harness: Harness) -> None:
    """/rwkv-mod enable says in the channel, for everyone, that the bot now reads every message
    there and how to turn it off."""
    await harness.slash("rwkv-mod", "enable", author=MOD, channel=QUIET)
    notice = harness.http.posted_to(QUIET)[-1]["content"]
    assert "read every message here" in notice and "/rwkv-mod disable" in notice


async def test_persona_set_shown_and_removed(harness: Harness) -> None:
    """A moderator gives the channel a system prompt, sees it, and removes it; the model's
    opening changes with it; members may not."""
    service = harness.bot.service
    await harness.slash("rwkv-mod", "persona", author=ALICE, prompt="You are a pirate.")
    assert "Only moderators" in harness.adapter.texts()[-1]
    await harness.slash("rwkv-mod", "persona", author=MOD, prompt="You are a pirate.")
    assert "Set the system prompt" in harness.adapter.texts()[-1]
    context = await service.context(str(GENERAL))
    assert context.preset.init_prompt.startswith("\nSystem: You are a pirate.\n\nUser:")
    await harness.slash("rwkv-mod", "persona", author=MOD)
    assert "System prompt:\n> You are a pirate." in harness.adapter.texts()[-1]
    await harness.slash("rwkv-mod", "persona", author=MOD, clear=True)
    assert (await service.context(str(GENERAL))).preset == service.presets["g1-chat"]
    await harness.slash("rwkv-mod", "persona", author=MOD)
    assert "No system prompt." in harness.adapter.texts()[-1]
