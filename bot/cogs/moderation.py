"""``/rwkv-mod``: ``reset``, ``undo-reset``, ``enable``, ``disable``, ``server``, ``persona``,
``roles`` and ``faq-reload``, the moderators' own group.

The group carries ``default_permissions(manage_messages=True)``, so Discord shows it only to
moderators (and to whom a server's admins grant it); each command still checks when it runs,
since admins can change those defaults. A channel's conversation and where the bot talks need
Manage Messages; anything for the whole server needs Manage Server (see :mod:`bot.checks`).
"""

from __future__ import annotations

import contextlib
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.checks import (
    MODERATORS_ONLY,
    SERVER_MANAGERS_ONLY,
    Refused,
    is_moderator,
    is_server_manager,
    moderators_only,
    require_server_manager,
)
from bot.client import RwkvBot
from bot.cogs.chat import apply_settings, preset_choices, record_thread
from bot.streaming import NO_MENTIONS
from chat.settings import SYSTEM_PROMPT_MAX

Scope = Literal["channel", "server"]
# Said in the channel for everyone: from now on the bot reads what members write there.
ENABLED_NOTICE = (
    "A moderator enabled me in this channel: from now on I read every message here (and in its "
    "threads) and answer it with the RWKV language model. `/rwkv help` shows how to talk to me; "
    "a moderator can turn this off with `/rwkv-mod disable`."
)


