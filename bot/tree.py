"""The slash-command tree, with the one error handler of every command.

Whatever state the interaction is in (answered, deferred or not yet), the member gets one line,
to them only, and an unexpected error is logged with its traceback: a failure after ``defer()``
never leaves "thinking..." on the screen.
"""

from __future__ import annotations

import logging
from typing import Any

import discord
from discord import app_commands

from bot.checks import Refused
from chat.errors import StoreError

log = logging.getLogger(__name__)

FAILED = "Sorry, something went wrong on my side. Nothing was changed."


def error_text(error: app_commands.AppCommandError) -> str:
    """The one line a member reads for a command that failed or was refused."""
    if isinstance(error, Refused):
        return str(error)
    cause = error.original if isinstance(error, app_commands.CommandInvokeError) else error
    if isinstance(cause, StoreError):
        return f"Sorry, this could not be saved ({cause})."
    return FAILED


class BotTree(app_commands.CommandTree[Any]):
    """The bot's command tree: refusals and failures answered and logged in one place."""

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        """Answer the member in one line and log what was not a refusal."""
        command = interaction.command.qualified_name if interaction.command else "?"
        if not isinstance(error, Refused):
            log.error("the command /%s failed", command, exc_info=error)
        if interaction.type is not discord.InteractionType.application_command:
            return  # an autocomplete: there is no message to answer with
        text = error_text(error)
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException as exc:  # the token expired, or Discord refused
            log.warning("could not tell the member that /%s failed: %s", command, exc)
