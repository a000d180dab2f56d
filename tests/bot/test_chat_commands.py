"""/rwkv settings, status and help (bot/cogs/chat.py)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.bot.harness import (
    ALICE,
    GENERAL,
    MOD,
    Harness,
)


def _options(harness: Harness, sub: str) -> dict[str, dict[str, Any]]:
    """The options of ``/rwkv <sub>`` as they are synced to Discord."""
    group = harness.bot.tree.get_command("rwkv")
    assert group is not None
    (command,) = [c for c in group.to_dict(harness.bot.tree)["options"] if c["name"] == sub]
    return {option["name"]: option for option in command["options"]}


async def test_settings_offer_the_ranges_the_service_accepts(harness: Harness) -> None:
    """/rwkv settings offers max_tokens up to the service's cap (chat_max_tokens, 40 here) and the
    sampling ranges the service publishes, as Discord receives them."""
    limits = harness.bot.service.limits
    options = _options(harness, "settings")
    assert options["max_tokens"]["max_value"] == limits.max_tokens == 40
    assert options["max_tokens"]["min_value"] == 1
    for name, (low, high) in limits.ranges.items():
        assert (options[name]["min_value"], options[name]["max_value"]) == (low, high), name
    assert options["temperature"]["type"] == 10 and options["max_tokens"]["type"] == 4  # number, integer


async def test_settings_command_validates_and_stores(harness: Harness) -> None:
    """A moderator sets this channel's sampling; an unknown preset is refused."""
    await harness.slash("rwkv", "settings", author=MOD, temperature=0.7, max_tokens=30)
    assert any("Set temperature 0.7, max_tokens 30" in t for t in harness.adapter.texts())
    await harness.slash("rwkv", "settings", author=MOD, preset="no-such-preset")
    assert any("Nothing was changed" in t for t in harness.adapter.texts())
    service = harness.bot.service
    assert await service.store.channels.settings(str(GENERAL)) == {"temperature": 0.7, "max_tokens": 30}


async def test_status_shows_engine_numbers(harness: Harness) -> None:
    """/rwkv status answers a moderator with the model, queues and the engine's numbers."""
    await harness.say("-top_p=0 hi")
    await harness.slash("rwkv", "status", author=MOD)
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
    monkeypatch.setattr(harness.bot.service.states.tiers, "device_usage", lambda: {"cuda:1": 3 * 2**20})
    await harness.slash("rwkv", "status", author=MOD)
    status = harness.adapter.texts()[-1]
    assert "cuda:0: batch 7, 20 resident, 1 queued, 3210 tokens/s, 0 MB of states" in status
    assert "cuda:1: batch 2, 20 resident, 1 queued, 3210 tokens/s, 3 MB of states" in status
    assert harness.bot.device_metrics()["cuda:1"]["states_bytes"] == 3 * 2**20
    assert "channels on the 2 devices (" in status and " MB on each)" in status


async def test_members_see_a_short_status(harness: Harness) -> None:
    """A member's /rwkv status is one friendly line: the model and how busy it is, no engine
    figures."""
    await harness.slash("rwkv", "status", author=ALICE)
    status = harness.adapter.texts()[-1]
    assert status.startswith("I'm running RWKV-7") and "free" in status
    assert "States:" not in status and "Engine:" not in status and "\n" not in status


async def test_help_covers_buttons_reactions_and_slash_commands(harness: Harness) -> None:
    """/rwkv help and +help both explain the grammar, the buttons, the stop reaction and the
    slash commands."""
    await harness.slash("rwkv", "help")
    await harness.say("+help")
    for text in (harness.adapter.texts()[-1], harness.http.sent()[-1]):
        assert "How to talk to me" in text and "Retry" in text and "Continue" in text
        assert "⏹️" in text and "/rwkv status" in text and "/rwkv-mod" in text
