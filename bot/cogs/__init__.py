"""The slash commands, one module per area: ``/rwkv`` (for everyone), ``/rwkv-mod`` (moderators)
and ``/faq``.

:func:`add_cogs` adds them to a bot; a new area is a new module here and one line below.
"""

from __future__ import annotations

from bot.client import RwkvBot
from bot.cogs.faq import FaqCog
from bot.cogs.moderation import ModerationCog
from bot.cogs.rwkv import RwkvCog


async def add_cogs(bot: RwkvBot) -> None:
    """Add every area's slash commands to the bot's command tree."""
    await bot.add_cog(RwkvCog(bot))
    await bot.add_cog(ModerationCog(bot))
    await bot.add_cog(FaqCog(bot))