@app_commands.default_permissions(manage_messages=True)
class ModerationCog(commands.GroupCog, group_name="rwkv-mod", group_description="manage the RWKV bot"):
    """The ``/rwkv-mod`` group."""

    def __init__(self, bot: RwkvBot) -> None:
        self.bot = bot

    @app_commands.command(name="reset", description="reset this channel's (or every channel's) conversation")
    @moderators_only()
    async def reset(self, interaction: discord.Interaction, scope: Scope = "channel") -> None:
        """Reset the channel's conversation, or every one of the server's."""
        keys = await self._begin(interaction, scope)
        for key in keys:  # stop everything first, so no channel waits for another's reply
            self.bot.stop(key, waiting_too=True)
        for key in keys:
            await self.bot.service.reset(key)
        await interaction.followup.send(
            f"Reset {len(keys)} conversation(s). `/rwkv-mod undo-reset` brings them back.", ephemeral=True
        )
        if scope == "channel" and isinstance(interaction.channel, discord.abc.Messageable):
            with contextlib.suppress(discord.HTTPException):  # the reset is done; the note is a courtesy
                await interaction.channel.send("Chat reset by a moderator.", allowed_mentions=NO_MENTIONS)

    @app_commands.command(
        name="undo-reset", description="bring back the conversation of before the last reset"
    )
    @moderators_only()
    async def undo_reset(self, interaction: discord.Interaction, scope: Scope = "channel") -> None:
        """Bring back the conversation(s) of before the last reset."""
        restored = 0
        for key in await self._begin(interaction, scope):
            restored += await self.bot.service.undo_reset(key)
        text = f"Restored {restored} conversation(s)." if restored else "There is no reset to undo."
        await interaction.followup.send(text, ephemeral=True)

    @app_commands.command(name="enable", description="let the bot answer every message in this channel")
    @app_commands.guild_only()
    async def enable(self, interaction: discord.Interaction) -> None:
        """Answer every message in this channel (and its threads)."""
        await self._set_enabled(interaction, True)

    @app_commands.command(name="disable", description="stop answering in this channel")
    @app_commands.guild_only()
    async def disable(self, interaction: discord.Interaction) -> None:
        """Stop answering here (a thread of an enabled channel is switched off on its own)."""
        await self._set_enabled(interaction, False)

    @app_commands.command(name="server", description="Who may use +reset in this server (Manage Server)")
    @app_commands.guild_only()
    async def server(
        self, interaction: discord.Interaction, reset_policy: Literal["everyone", "moderators"]
    ) -> None:
        """Set who may use ``+reset`` in text in this server."""
        guild_id = interaction.guild_id
        if guild_id is None or not is_server_manager(interaction):
            raise Refused(SERVER_MANAGERS_ONLY)
        await interaction.response.defer(ephemeral=True)
        await self.bot.service.set_reset_policy(str(guild_id), reset_policy)
        await interaction.followup.send(f"+reset is now for {reset_policy}.", ephemeral=True)

    @app_commands.command(
        name="persona", description="Show, set or remove this channel's system prompt or preset"
    )
    @app_commands.describe(
        prompt="the system prompt (the G1 template's System: turn), e.g. 'You are a pirate.'",
        preset="a prompt preset (one with a state-tuning file opens from its tuned state)",
        clear="remove the system prompt (back to the preset's own opening)",
    )
    @moderators_only()
    async def persona(
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, SYSTEM_PROMPT_MAX] | None = None,
        preset: str | None = None,
        clear: bool = False,
    ) -> None:
        """Without options, show the channel's preset and system prompt; otherwise change them
        (either change starts the conversation afresh)."""
        await interaction.response.defer(ephemeral=True)
        service, channel = self.bot.service, str(interaction.channel_id)
        if prompt is None and preset is None and not clear:
            context = await service.context(channel)
            system = context.settings.get("system_prompt")
            shown = f"System prompt:\n> {system}" if system else "No system prompt."
            text = f"Preset: {context.preset.name} ({context.preset.description}). {shown}"
            await interaction.followup.send(text[:2000], ephemeral=True, allowed_mentions=NO_MENTIONS)
            return
        await apply_settings(self.bot, interaction, preset=preset, system_prompt="" if clear else prompt)

    @persona.autocomplete("preset")
    async def preset_names(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        """The presets whose name contains what was typed."""
        return preset_choices(self.bot, current)

    @app_commands.command(
        name="roles", description="Allow or deny a role to talk to the bot here or server-wide"
    )
    @app_commands.describe(
        role="the role",
        rule="allow: only allowed roles may talk (once any is allowed); deny: this role may not; remove",
        scope="this channel (the default), or the whole server (Manage Server)",
    )
    @app_commands.guild_only()
    @moderators_only()
    async def roles(
        self,
        interaction: discord.Interaction,
        role: discord.Role,
        rule: Literal["allow", "deny", "remove"],
        scope: Scope = "channel",
    ) -> None:
        """Set who may talk to the bot by role (moderators always may)."""
        if scope == "server":
            require_server_manager(interaction)
        await interaction.response.defer(ephemeral=True)
        guild = str(interaction.guild_id)
        channel = None if scope == "server" else str(interaction.channel_id)
        if channel is not None:
            await record_thread(self.bot, interaction)
        change = await self.bot.service.set_role_rule(guild, channel, str(role.id), rule)
        await interaction.followup.send(
            f"{role.mention}: {change}.", ephemeral=True, allowed_mentions=NO_MENTIONS
        )

    @app_commands.command(
        name="faq-reload", description="Reload the FAQ topics (bundled and the operator's folder)"
    )
    @moderators_only()
    async def faq_reload(self, interaction: discord.Interaction) -> None:
        """Read the FAQ topics again; broken files are named and skipped."""
        await interaction.response.defer(ephemeral=True)
        problems = await self.bot.reload_faq()
        text = f"Loaded {len(self.bot.faq.topics)} FAQ topics."
        if problems:
            text += " Skipped:\n" + "\n".join(f"- {p}" for p in problems[:10])
        await interaction.followup.send(text[:2000], ephemeral=True)

    async def _begin(self, interaction: discord.Interaction, scope: Scope) -> list[str]:
        """The conversations a command acts on, once the member may (the whole server needs
        Manage Server) and the interaction is deferred."""
        if scope == "server":
            require_server_manager(interaction)
        await interaction.response.defer(ephemeral=True)
        here = str(interaction.channel_id)
        if scope == "server" and interaction.guild_id is not None:
            keys = await self.bot.service.server_channels(str(interaction.guild_id))
            return keys or [here]
        return [here]

    async def _set_enabled(self, interaction: discord.Interaction, enabled: bool) -> None:
        guild_id, channel_id = interaction.guild_id, interaction.channel_id
        if guild_id is None or channel_id is None or not is_moderator(interaction):
            raise Refused(MODERATORS_ONLY)
        bot = self.bot
        await interaction.response.defer(ephemeral=True)
        channel = interaction.channel
        parent = channel.parent_id if isinstance(channel, discord.Thread) else None
        override = await bot.service.set_enabled(
            str(channel_id),
            str(guild_id),
            enabled,
            str(interaction.user.id),
            parent_id=None if parent is None else str(parent),
        )
        if enabled:
            bot.enabled.add(channel_id)
            bot.disabled.discard(channel_id)
            text = "I'll answer every message in this channel (and its threads) now."
            if isinstance(channel, discord.abc.Messageable):
                with contextlib.suppress(discord.HTTPException):  # enabled; the notice is a courtesy
                    await channel.send(ENABLED_NOTICE, allowed_mentions=NO_MENTIONS)
        else:
            bot.enabled.discard(channel_id)
            if override:
                bot.disabled.add(channel_id)
            text = "I won't answer here any more (except when mentioned, if the operator allows it)."
        await interaction.followup.send(text, ephemeral=True)
