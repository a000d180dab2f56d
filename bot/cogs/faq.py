"""``/faq ask`` and ``list``: answers to common RWKV questions, from the bot's
:class:`~faq.FaqIndex` (``bot.faq``, replaced as a whole by ``/rwkv-mod faq-reload``)."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from bot.client import RwkvBot
from bot.embeds import faq_embed
from bot.streaming import NO_MENTIONS
from faq import render_miss, render_topic_list


class FaqCog(commands.GroupCog, group_name="faq", group_description="Answers to common RWKV questions"):
    """The ``/faq`` group."""

    def __init__(self, bot: RwkvBot) -> None:
        self.bot = bot

    @app_commands.command(name="ask", description="Look up the RWKV FAQ")
    @app_commands.describe(question="a topic, or your question in your own words")
    async def ask(self, interaction: discord.Interaction, question: str) -> None:
        """The answer as a public embed; otherwise the tied or closest topics, to the asker only."""
        found = self.bot.faq.lookup(question)
        if found.answer is None:  # the two tied topics, or the closest ones, to ask again with
            text = render_miss(question, found)
            await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NO_MENTIONS)
            return
        await interaction.response.send_message(
            embed=faq_embed(found.answer.topic), allowed_mentions=NO_MENTIONS
        )

    @ask.autocomplete("question")
    async def titles(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        """Topic titles that match what was typed."""
        return [
            app_commands.Choice(name=t.title[:100], value=t.title[:100])
            for t in self.bot.faq.autocomplete(current)
        ]

    @app_commands.command(name="list", description="List the RWKV FAQ topics")
    async def list_topics(self, interaction: discord.Interaction) -> None:
        """Every topic's title, to the asker only."""
        text = render_topic_list(self.bot.faq.topics)
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NO_MENTIONS)
