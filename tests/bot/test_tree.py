"""The command tree's one error handler (bot/tree.py): a refusal or a failure is answered in one
line to the member, whether the command had answered, deferred or neither, and a failure is
logged."""

from __future__ import annotations

import pytest
from discord import app_commands

from chat.errors import StoreError
from tests.bot.harness import ADMIN, ALICE, Harness

EPHEMERAL = 1 << 6


async def test_a_database_error_after_defer_is_answered_in_one_line(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A StoreError after defer() ends "thinking..." with one line saying what went wrong."""

    async def full(guild_id: str, policy: str) -> None:
        raise StoreError("the disk is full")

    monkeypatch.setattr(harness.bot.service, "set_reset_policy", full)
    await harness.slash("rwkv-mod", "server", author=ADMIN, reset_policy="moderators")
    deferred, answer = harness.adapter.calls[-2:]
    assert deferred[1].endswith("/callback") and deferred[2]["type"] == 5  # deferred, "thinking..."
    assert (
        answer[0] == "POST" and answer[2]["content"] == "Sorry, this could not be saved (the disk is full)."
    )
    assert answer[2]["flags"] & EPHEMERAL
    assert [type(e) for e in harness.errors] == [app_commands.CommandInvokeError]
    harness.errors.clear()
    assert "the command /rwkv-mod server failed" in caplog.text


async def test_a_failure_before_any_answer_is_answered_in_one_line(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A command that fails before answering gets the generic line as its response, and the
    traceback goes to the log."""

    async def broken(channel_id: str) -> dict[str, object]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(harness.bot.service, "channel_settings", broken)
    before = len(harness.adapter.calls)
    await harness.slash("rwkv", "settings")
    assert len(harness.adapter.calls) == before + 1
    (_, path, body) = harness.adapter.calls[-1]
    assert path.endswith("/callback") and body["data"]["flags"] & EPHEMERAL
    assert body["data"]["content"] == "Sorry, something went wrong on my side. Nothing was changed."
    harness.errors.clear()
    assert "RuntimeError: a bug" in caplog.text


async def test_a_refusal_is_answered_and_not_logged_as_an_error(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """A member without the permission gets the refusal as the response; nothing is logged."""
    await harness.slash("rwkv-mod", "reset", author=ALICE)
    assert harness.adapter.texts()[-1] == "Only moderators (Manage Messages) can do that here."
    assert "failed" not in caplog.text
