"""Buttons on replies: Retry (the ``+`` command, ``++`` for a free generation), Continue (``+++``,
free generations only) and Stop (while the reply is being written).

They are persistent: each button is a :class:`discord.ui.DynamicItem` whose ``custom_id`` carries
all it needs (``rwkv:<action>:<channel id>``), registered once in ``setup_hook``, so a button
pressed after a restart of the bot reaches the new bot object (no view is kept in memory, and
none times out). The press is handled by the bot with the same rules as the text commands
(:meth:`bot.replies.ReplyingBot.press`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal, cast

import discord

if TYPE_CHECKING:
    from bot.replies import ReplyingBot

Action = Literal["retry", "continue", "stop"]
# What each button sends, as the text commands would: Retry of a chat reply is "+", of a free
# generation "++"; Continue is "+++".
RETRY_CHAT, RETRY_GENERATION, CONTINUE = "+", "++", "+++"
_LABELS: dict[str, tuple[str, discord.ButtonStyle]] = {
    "retry": ("Retry", discord.ButtonStyle.secondary),
    "retry-gen": ("Retry", discord.ButtonStyle.secondary),
    "continue": ("Continue", discord.ButtonStyle.primary),
    "stop": ("Stop", discord.ButtonStyle.danger),
}
COMMANDS = {"retry": RETRY_CHAT, "retry-gen": RETRY_GENERATION, "continue": CONTINUE}


class ReplyButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"rwkv:(?P<action>retry|retry-gen|continue|stop):(?P<channel>[0-9]{1,20})",
):
    """One button of a reply; its custom id names the action and the channel."""

    def __init__(self, action: str, channel_id: int) -> None:
        label, style = _LABELS[action]
        super().__init__(discord.ui.Button(label=label, style=style, custom_id=f"rwkv:{action}:{channel_id}"))
        self.action = action
        self.channel_id = channel_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> ReplyButton:
        """The button again from its custom id (after a restart, too)."""
        return cls(match["action"], int(match["channel"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        """Hand the press to the bot, which applies the text commands' rules."""
        bot = cast("ReplyingBot", interaction.client)
        await bot.press(interaction, self.action, self.channel_id)


def writing_view(channel_id: int) -> discord.ui.View:
    """The buttons while a reply is being written: Stop."""
    return _view(channel_id, ["stop"])


def ended_view(channel_id: int, *, generation: bool) -> discord.ui.View:
    """The buttons of a finished reply: Retry, and Continue for a free generation."""
    return _view(channel_id, ["retry-gen", "continue"] if generation else ["retry"])


def _view(channel_id: int, actions: list[str]) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for action in actions:
        view.add_item(ReplyButton(action, channel_id))
    return view
