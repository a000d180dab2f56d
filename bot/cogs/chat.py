"""``/rwkv help``, ``status``, ``stop`` and ``settings``: the chat's slash commands for everyone
(changing settings is for moderators)."""

from __future__ import annotations

from typing import Any, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.checks import is_moderator, require_moderator
from bot.client import RwkvBot
from bot.embeds import DISCORD_HELP, member_status_text, status_text
from chat.errors import StoreError
from chat.grammar import HELP_TEXT
from chat.settings import SettingLimits


def offer_limits(group: app_commands.Group, limits: SettingLimits) -> None:
    """Give ``/rwkv settings`` the bounds the chat service accepts (known once it is built).

    discord.py reads an option's bounds from the signature and has no public way to set bounds
    known only at run time: the option's parameter (a dataclass) is set here, once, before the
    commands are synced. The project pins discord.py's minor version.
    """
    command = group.get_command("settings")
    assert isinstance(command, app_commands.Command)
    bounds: dict[str, tuple[float, float]] = {**limits.ranges, "max_tokens": (1, limits.max_tokens)}
    for name, (low, high) in bounds.items():
        parameter = command._params[name]
        parameter.min_value, parameter.max_value = low, high


class ChatCommands(commands.Cog):
    """The chat's part of ``/rwkv`` (a part of :class:`~bot.cogs.rwkv.RwkvCog`)."""

    bot: RwkvBot

    @app_commands.command(name="help", description="How to talk to the bot")
    async def help_command(self, interaction: discord.Interaction) -> None:
        """The grammar's help text and what Discord adds (buttons, reactions, slash commands)."""
        await interaction.response.send_message(f"{HELP_TEXT}\n\n{DISCORD_HELP}", ephemeral=True)

    @app_commands.command(name="status", description="Model, queue and speed")
    async def status(self, interaction: discord.Interaction) -> None:
        """Members: the model and how busy it is. Moderators: also the engine's figures, the
        devices and the state tiers."""
        bot = self.bot
        running, waiting, speed = len(bot.lines.running()), bot.lines.waiting(), bot.tokens_per_second()
        if not is_moderator(interaction):
            text = member_status_text(
                model=bot.engine.describe(), running=running, waiting=waiting, tokens_per_s=speed
            )
            await interaction.response.send_message(text, ephemeral=True)
            return
        text = status_text(
            model=bot.engine.describe(),
            running=running,
            waiting=waiting,
            tokens_per_s=speed,
            channels_enabled=len(bot.enabled),
            engine=bot.engine.metrics(),
            devices=bot.device_metrics(),
            tiers=bot.service.state_metrics(),
        )
        await interaction.response.send_message(text, ephemeral=True)

    @app_commands.command(name="stop", description="Stop the reply being written in this channel")
    async def stop(self, interaction: discord.Interaction) -> None:
        """Stop the reply being written here (its asker or a moderator may)."""
        key = str(interaction.channel_id)
        text = self.bot.stop_reply(key, interaction.user.id, is_moderator(interaction))
        await interaction.response.send_message(text, ephemeral=True)

    @app_commands.command(name="settings", description="Show or change this channel's chat settings")
    @app_commands.describe(
        temperature="0.2 to 5 (higher: more varied)",
        top_p="0 to 1 (0: always the likeliest word)",
        presence_penalty="0 to 2: discourages repeating any word",
        frequency_penalty="0 to 2: discourages repeating a word often",
        max_tokens="the longest reply, in tokens",
        preset="the prompt preset (changing it starts the conversation afresh)",
        thinking="how <think> sections are shown",
        faq_auto="answer questions that match an FAQ topic well from the FAQ, before the model",
        speaker_names="tell the model who wrote each message (their display name; on by default)",
    )
    async def settings_command(  # noqa: PLR0917 (one parameter per slash-command option)
        self,
        interaction: discord.Interaction,
        temperature: float | None = None,  # the bounds of these four: see offer_limits
        top_p: float | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        max_tokens: int | None = None,
        preset: str | None = None,
        thinking: Literal["fold", "show", "hide"] | None = None,
        faq_auto: bool | None = None,
        speaker_names: bool | None = None,
    ) -> None:
        """Without options, show the channel's settings; with some, set them (moderators)."""
        values: dict[str, Any] = {
            "temperature": temperature,
            "top_p": top_p,
            "presence_penalty": presence_penalty,
            "frequency_penalty": frequency_penalty,
            "max_tokens": max_tokens,
            "preset": preset,
            "thinking": thinking,
            "faq_auto": faq_auto,
            "speaker_names": speaker_names,
        }
        service = self.bot.service
        channel = str(interaction.channel_id)
        if all(v is None for v in values.values()):
            current = await service.channel_settings(channel)
            shown = ", ".join(f"{k} {v}" for k, v in sorted(current.items())) or "the defaults"
            await interaction.response.send_message(f"This channel uses {shown}.", ephemeral=True)
            return
        require_moderator(interaction)
        await interaction.response.defer(ephemeral=True)
        await apply_settings(self.bot, interaction, **values)

    @settings_command.autocomplete("preset")
    async def preset_names(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        """The presets whose name contains what was typed."""
        return preset_choices(self.bot, current)


def preset_choices(bot: RwkvBot, current: str) -> list[app_commands.Choice[str]]:
    """The presets whose name contains what was typed (at most Discord's 25 choices)."""
    names = [n for n in sorted(bot.service.presets) if current.lower() in n]
    return [app_commands.Choice(name=n, value=n) for n in names[:25]]


async def apply_settings(bot: RwkvBot, interaction: discord.Interaction, **values: Any) -> None:
    """Set channel settings through the service (after defer) and say what was set, or why
    nothing was."""
    try:
        await record_thread(bot, interaction)
        changes = await bot.service.update_settings(str(interaction.channel_id), **values)
    except (ValueError, StoreError) as exc:
        await interaction.followup.send(f"Nothing was changed: {exc}.", ephemeral=True)
        return
    await interaction.followup.send("Set " + ", ".join(changes) + ".", ephemeral=True)


async def record_thread(bot: RwkvBot, interaction: discord.Interaction) -> None:
    """In a thread, record its channel, so that what is stored for the thread (its enabling, its
    settings) is purged with the channel even if the thread never talks."""
    thread = interaction.channel
    if isinstance(thread, discord.Thread) and interaction.guild_id is not None:
        await bot.service.record_place(str(thread.id), str(interaction.guild_id), str(thread.parent_id))
