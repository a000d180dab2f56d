"""The bot's lifecycle and the events of channels and servers (bot/client.py): reconnects, deleted
threads and channels, and being removed from a server."""

from __future__ import annotations

import discord
import pytest

from chat.errors import StoreError
from tests.bot.harness import (
    BOT_ID,
    GENERAL,
    GUILD,
    MOD,
    QUIET,
    THREAD,
    Harness,
    wait_for,
)


async def test_on_ready_again_does_not_set_up_again(harness: Harness) -> None:
    """A reconnect's on_ready leaves the service and the enabled channels as they were."""
    service, enabled = harness.bot.service, set(harness.bot.enabled)
    await harness.bot.on_ready()
    await harness.bot.on_ready()
    assert harness.bot.service is service and harness.bot.enabled == enabled


async def test_deleted_threads_and_channels_are_purged(harness: Harness) -> None:
    """Deleting a thread or a channel on Discord deletes its stored conversation and transcript."""
    service = harness.bot.service
    await harness.say("-top_p=0 Hi", channel=GENERAL)
    await harness.say("-top_p=0 Hi", channel=THREAD)

    async def gone(channel: int) -> bool:
        return not await service.store.transcripts.turns(
            str(channel)
        ) and not await service.store.states.heads(str(channel))

    harness.state.parse_thread_delete(
        {"id": str(THREAD), "guild_id": str(GUILD), "parent_id": str(GENERAL), "type": 11}
    )
    await wait_for(lambda: gone(THREAD))
    assert not await gone(GENERAL)
    harness.state.parse_channel_delete({"id": str(GENERAL), "guild_id": str(GUILD), "type": 0})
    await wait_for(lambda: gone(GENERAL))
    assert GENERAL not in harness.bot.enabled
    assert str(GENERAL) not in await service.store.channels.enabled()


async def test_a_deleted_channel_takes_its_archived_threads_with_it(harness: Harness) -> None:
    """A thread discord.py no longer holds (archived) is purged with its channel all the same."""
    service = harness.bot.service
    await harness.say("-top_p=0 Hi", channel=GENERAL)
    await harness.say("-top_p=0 Hi", channel=THREAD)
    await harness.say(f"<@{BOT_ID}> -top_p=0 Hi", channel=QUIET, mentions=[BOT_ID])
    assert await service.store.channels.threads_of(str(GENERAL)) == [str(THREAD)]
    guild = harness.bot.get_guild(GUILD)
    assert guild is not None
    guild._remove_thread(discord.Object(THREAD))  # archived: out of discord.py's cache

    async def gone(channel: int) -> bool:
        return not await service.store.transcripts.turns(str(channel))

    harness.state.parse_channel_delete({"id": str(GENERAL), "guild_id": str(GUILD), "type": 0})
    await wait_for(lambda: gone(THREAD))
    await wait_for(lambda: gone(GENERAL))
    assert not await gone(QUIET)
    assert await service.store.channels.threads_of(str(GENERAL)) == []


async def test_a_thread_enabled_or_set_but_silent_goes_with_its_channel(harness: Harness) -> None:
    """A thread given settings or enabled by a moderator, where nobody talked, is purged with its
    channel (discord.py may no longer hold it, if it was archived)."""
    service = harness.bot.service
    await harness.slash("rwkv", "settings", author=MOD, channel=THREAD, temperature=0.5)
    await harness.slash("rwkv-mod", "enable", author=MOD, channel=THREAD)
    assert await service.store.channels.settings(str(THREAD)) == {"temperature": 0.5}
    assert str(THREAD) in await service.store.channels.enabled()
    assert await service.store.channels.threads_of(str(GENERAL)) == [str(THREAD)]
    guild = harness.bot.get_guild(GUILD)
    assert guild is not None
    guild._remove_thread(discord.Object(THREAD))
    harness.state.parse_channel_delete({"id": str(GENERAL), "guild_id": str(GUILD), "type": 0})

    async def gone() -> bool:
        return str(THREAD) not in await service.store.channels.enabled()

    await wait_for(gone)
    assert await service.store.channels.settings(str(THREAD)) == {}
    assert THREAD not in harness.bot.enabled


async def test_a_purge_that_fails_does_not_stop_the_others(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a thread's purge fails (say the database is busy), the channel is purged all the same."""
    service = harness.bot.service
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
        return not await service.store.transcripts.turns(str(GENERAL))

    await wait_for(general_gone)
    assert await service.store.transcripts.turns(str(THREAD))  # its purge failed (and was logged)


async def test_removed_from_a_server_forgets_its_conversations(harness: Harness) -> None:
    """When the bot is removed from a server, its conversations and settings are purged."""
    service = harness.bot.service
    await harness.say("-top_p=0 Hi", channel=GENERAL)
    await service.store.channels.set_guild_settings(str(GUILD), {"reset_policy": "moderators"})

    async def forgotten() -> bool:
        return (
            not await service.store.transcripts.turns(str(GENERAL))
            and not await service.store.channels.guild_settings(str(GUILD))
            and not await service.store.channels.enabled()
        )

    harness.state.parse_guild_delete({"id": str(GUILD)})
    await wait_for(forgotten)
    assert GENERAL not in harness.bot.enabled
