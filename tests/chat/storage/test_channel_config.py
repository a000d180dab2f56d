"""Channel and server configuration of every backend: settings, places, enabling."""

from __future__ import annotations

from chat.storage import Storage


async def test_channel_settings_are_replaced_whole(storage: Storage) -> None:
    """A new channel has no settings; setting them replaces the previous ones."""
    channels = storage.channels
    assert await channels.settings("c") == {}
    await channels.set_settings("c", {"temperature": 0.7, "max_tokens": 30})
    await channels.set_settings("c", {"top_p": 0.0})
    assert await channels.settings("c") == {"top_p": 0.0}
    assert await channels.settings("other") == {}


async def test_places_link_threads_and_servers(storage: Storage) -> None:
    """A conversation's server and parent channel are recorded (again: no change)."""
    channels = storage.channels
    assert await channels.threads_of("c") == [] and await channels.guild_channels("g") == []
    await channels.set_place("c", "g", None)
    await channels.set_place("t2", "g", "c")
    await channels.set_place("t1", "g", "c")
    await channels.set_place("t1", "g", "c")
    await channels.set_place("dm", None, None)
    assert await channels.threads_of("c") == ["t1", "t2"]
    assert await channels.guild_channels("g") == ["c", "t1", "t2"]
    await channels.set_place("t2", "h", None)  # moved: the latest place counts
    assert await channels.threads_of("c") == ["t1"] and await channels.guild_channels("h") == ["t2"]


async def test_enabling_and_a_thread_switched_off_on_its_own(storage: Storage) -> None:
    """Enabled channels by server; disabling forgets the row unless it overrides an enabled parent."""
    channels = storage.channels
    await channels.set_enabled("c1", "g", True, "mod")
    await channels.set_enabled("c2", "h", True, "mod")
    await channels.set_enabled("t", "g", False, "mod", override=True)
    assert await channels.enabled() == {"c1", "c2"}
    assert await channels.enabled("g") == {"c1"}
    assert await channels.disabled_threads() == {"t"}
    await channels.set_enabled("t", "g", True, "mod")
    assert await channels.disabled_threads() == set() and await channels.enabled("g") == {"c1", "t"}
    await channels.set_enabled("c1", "g", False, "mod")
    await channels.set_enabled("t", "g", False, "mod")
    assert await channels.enabled() == {"c2"} and await channels.disabled_threads() == set()
    assert (await storage.admin.stats())["enabled_channels"] == 1


async def test_server_settings_and_forgetting_a_server(storage: Storage) -> None:
    """A server's own settings are replaced whole, and forgotten with the server."""
    channels = storage.channels
    assert await channels.guild_settings("g") == {}
    await channels.set_guild_settings("g", {"reset_policy": "moderators"})
    await channels.set_guild_settings("h", {"reset_policy": "anyone"})
    assert await channels.guild_settings("g") == {"reset_policy": "moderators"}
    await channels.forget_guild("g")
    assert await channels.guild_settings("g") == {}
    assert await channels.guild_settings("h") == {"reset_policy": "anyone"}
