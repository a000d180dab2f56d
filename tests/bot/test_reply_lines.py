"""Each conversation's line (bot/lines.py): the queue limit, arrival order, cooldowns, stopping a
reply, shutdown with replies in flight or waiting, and Discord's pace of writes under load."""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any

from discord.http import Route

from tests.bot.harness import (
    ALICE,
    GENERAL,
    MOD,
    MOD_ROLE,
    QUIET,
    THREAD,
    Harness,
    long_replies,
    react,
    start_long_reply,
)


async def test_queue_and_refusal_when_full(harness: Harness) -> None:
    """While a reply is written, one more message waits (marked with a reaction); the next is refused."""
    service = harness.bot.service
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
    assert [t.user_text for t in await service.store.transcripts.turns(str(GENERAL))] == [
        "a long answer please",
        "second",
    ]


async def test_simultaneous_messages_respect_the_queue_limit(harness: Harness) -> None:
    """Messages arriving together are counted before any of them is answered."""
    harness.bot.settings = harness.bot.settings.model_copy(update={"max_queue": 0})
    await asyncio.gather(*(harness.say(f"-top_p=0 hello {i}", author=10 + i) for i in range(3)))
    await harness.settle()
    service = harness.bot.service
    assert len(await service.store.transcripts.turns(str(GENERAL))) == 1
    assert sum("still answering" in text for text in harness.http.sent()) == 2


async def test_messages_are_answered_and_stored_in_arrival_order(harness: Harness) -> None:
    """A question (which the FAQ check reads the database for) sent just before two statements
    is answered and stored first: a message takes its place in the channel's line on arrival."""
    harness.bot.settings = harness.bot.settings.model_copy(update={"max_queue": 3})
    await harness.slash("rwkv", "settings", author=MOD, faq_auto=True)
    texts = ["-top_p=0 what is your favourite colour?", "-top_p=0 I like blue.", "-top_p=0 And green."]
    await asyncio.gather(*(harness.say(text, author=30 + i) for i, text in enumerate(texts)))
    service = harness.bot.service
    stored = [t.user_text for t in await service.store.transcripts.turns(str(GENERAL))]
    assert stored == [t.removeprefix("-top_p=0 ") for t in texts]


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


async def test_cooldown_notice_says_the_time_left(harness: Harness) -> None:
    """The reminder rounds the time left up (0.4 s left says 1 s, not 0 s)."""
    harness.bot.settings = harness.bot.settings.model_copy(update={"user_cooldown": 30.0})
    harness.bot.last_message_at[ALICE] = harness.clock.now - 29.5  # the clock's next look adds 0.2
    await harness.say("+help", author=ALICE)
    await harness.settle()
    assert "Please wait 1 s" in harness.http.sent()[-1]


async def test_stop_reaction_and_command(harness: Harness) -> None:
    """/rwkv stop or a stop reaction ends the reply early; what was written is kept."""
    service = harness.bot.service
    task = await start_long_reply(harness, "go on and on")
    await harness.slash("rwkv", "stop", author=ALICE)
    await task
    turns = await service.store.transcripts.turns(str(GENERAL))
    assert len(turns) == 1 and turns[0].reply_tokens < 900
    assert "stopped" in harness.http.posted_to(GENERAL)[-1]["content"]

    task = await start_long_reply(harness, "again")
    reply_id = next(iter(harness.bot.by_reply))
    await react(harness, reply_id, ALICE, GENERAL)
    await task
    assert "stopped" in harness.http.posted_to(GENERAL)[-1]["content"]
    assert len(await service.store.transcripts.turns(str(GENERAL))) == 2


async def test_one_rule_for_who_may_stop_a_reply(harness: Harness) -> None:
    """/rwkv stop by another member is refused with a reason; a moderator's stops the reply."""
    task = await start_long_reply(harness, "keep going")
    generation = next(iter(harness.bot.by_reply.values()))
    await harness.slash("rwkv", "stop", author=31)
    assert not generation.cancel.is_set()
    assert "asked for this reply, or a moderator" in harness.adapter.texts()[-1]
    await harness.slash("rwkv", "stop", author=MOD)
    assert generation.cancel.is_set() and harness.adapter.texts()[-1] == "Stopping the reply."
    await task


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
    task = asyncio.ensure_future(harness.say("+gen " + "a long prompt " * 600))
    while not harness.bot.lines.running():
        await asyncio.sleep(0.001)
    assert harness.bot.stop(str(GENERAL))
    await task
    assert await service.store.transcripts.turns(str(GENERAL)) == []


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


async def test_shutdown_cuts_a_reply_in_flight(harness: Harness) -> None:
    """Closing the bot during a reply ends it with an interruption note and stores the turn."""
    service = harness.bot.service
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


async def test_edits_keep_discord_s_pace_per_channel_across_replies(harness: Harness) -> None:
    """Three members posting at once in several channels, two rounds, long streamed replies:
    every channel's writes (sends and edits, final ones included) stay at least a second apart
    and at most five in five seconds, across replies."""
    long_replies(harness)
    service = harness.bot.service
    service.config = service.config.__class__(**{**service.config.__dict__, "chat_max_tokens": 120})
    harness.bot.settings = harness.bot.settings.model_copy(update={"max_queue": 3})
    channels = [GENERAL, QUIET]
    await harness.slash("rwkv-mod", "enable", author=MOD, channel=QUIET)
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
