"""Streamed replies (bot/streaming.py): the edit throttle, the first phrase, the writing mark, a
clear end, and how <think> sections are shown."""

from __future__ import annotations

import pytest

from bot.streaming import WRITING_MARK, ChannelPacer, ReplyStream, is_phrase, render_thinking
from tests.bot.harness import (
    GENERAL,
    MOD,
    Harness,
)


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
    settings = await service.store.channels.settings(str(GENERAL))
    stream = ReplyStream(reply_to, thinking=str(settings["thinking"]))
    await stream.push("<think>secret plan</think>The answer.")
    await stream.finish()
    assert harness.http.posted_to(GENERAL)[-1]["content"] == "The answer."


async def test_first_message_waits_for_a_phrase_and_shows_writing(harness: Harness) -> None:
    """No message for a lone word; the first one comes with a phrase and says it is still being
    written; the final edit drops the mark."""
    now = {"t": 0.0}
    pacer = ChannelPacer(1.0, clock=lambda: now["t"])
    stream = ReplyStream(harness.message("hi"), interval=1.0, clock=lambda: now["t"], pacer=pacer)
    now["t"] += 2
    await stream.push("W")
    assert harness.http.posted_to(GENERAL) == []
    now["t"] += 2
    await stream.push("ell, here is")
    assert harness.http.posted_to(GENERAL) == []
    now["t"] += 2
    await stream.push(" my answer")
    first = harness.http.posted_to(GENERAL)[-1]["content"]
    assert first == f"Well, here is my answer\n{WRITING_MARK}"
    now["t"] += 2
    await stream.finish()
    assert harness.http.posted_to(GENERAL)[-1]["content"] == "Well, here is my answer"


async def test_a_reply_cut_at_the_length_limit_says_so(harness: Harness) -> None:
    """A chat reply that reached its token limit ends with a line saying it was cut."""
    await harness.slash("rwkv", "settings", author=MOD, max_tokens=3)
    await harness.say("-top_p=0 Tell me a long story about a river")
    last = harness.http.posted_to(GENERAL)[-1]["content"]
    assert last.endswith("*(cut: the reply reached its length limit)*")
    assert WRITING_MARK not in last


@pytest.mark.parametrize(
    ("text", "phrase"),
    [("W", False), ("Well", False), ("Well, I", False), ("Well, I think so", True), ("Yes\nand", True)],
)
def test_what_counts_as_a_phrase(text: str, phrase: bool) -> None:
    """A few words or a line break make a phrase; a lone word does not."""
    assert is_phrase(text) is phrase
