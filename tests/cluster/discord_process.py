"""One Discord-tier process of the end-to-end cluster test: the real bot, sharded (shard ``SHARD``
of 2), built by :func:`bot.runner.chat_service` and :func:`bot.runner.create_bot` on the chat
tier of the Ray cluster at ``ADDRESS``, on the offline harness (real discord.py objects built from
payloads, a recording HTTP layer). It holds the servers of the plan that its shards own, as the
gateway would deliver them; in each of their channels a moderator enables the bot and sets
greedy replies without speaker names (``/rwkv-mod enable``, ``/rwkv settings``), then every
channel gets the scripted messages of :mod:`tests.scripted_channels`, round by round, through
``on_message``.

``python -m tests.cluster.discord_process ADDRESS SHARD PLAN ROUNDS OUT``: PLAN is a JSON file
``[[index, guild_id, channel_id], ...]``; OUT gets one JSON line per answered message
(``{"shard", "guild", "channel", "index", "round", "posted"}``, ``posted`` the contents of the
messages the bot posted for it, as Discord holds them at the end); at the end it prints the bot's
``{"shard_ids", "shard_count"}`` as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import discord
from discord.webhook.async_ import async_context

from bot.app import load_faq
from bot.checks import Refused
from bot.runner import chat_service, create_bot, open_limits
from bot.settings import Settings
from tests.bot.harness import (
    ALICE,
    MOD,
    NAMES,
    ROLES,
    FakeClock,
    Harness,
    RecordingAdapter,
    connect,
    guild_payload,
    message_payload,
    user,
)
from tests.scripted_channels import message

SHARDS = 2
TOKEN = "the-cluster-test-bot"


def server_payload(guild_id: int, channels: list[int]) -> dict[str, Any]:
    """The harness's server under another id, with these text channels and no threads."""
    payload = guild_payload()
    payload["id"] = str(guild_id)
    payload["roles"][0]["id"] = str(guild_id)  # @everyone has the server's id
    shape = {"type": 0, "guild_id": str(guild_id), "permission_overwrites": [], "nsfw": False}
    payload["channels"] = [
        {**shape, "id": str(channel), "name": f"chat-{n}", "position": n}
        for n, channel in enumerate(channels)
    ]
    payload["threads"] = []
    return payload


class Servers(Harness):
    """The harness with several servers: messages and interactions carry their channel's server."""

    def __init__(self, *args: Any, server_of: dict[int, int]) -> None:
        super().__init__(*args)
        self.server_of = server_of

    def message(  # type: ignore[override]
        self, content: str, *, author: int = ALICE, channel: int, **_: Any
    ) -> discord.Message:
        guild = self.server_of[channel]
        data = message_payload(channel, user(author, NAMES[author]), content)
        data["guild_id"] = str(guild)
        data["member"] = {
            "roles": ROLES.get(author, []),
            "joined_at": "2025-01-01T00:00:00+00:00",
            "deaf": False,
            "mute": False,
            "flags": 0,
        }
        target = self.state._get_guild(guild).get_channel(channel)  # type: ignore[union-attr]
        return discord.Message(state=self.state, channel=target, data=data)  # type: ignore[arg-type]

    def _interaction_base(self, author: int, channel: int, perms: int) -> dict[str, Any]:
        data = super()._interaction_base(author, channel, perms)
        data["guild_id"] = data["channel"]["guild_id"] = str(self.server_of[channel])
        return data


async def main(address: str, shard: int, plan: list[tuple[int, int, int]], rounds: int, out: Path) -> None:
    settings = Settings(
        db=out.with_suffix(".sqlite3"),  # type: ignore[arg-type]  # unused: the chat tier holds the store
        token=TOKEN,  # type: ignore[arg-type]
        cluster=address,
        shard_count=SHARDS,
        shard_ids=str(shard),
        user_cooldown=0,
    )
    faq, _ = load_faq(settings)
    adapter = RecordingAdapter()
    context = async_context.set(adapter)
    try:
        async with chat_service(settings, None, faq) as (numbers, service):
            clock = FakeClock()
            bot = await create_bot(
                settings, numbers, service, faq, limits=open_limits(settings), clock=clock, sleep=clock.sleep
            )
            http = await connect(bot, clock)
            # the servers of this process's shards, as the gateway delivers them (GUILD_CREATE)
            for guild in sorted({g for _, g, _ in plan}):
                if (guild >> 22) % SHARDS in (bot.shard_ids or []):
                    channels = [c for _, g, c in plan if g == guild]
                    bot._connection._add_guild_from_data(server_payload(guild, channels))  # type: ignore[arg-type]
            mine = [(i, g, c) for i, g, c in plan if bot.get_guild(g) is not None]
            harness = Servers(bot, http, adapter, clock, server_of={c: g for _, g, c in mine})
            errors: list[BaseException] = []
            answer = bot.tree.on_error

            async def record(interaction: discord.Interaction, error: Exception) -> None:
                if not isinstance(error, Refused):
                    errors.append(error)
                await answer(interaction, error)  # type: ignore[arg-type]

            bot.tree.error(record)
            try:
                for _, _, channel in mine:
                    await harness.slash("rwkv-mod", "enable", author=MOD, channel=channel)
                    await harness.slash(
                        "rwkv", "settings", author=MOD, channel=channel, top_p=0.0, speaker_names=False
                    )
                assert not errors, errors
                with out.open("w") as lines:
                    for round_ in range(rounds):
                        said = await asyncio.gather(*(say(harness, shard, place, round_) for place in mine))
                        for line in said:
                            lines.write(json.dumps(line) + "\n")
            finally:
                await bot.close()
            print(json.dumps({"shard_ids": bot.shard_ids, "shard_count": bot.shard_count}), flush=True)
    finally:
        async_context.reset(context)


async def say(harness: Servers, shard: int, place: tuple[int, int, int], round_: int) -> dict[str, Any]:
    """The channel's scripted message of this round, as Alice writes it; what the bot posted."""
    index, guild, channel = place
    before = set(harness.http.messages)
    await harness.say(message(index, round_), channel=channel)
    posted = [
        m["content"]
        for key, m in sorted(harness.http.messages.items())
        if key not in before and m["channel_id"] == str(channel)
    ]
    return {
        "shard": shard,
        "guild": guild,
        "channel": channel,
        "index": index,
        "round": round_,
        "posted": posted,
    }


if __name__ == "__main__":
    plan = [(int(i), int(g), int(c)) for i, g, c in json.loads(Path(sys.argv[3]).read_text())]
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), plan, int(sys.argv[4]), Path(sys.argv[5])))
