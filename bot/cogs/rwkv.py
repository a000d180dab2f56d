"""``/rwkv``: the slash-command group every member sees (its commands in :mod:`bot.cogs.chat`);
moderation is its own group, ``/rwkv-mod`` (:mod:`bot.cogs.moderation`)."""

from __future__ import annotations

from discord.ext import commands

from bot.client import RwkvBot
from bot.cogs.chat import ChatCommands, offer_limits


class RwkvCog(
    ChatCommands,
    commands.GroupCog,
    group_name="rwkv",
    group_description="Chat with the RWKV language model",
):
    """The ``/rwkv`` group; its options offer exactly the ranges the chat service accepts."""

    def __init__(self, bot: RwkvBot) -> None:
        self.bot = bot
        assert self.app_command is not None  # a GroupCog's group
        offer_limits(self.app_command, bot.service.limits)
