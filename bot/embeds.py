"""What the bot shows besides its replies: FAQ embeds and the ``/rwkv status`` text.

Pure functions of their inputs (no client, no interaction), so the slash commands and the
message path share them.
"""

from __future__ import annotations

import discord

from chat.states import MB
from faq import Topic, render_embed

FAQ_COLOUR = discord.Colour.from_rgb(88, 101, 242)

# What Discord adds to the chat grammar (shown after it by ``+help`` and ``/rwkv help``).
DISCORD_HELP = """\
On Discord:
- Buttons under a reply: Stop (while it is written), Retry (as +, or ++ for a free generation),
  Continue (as +++, on a free generation). Only the newest reply has them.
- React with ⏹️ on a reply being written to stop it (as its asker, or a moderator).
- /rwkv help: this text. /rwkv status: the model and the queue. /rwkv stop: stop the reply being
  written here. /rwkv settings: this channel's settings. /faq ask, /faq list: the RWKV FAQ.
- Moderators also have /rwkv-mod (reset, undo-reset, enable, disable, server, faq-reload) and
  change /rwkv settings."""


def faq_embed(topic: Topic) -> discord.Embed:
    """A FAQ topic as an embed (title, answer, links), within Discord's embed limits."""
    data = render_embed(topic)
    embed = discord.Embed(title=data["title"], description=data["description"], url=data["url"])
    for item in data["fields"]:
        embed.add_field(name=item["name"], value=item["value"], inline=item["inline"])
    return embed


def faq_text_embed(text: str) -> discord.Embed:
    """An answer of ``+faq`` (already rendered as text) as an embed."""
    return discord.Embed(description=text[:4096], colour=FAQ_COLOUR)


def status_text(
    *,
    model: str,
    running: int,
    waiting: int,
    tokens_per_s: float,
    channels_enabled: int,
    engine: dict[str, float],
    devices: dict[str, dict[str, float]],
    tiers: dict[str, int],
) -> str:
    """The ``/rwkv status`` answer for moderators: the model, queues, speed, each device and the
    state tiers (members see :func:`member_status_text`)."""
    lines = [
        f"Model: {model}",
        f"Replies being written: {running}, waiting: {waiting}",
        f"Speed (recent replies): {tokens_per_s:.1f} tokens/s",
        f"Channels enabled: {channels_enabled}",
    ]
    if engine:
        lines.append("Engine: " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(engine.items())))
    for device, numbers in sorted(devices.items()):
        lines.append(
            f"{device}: batch {numbers['batch']:.0f}, {numbers['resident']:.0f} resident, "
            f"{numbers['queue']:.0f} queued, {numbers['tokens_per_s']:.0f} tokens/s, "
            f"{numbers.get('states_bytes', 0) / MB:.0f} MB of states"
        )
    budget = f"{tiers['device_budget_bytes'] / MB:.0f} MB" + (" on each" if devices else "")
    lines.append(
        f"States: {tiers['device_channels']} channels on the "
        f"{f'{len(devices)} devices' if devices else 'device'} "
        f"({tiers['device_bytes'] / MB:.0f} MB, at most {budget}), "
        f"{tiers['host_channels']} in host memory "
        f"({tiers['host_bytes'] / MB:.0f} of {tiers['host_budget_bytes'] / MB:.0f} MB), "
        f"{tiers['restored']} restored from the database"
    )
    return "\n".join(lines)


def member_status_text(*, model: str, running: int, waiting: int, tokens_per_s: float) -> str:
    """The ``/rwkv status`` answer for members: the model, and how busy the bot is."""
    busy = "free" if running == 0 else f"writing {running} repl{'y' if running == 1 else 'ies'}"
    queue = f", {waiting} message{'s' if waiting != 1 else ''} waiting" if waiting else ""
    speed = f" at about {tokens_per_s:.0f} tokens/s" if tokens_per_s else ""
    return f"I'm running {model}. Right now I'm {busy}{queue}{speed}."
