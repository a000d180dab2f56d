"""Buttons on replies (bot/buttons.py): Stop while writing, Retry and Continue after, one set per
channel, the text commands' rules, and persistence across a restart of the bot."""

from __future__ import annotations

from typing import Any

from tests.bot.harness import ALICE, GENERAL, MOD, Harness, start_long_reply


def custom_ids(message: dict[str, Any]) -> list[str]:
    """The custom ids of a message's buttons, in order."""
    return [c["custom_id"] for row in message.get("components", []) for c in row.get("components", [])]


def last_reply(harness: Harness) -> dict[str, Any]:
    return harness.http.posted_to(GENERAL)[-1]


async def test_a_chat_reply_ends_with_retry_and_a_generation_with_continue(harness: Harness) -> None:
    """A chat reply gets Retry; a free generation gets Retry (++) and Continue (+++)."""
    await harness.say("-top_p=0 Hello")
    assert custom_ids(last_reply(harness)) == [f"rwkv:retry:{GENERAL}"]
    await harness.say("-top_p=0 +gen Once upon a time")
    assert custom_ids(last_reply(harness)) == [f"rwkv:retry-gen:{GENERAL}", f"rwkv:continue:{GENERAL}"]


async def test_stop_shows_while_writing_and_goes_at_the_end(harness: Harness) -> None:
    """The first message of a reply being written has Stop; it goes when the reply ends."""
    task = await start_long_reply(harness, "tell me everything")
    first = harness.http.posted_to(GENERAL)[-1]
    assert custom_ids(first) == [f"rwkv:stop:{GENERAL}"]
    await harness.press(f"rwkv:stop:{GENERAL}", int(first["id"]), author=ALICE)
    await task
    assert "stopped" in harness.http.messages[int(first["id"])]["content"]
    ids = [custom_ids(m) for m in harness.http.posted_to(GENERAL)]
    assert all(f"rwkv:stop:{GENERAL}" not in i for i in ids)
    assert ids[-1] == [f"rwkv:retry:{GENERAL}"]


async def test_stop_button_follows_the_stop_rule(harness: Harness) -> None:
    """Another member's Stop is refused (to them only); a moderator's stops the reply."""
    task = await start_long_reply(harness, "go on")
    first = harness.http.posted_to(GENERAL)[-1]
    generation = next(iter(harness.bot.by_reply.values()))
    await harness.press(f"rwkv:stop:{GENERAL}", int(first["id"]), author=31)
    assert not generation.cancel.is_set()
    assert "or a moderator" in harness.adapter.texts()[-1]
    await harness.press(f"rwkv:stop:{GENERAL}", int(first["id"]), author=MOD)
    assert generation.cancel.is_set()
    await task


async def test_retry_button_is_the_plus_command(harness: Harness) -> None:
    """Retry answers '+' below the reply; the older reply loses its buttons, and pressing them
    anyway is refused."""
    await harness.say("-top_p=0 Hello")
    first = last_reply(harness)
    await harness.press(f"rwkv:retry:{GENERAL}", int(first["id"]))
    turns = await harness.bot.service.store.transcripts.turns(str(GENERAL))
    assert [t.command for t in turns] == ["chat", "+"]
    second = last_reply(harness)
    assert second["id"] != first["id"] and custom_ids(second) == [f"rwkv:retry:{GENERAL}"]
    await harness.settle()
    assert custom_ids(harness.http.messages[int(first["id"])]) == []
    # a member whose client still showed the old buttons when they pressed
    harness.http.messages[int(first["id"])]["components"] = first["components"]
    await harness.press(f"rwkv:retry:{GENERAL}", int(first["id"]))
    assert "newer reply" in harness.adapter.texts()[-1]
    assert len(await harness.bot.service.store.transcripts.turns(str(GENERAL))) == 2


async def test_continue_button_continues_the_generation(harness: Harness) -> None:
    """Continue is '+++': the generation goes on from where it stopped."""
    await harness.say("-top_p=0 +gen The river")
    await harness.press(f"rwkv:continue:{GENERAL}", int(last_reply(harness)["id"]))
    turns = await harness.bot.service.store.transcripts.turns(str(GENERAL))
    assert [t.command for t in turns] == ["+gen", "+++"]


async def test_buttons_work_after_a_restart(harness: Harness) -> None:
    """A Retry pressed after the bot restarted reaches the new bot object through its custom id
    alone, and is answered."""
    await harness.say("-top_p=0 Hello")
    reply = last_reply(harness)
    old_bot = harness.bot
    await harness.restart()
    assert harness.bot is not old_bot
    await harness.press(f"rwkv:retry:{GENERAL}", int(reply["id"]))
    turns = await harness.bot.service.store.transcripts.turns(str(GENERAL))
    assert [t.command for t in turns] == ["chat", "+"]
    assert last_reply(harness)["id"] != reply["id"]


async def test_retry_button_keeps_the_cooldown(harness: Harness) -> None:
    """A press within the member's cooldown is refused with the time left, like a message."""
    await harness.say("-top_p=0 Hello")
    harness.bot.settings = harness.bot.settings.model_copy(update={"user_cooldown": 3600.0})
    await harness.press(f"rwkv:retry:{GENERAL}", int(last_reply(harness)["id"]))
    assert "Please wait" in harness.adapter.texts()[-1]
