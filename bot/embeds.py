"""What the bot shows besides its replies: FAQ embeds and the ``/rwkv status`` text.

Pure functions of their inputs (no client, no interaction), so the slash commands and the
message path share them.
"""

from __future__ import annotations

import discord

from chat.states import MB
from faq import Topic, render_embed

FAQ_COLOUR = discord.Colour.from_rgb(88, 101, 242)


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
    """The ``/rwkv status`` answer: the model, queues, speed, each device and the state tiers."""
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
