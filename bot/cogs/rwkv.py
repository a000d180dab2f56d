"""``/rwkv``: one slash-command group made of two areas, the chat (for everyone, in
:mod:`bot.cogs.chat`) and moderation (:mod:`bot.cogs.moderation`)."""

from __future__ import annotations

from discord.ext import commands

from bot.client import RwkvBot
from bot.cogs.chat import ChatCommands, offer_limits
from bot.cogs.moderation import ModerationCommands


class RwkvCog(
    ChatCommands,
    ModerationCommands,
    commands.GroupCog,
    group_name="rwkv",
    group_description="Chat with the RWKV language model",
):
    """The ``/rwkv`` group; its options offer exactly the ranges the chat service accepts."""

    def __init__(self, bot: RwkvBot) -> None:
        self.bot = bot
        assert self.app_command is not None  # a GroupCog's group
        offer_limits(self.app_command, bot.service.limits)
