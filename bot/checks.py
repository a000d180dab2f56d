"""Who may do what: moderators (Manage Messages) and server managers (Manage Server).

Checked when a command runs: Discord's default permissions are only a hint that server admins can
change, and they cannot be set per subcommand. A refusal is a :class:`Refused` error, which the
command tree's error handler answers in one line, to the member only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import discord
from discord import app_commands

MODERATORS_ONLY = "Only moderators (Manage Messages) can do that here."
SERVER_MANAGERS_ONLY = "Only members with Manage Server can change things for the whole server."

T = TypeVar("T")


class Refused(app_commands.CheckFailure):
    """A command the member may not use here; its text is the answer."""


def is_moderator(interaction: discord.Interaction) -> bool:
    """Manage Messages in this channel; in a DM, the user's own conversation, always."""
    if interaction.guild is None:
        return True
    return bool(interaction.permissions.manage_messages)


def is_server_manager(interaction: discord.Interaction) -> bool:
    """Server-wide changes need Manage Server in the server itself (not a channel's overwrite)."""
    if interaction.guild is None:
        return True
    member = interaction.user
    return isinstance(member, discord.Member) and member.guild_permissions.manage_guild


def require_moderator(interaction: discord.Interaction) -> None:
    """Refuse members without Manage Messages."""
    if not is_moderator(interaction):
        raise Refused(MODERATORS_ONLY)


def require_server_manager(interaction: discord.Interaction) -> None:
    """Refuse members without Manage Server."""
    if not is_server_manager(interaction):
        raise Refused(SERVER_MANAGERS_ONLY)


def _moderator_check(interaction: discord.Interaction) -> bool:
    require_moderator(interaction)
    return True


def moderators_only() -> Callable[[T], T]:
    """A slash command for moderators only, checked before its options are read."""
    return app_commands.check(_moderator_check)
