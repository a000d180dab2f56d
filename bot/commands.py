"""Slash commands: ``/rwkv ...`` for the chat, and ``/faq`` for the knowledge base.

Moderator commands check Manage Messages when they run: Discord's default permissions are only
a hint that server admins can change, and they cannot be set per subcommand.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import discord
from discord import app_commands

from bot.streaming import NO_MENTIONS
from chat.grammar import HELP_TEXT
from chat.states import MB
from chat.store import StoreError
from faq import Topic, render_embed, render_miss, render_topic_list

if TYPE_CHECKING:
    from bot.client import RwkvBot

Scope = Literal["channel", "server"]


def _is_moderator(interaction: discord.Interaction) -> bool:
    if interaction.guild is None:  # a DM is the user's own conversation
        return True
    return bool(interaction.permissions.manage_messages)


def _is_server_manager(interaction: discord.Interaction) -> bool:
    """Server-wide changes need Manage Server in the server itself (not a channel's overwrite)."""
    if interaction.guild is None:
        return True
    member = interaction.user
    return isinstance(member, discord.Member) and member.guild_permissions.manage_guild


async def _refuse(interaction: discord.Interaction) -> None:
    await interaction.response.send_message(
        "Only moderators (Manage Messages) can do that here.", ephemeral=True
    )


async def _refuse_server_wide(interaction: discord.Interaction) -> None:
    await interaction.response.send_message(
        "Only members with Manage Server can change things for the whole server.", ephemeral=True
    )


Handler = TypeVar("Handler", bound=Callable[..., Coroutine[Any, Any, None]])


def moderators_only(handler: Handler) -> Handler:
    """Refuse the command, at run time, to members without Manage Messages."""

    @functools.wraps(handler)
    async def checked(interaction: discord.Interaction, *args: Any, **kwargs: Any) -> None:
        if not _is_moderator(interaction):
            await _refuse(interaction)
            return
        await handler(interaction, *args, **kwargs)

    return cast(Handler, checked)


def _key(interaction: discord.Interaction) -> str:
    return str(interaction.channel_id)


async def _record_thread(bot: RwkvBot, interaction: discord.Interaction) -> None:
    """In a thread, record its channel, so that what is stored for the thread (its enabling, its
    settings) is purged with the channel even if the thread never talks."""
    thread = interaction.channel
    if isinstance(thread, discord.Thread) and interaction.guild_id is not None and bot.service is not None:
        await bot.service.record_place(str(thread.id), str(interaction.guild_id), str(thread.parent_id))


def faq_embed(topic: Topic) -> discord.Embed:
    """A FAQ topic as an embed (title, answer, links), within Discord's embed limits."""
    data = render_embed(topic)
    embed = discord.Embed(title=data["title"], description=data["description"], url=data["url"])
    for item in data["fields"]:
        embed.add_field(name=item["name"], value=item["value"], inline=item["inline"])
    return embed


def register_commands(bot: RwkvBot) -> None:
    """Add the ``/rwkv`` group and ``/faq`` to the bot's command tree."""
    group = app_commands.Group(name="rwkv", description="Chat with the RWKV language model")

    @group.command(name="help", description="How to talk to the bot")
    async def help_command(interaction: discord.Interaction) -> None:
        await interaction.response.send_message(HELP_TEXT, ephemeral=True)

    @group.command(name="status", description="Model, queue and speed")
    async def status(interaction: discord.Interaction) -> None:
        waiting = sum(bot.pending.values()) - len(bot.running)
        lines = [
            f"Model: {bot.engine.describe()}",
            f"Replies being written: {len(bot.running)}, waiting: {waiting}",
            f"Speed (recent replies): {bot.tokens_per_second():.1f} tokens/s",
            f"Channels enabled: {len(bot.enabled)}",
        ]
        metrics = bot.engine.metrics()
        if metrics:
            lines.append("Engine: " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(metrics.items())))
        devices = bot.device_metrics()
        for device, numbers in sorted(devices.items()):
            lines.append(
                f"{device}: batch {numbers['batch']:.0f}, {numbers['resident']:.0f} resident, "
                f"{numbers['queue']:.0f} queued, {numbers['tokens_per_s']:.0f} tokens/s, "
                f"{numbers.get('states_bytes', 0) / MB:.0f} MB of states"
            )
        if bot.service is not None:
            tiers = bot.service.state_metrics()
            budget = f"{tiers['device_budget_bytes'] / MB:.0f} MB" + (" on each" if devices else "")
            lines.append(
                f"States: {tiers['device_channels']} channels on the "
                f"{f'{len(devices)} devices' if devices else 'device'} "
                f"({tiers['device_bytes'] / MB:.0f} MB, at most {budget}), "
                f"{tiers['host_channels']} in host memory "
                f"({tiers['host_bytes'] / MB:.0f} of {tiers['host_budget_bytes'] / MB:.0f} MB), "
                f"{tiers['restored']} restored from the database"
            )
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    @group.command(name="stop", description="Stop the reply being written in this channel")
    async def stop(interaction: discord.Interaction) -> None:
        stopped = bot.stop(_key(interaction))
        text = "Stopping the reply." if stopped else "No reply is being written here."
        await interaction.response.send_message(text, ephemeral=True)

    @group.command(name="settings", description="Show or change this channel's chat settings")
    @app_commands.describe(
        temperature="0.2 to 5 (higher: more varied)",
        top_p="0 to 1 (0: always the likeliest word)",
        presence_penalty="0 to 2: discourages repeating any word",
        frequency_penalty="0 to 2: discourages repeating a word often",
        max_tokens="the longest reply, in tokens",
        preset="the prompt preset (changing it starts the conversation afresh)",
        thinking="how <think> sections are shown",
        faq_auto="answer questions that match an FAQ topic well from the FAQ, before the model",
    )
    async def settings_command(  # noqa: PLR0917 (one parameter per slash-command option)
        interaction: discord.Interaction,
        temperature: app_commands.Range[float, 0.2, 5.0] | None = None,
        top_p: app_commands.Range[float, 0.0, 1.0] | None = None,
        presence_penalty: app_commands.Range[float, 0.0, 2.0] | None = None,
        frequency_penalty: app_commands.Range[float, 0.0, 2.0] | None = None,
        max_tokens: app_commands.Range[int, 1, 4096] | None = None,
        preset: str | None = None,
        thinking: Literal["fold", "show", "hide"] | None = None,
        faq_auto: bool | None = None,
    ) -> None:
        assert bot.service is not None
        values = {
            "temperature": temperature,
            "top_p": top_p,
            "presence_penalty": presence_penalty,
            "frequency_penalty": frequency_penalty,
            "max_tokens": max_tokens,
            "preset": preset,
            "thinking": thinking,
            "faq_auto": faq_auto,
        }
        if all(v is None for v in values.values()):
            current = await bot.service.channel_settings(_key(interaction))
            shown = ", ".join(f"{k} {v}" for k, v in sorted(current.items())) or "the defaults"
            await interaction.response.send_message(f"This channel uses {shown}.", ephemeral=True)
            return
        if not _is_moderator(interaction):
            await _refuse(interaction)
            return
        await interaction.response.defer(ephemeral=True)
        try:
            await _record_thread(bot, interaction)
            changes = await bot.service.update_settings(_key(interaction), **values)
        except (ValueError, StoreError) as exc:
            await interaction.followup.send(f"Nothing was changed: {exc}.", ephemeral=True)
            return
        await interaction.followup.send("Set " + ", ".join(changes) + ".", ephemeral=True)

    @settings_command.autocomplete("preset")
    async def preset_names(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        assert bot.service is not None
        names = [n for n in sorted(bot.service.presets) if current.lower() in n]
        return [app_commands.Choice(name=n, value=n) for n in names[:25]]

    @group.command(
        name="reset", description="Moderators: reset this channel's (or every channel's) conversation"
    )
    @moderators_only
    async def reset(interaction: discord.Interaction, scope: Scope = "channel") -> None:
        assert bot.service is not None
        if scope == "server" and not _is_server_manager(interaction):
            await _refuse_server_wide(interaction)
            return
        await interaction.response.defer(ephemeral=True)
        keys = await _scope_keys(bot, interaction, scope)
        for key in keys:  # stop everything first, so no channel waits for another's reply
            bot.stop(key, waiting_too=True)
        for key in keys:
            await bot.service.reset(key)
        await interaction.followup.send(
            f"Reset {len(keys)} conversation(s). `/rwkv undo-reset` brings them back.", ephemeral=True
        )
        if scope == "channel" and isinstance(interaction.channel, discord.abc.Messageable):
            with contextlib.suppress(discord.HTTPException):  # the reset is done; the note is a courtesy
                await interaction.channel.send("Chat reset by a moderator.", allowed_mentions=NO_MENTIONS)

    @group.command(
        name="undo-reset", description="Moderators: bring back the conversation of before the last reset"
    )
    @moderators_only
    async def undo_reset(interaction: discord.Interaction, scope: Scope = "channel") -> None:
        assert bot.service is not None
        if scope == "server" and not _is_server_manager(interaction):
            await _refuse_server_wide(interaction)
            return
        await interaction.response.defer(ephemeral=True)
        restored = 0
        for key in await _scope_keys(bot, interaction, scope):
            restored += await bot.service.undo_reset(key)
        text = f"Restored {restored} conversation(s)." if restored else "There is no reset to undo."
        await interaction.followup.send(text, ephemeral=True)

    @group.command(name="enable", description="Moderators: let the bot answer every message in this channel")
    @app_commands.guild_only()
    async def enable(interaction: discord.Interaction) -> None:
        await _set_enabled(bot, interaction, True)

    @group.command(name="disable", description="Moderators: stop answering in this channel")
    @app_commands.guild_only()
    async def disable(interaction: discord.Interaction) -> None:
        await _set_enabled(bot, interaction, False)

    @group.command(name="server", description="Server managers: who may use +reset in this server")
    @app_commands.guild_only()
    async def server(
        interaction: discord.Interaction, reset_policy: Literal["everyone", "moderators"]
    ) -> None:
        if interaction.guild_id is None or not _is_server_manager(interaction):
            await _refuse_server_wide(interaction)
            return
        assert bot.service is not None
        await interaction.response.defer(ephemeral=True)
        await bot.service.set_reset_policy(str(interaction.guild_id), reset_policy)
        await interaction.followup.send(f"+reset is now for {reset_policy}.", ephemeral=True)

    faq = app_commands.Group(name="faq", description="Answers to common RWKV questions")

    @faq.command(name="ask", description="Look up the RWKV FAQ")
    @app_commands.describe(question="a topic, or your question in your own words")
    async def faq_ask(interaction: discord.Interaction, question: str) -> None:
        assert bot.faq is not None
        found = bot.faq.lookup(question)
        if found.answer is None:  # the two tied topics, or the closest ones, to ask again with
            text = render_miss(question, found)
            await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NO_MENTIONS)
            return
        await interaction.response.send_message(
            embed=faq_embed(found.answer.topic), allowed_mentions=NO_MENTIONS
        )

    @faq.command(name="list", description="List the RWKV FAQ topics")
    async def faq_list(interaction: discord.Interaction) -> None:
        assert bot.faq is not None
        text = render_topic_list(bot.faq.topics)
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NO_MENTIONS)

    @faq_ask.autocomplete("question")
    async def faq_titles(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        assert bot.faq is not None
        return [
            app_commands.Choice(name=t.title[:100], value=t.title[:100])
            for t in bot.faq.autocomplete(current)
        ]

    @faq.command(
        name="reload", description="Moderators: reload the FAQ topics (bundled and the operator's folder)"
    )
    @moderators_only
    async def faq_reload(interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True)
        problems = await bot.reload_faq()
        assert bot.faq is not None
        text = f"Loaded {len(bot.faq.topics)} FAQ topics."
        if problems:
            text += " Skipped:\n" + "\n".join(f"- {p}" for p in problems[:10])
        await interaction.followup.send(text[:2000], ephemeral=True)

    bot.tree.add_command(group)
    bot.tree.add_command(faq)


async def _scope_keys(bot: RwkvBot, interaction: discord.Interaction, scope: Scope) -> list[str]:
    assert bot.service is not None
    if scope == "server" and interaction.guild_id is not None:
        keys = await bot.service.server_channels(str(interaction.guild_id))
        return keys or [_key(interaction)]
    return [_key(interaction)]


async def _set_enabled(bot: RwkvBot, interaction: discord.Interaction, enabled: bool) -> None:
    if not _is_moderator(interaction) or interaction.guild_id is None or interaction.channel_id is None:
        await _refuse(interaction)
        return
    assert bot.service is not None
    await interaction.response.defer(ephemeral=True)
    channel = interaction.channel
    parent = channel.parent_id if isinstance(channel, discord.Thread) else None
    override = await bot.service.set_enabled(
        str(interaction.channel_id),
        str(interaction.guild_id),
        enabled,
        str(interaction.user.id),
        parent_id=None if parent is None else str(parent),
    )
    if enabled:
        bot.enabled.add(interaction.channel_id)
        bot.disabled.discard(interaction.channel_id)
        text = "I'll answer every message in this channel (and its threads) now."
    else:
        bot.enabled.discard(interaction.channel_id)
        if override:
            bot.disabled.add(interaction.channel_id)
        text = "I won't answer here any more (except when mentioned, if the operator allows it)."
    await interaction.followup.send(text, ephemeral=True)
