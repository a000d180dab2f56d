"""The REST budget a bot token's writes share (bot/limits.py): at most ``rate`` writes in any
second, final texts and new messages first, streamed edits only while there is room; and the
identify slots of the gateway's buckets."""

from __future__ import annotations

import asyncio
import random
import time

from bot.limits import IdentifySchedule, LocalLimits, RestWindow
from bot.streaming import WRITING_MARK, ChannelPacer, ReplyStream
from tests.bot.harness import GENERAL, Harness


def most_in_any_span(times: list[float], span: float) -> int:
    """The most of ``times`` that fall in any half-open span of ``span`` seconds."""
    times = sorted(times)
    most, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] >= span:
            first += 1
        most = max(most, last - first + 1)
    return most


def test_reserved_writes_never_exceed_the_rate_and_keep_their_order() -> None:
    """Writes asked for at random moments are given moments in order, at most ``rate`` in any
    second, and none before it was asked for."""
    window = RestWindow(10)
    rng = random.Random(4)
    now, given = 0.0, []
    for _ in range(300):
        now += rng.expovariate(30.0)  # three times what the budget allows
        given.append(now + window.reserve(now))
    assert given == sorted(given)
    assert most_in_any_span(given, 1.0) == 10
    assert given[-1] >= 300 / 10 - 1  # the budget's pace, not more


def test_streamed_edits_leave_room_and_yield_to_waiting_writes() -> None:
    """Streamed edits take at most their share of a second's budget, and none while a final
    write waits for its moment."""
    window = RestWindow(10)
    taken = sum(window.try_take(0.0) for _ in range(20))
    assert taken == 8  # 80 %: two writes a second stay free for final texts
    assert window.reserve(0.0) == 0.0 and window.reserve(0.0) == 0.0
    assert window.reserve(0.0) > 0.9  # the budget is spent: the next waits for the second to pass
    assert not window.try_take(1.0)  # a final write is still waiting: streamed edits hold back
    assert window.try_take(2.5)  # all gone out, a second later: room again


def test_identify_slots_are_per_bucket() -> None:
    """One IDENTIFY per 5 seconds in each bucket; other buckets do not wait."""
    schedule = IdentifySchedule(5.0)
    assert schedule.reserve(0, 100.0) == 0.0
    assert schedule.reserve(1, 100.0) == 0.0
    assert schedule.reserve(0, 101.0) == 4.0
    assert schedule.reserve(0, 101.0) == 9.0
    assert schedule.reserve(1, 106.0) == 0.0


async def test_a_hundred_streams_stay_within_the_budget(harness: Harness) -> None:
    """A hundred replies streaming at once, each in its own channel, through one budget of 30
    writes a second: Discord never gets more than 30 calls in a second (measured on a span a
    little shorter, for the event loop's lateness), streamed edits thin out, and every final text
    arrives whole."""
    rate = 30
    limits = LocalLimits(rate)
    channels = range(5000, 5100)
    streams = [
        ReplyStream(
            harness.message("hi", channel=channel, guild=False),
            pacer=ChannelPacer(1.0, budget=limits),
        )
        for channel in channels
    ]

    async def write(index: int, stream: ReplyStream) -> None:
        started = time.monotonic()
        word = 0
        while time.monotonic() - started < 1.5:
            await stream.push(f"word{index}-{word} ")
            word += 1
            await asyncio.sleep(0.05)
        await stream.finish()

    started = time.monotonic()
    await asyncio.gather(*(write(i, s) for i, s in enumerate(streams)))
    took = time.monotonic() - started
    assert most_in_any_span(harness.http.times, 0.9) <= rate
    for stream, channel in zip(streams, channels, strict=True):
        (message,) = harness.http.posted_to(channel)
        assert message["content"] == stream.text.strip() and WRITING_MARK not in message["content"]
    # Each final text, and the streamed writes the budget had room for, at the budget's pace.
    assert 100 < len(harness.http.calls) <= rate * took + rate


async def test_a_reply_arrives_whole_when_the_budget_has_no_room_for_edits(harness: Harness) -> None:
    """With a budget too small for streamed edits (1 write a second), a chat reply is not shown
    while it is written (no typing, no partial text) and arrives whole in one message."""
    harness.bot.limits = LocalLimits(1, clock=harness.clock, sleep=harness.clock.sleep)
    harness.bot.pacers.clear()
    await harness.say("-top_p=0 Tell me about rivers")
    methods = [(method, path) for method, path, _ in harness.http.calls]
    assert methods == [("POST", "/channels/{channel_id}/messages")]
    (reply,) = harness.http.posted_to(GENERAL)
    assert reply["content"].strip() and WRITING_MARK not in reply["content"]
