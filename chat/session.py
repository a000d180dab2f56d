"""The chat service: the one door of ``chat/`` for the front ends (terminal, Discord).

This sits between the front ends and the engine. It knows the grammar, the snapshots of the
reference chat, the sampling policy and what may be stored; it imports neither discord nor
CUDA code. A front end calls the service only, never the store or the state tiers behind it.

Snapshots per channel, as in the reference: ``chat`` (after the last reply), ``chat_pre`` (after
the last user message, before the reply; read by ``+``), ``gen_0`` (after a free-generation
prompt; read by ``++``), ``gen_1`` (after a free generation; read by ``+++``). ``chat_init`` is
the state after a preset's opening prompt, shared by all channels.

Several services may share one store (replicas of a cluster, each serving some channels): each
then has an ``owner`` name, takes a channel's lease at its first message there, and writes the
channel's states only under the lease's epoch (see :mod:`chat.states`). A service that lost a
channel to another forgets it and answers the message with one line; the next one goes to the
new owner.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from chat.errors import FencedError
from chat.grammar import GrammarError, Parsed, clean_text, normalise_chat, parse_message
from chat.housekeeping import keep_house
from chat.outcome import ChatEvent, Outcome, OutcomeKind
from chat.presets import Preset
from chat.settings import (
    RESET_POLICIES,
    ROLE_LISTS,
    ROLE_RULES,
    SETTING_RANGES,
    SWITCHES,
    SYSTEM_PROMPT_MAX,
    ChannelContext,
    ChatConfig,
    RoleRules,
    SettingLimits,
    checked_settings,
)
from chat.states import ChannelStates
from chat.storage import Storage, StoreError, Turn
from chat.turns import INSTRUCTION_TEMPLATE, FaqLookup, TurnCommands
from engine.errors import EngineError
from engine.interface import Engine
from engine.state import Snapshot

__all__ = ["INSTRUCTION_TEMPLATE", "ChatConfig", "ChatService", "FaqLookup"]

log = logging.getLogger(__name__)

MOVED = (
    "Sorry, another server took over this conversation while I was answering, so this reply was "
    "not kept. Please send your message again."
)


@dataclass
class _ChannelLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # holding or waiting


_KNOWN_PLACES = 10_000


def _set_system_prompt(settings: dict[str, Any], value: str) -> str:
    """Set (or, with an empty text, remove) a channel's system prompt; the change, as a line.
    Blank lines become single ones, so the prompt stays one turn of the template."""
    prompt = normalise_chat(clean_text(value))
    if not prompt:
        settings.pop("system_prompt", None)
        return "no system prompt (the preset's own opening; the conversation starts afresh)"
    if len(prompt) > SYSTEM_PROMPT_MAX:
        raise ValueError(
            f"the system prompt may have at most {SYSTEM_PROMPT_MAX} characters, not {len(prompt)}"
        )
    settings["system_prompt"] = prompt
    return "the system prompt (the conversation starts afresh)"


class ChatService(TurnCommands):
    """Handles the messages of every channel, one at a time per channel, and everything a front
    end may change: settings, enabling, resets, forgetting channels and servers."""

    def __init__(
        self,
        engine: Engine,
        store: Storage,
        presets: dict[str, Preset],
        config: ChatConfig,
        faq: FaqLookup | None = None,
    ) -> None:
        if config.default_preset not in presets:
            raise ValueError(f"unknown preset {config.default_preset!r}; known: {', '.join(sorted(presets))}")
        self.engine = engine
        self.store = store
        self.presets = presets
        self.config = config
        self.faq = faq
        # the lease holder name of this service among those sharing the store (set before the
        # first message); None: the only service of its store, no leases
        self.owner = config.owner
        self._locks: dict[str, _ChannelLock] = {}  # only channels with a message in hand
        self._cancel: dict[str, threading.Event] = {}
        # recent channels' servers and parent channels
        self._known_places: OrderedDict[str, tuple[str | None, str | None]] = OrderedDict()
        self._init_cache: dict[str, Snapshot] = {}
        self._seeds = random.Random(config.seed)
        self.limits = SettingLimits(ranges=SETTING_RANGES, max_tokens=config.chat_max_tokens)
        self.states = ChannelStates(
            store,
            fingerprint=engine.spec.fingerprint,
            read=engine.read,
            policy=config.states,
            opening=self._opening,
            encode=self._encode,
        )

    # ----------------------------------------------------------------- messages

    async def respond(self, channel_id: str, message: str) -> Outcome:
        """Handle a message and return only its outcome (no streaming)."""
        outcome: Outcome | None = None
        async for event in self.handle(channel_id, message):
            if isinstance(event, Outcome):
                outcome = event
        assert outcome is not None
        return outcome

    async def context(self, channel_id: str) -> ChannelContext:
        """What a message of this channel works with, read once: its checked settings (a value
        stored wrong is logged and the default used) and its preset."""
        stored = await self.store.channels.settings(channel_id)
        settings = checked_settings(stored, self.limits, self.presets, channel_id)
        preset = self.presets.get(str(settings.get("preset")), self.presets[self.config.default_preset])
        if "system_prompt" in settings:
            preset = preset.with_system(settings["system_prompt"])
        return ChannelContext(channel_id, settings, preset)

    async def handle(
        self,
        channel_id: str,
        message: str | Parsed | GrammarError,
        *,
        cancel: threading.Event | None = None,
        guild_id: str | None = None,
        parent_id: str | None = None,
        context: ChannelContext | None = None,
        speaker: str | None = None,
    ) -> AsyncGenerator[ChatEvent, None]:
        """Handle a message: text pieces while the model writes, then one :class:`Outcome`.

        ``message`` is the text, or what :func:`~chat.grammar.parse_message` made of it (a front
        end that looked at the command first need not parse twice); ``context`` is the channel's
        context when the front end read it already (else it is read here). Setting ``cancel``
        stops a generation early; what was written so far is kept as the reply. ``guild_id``
        records the server of the channel (for server-wide resets), and ``parent_id`` the channel
        of a thread (purged with it). ``speaker`` is the writer's name, given to the model in
        chat turns unless the channel's ``speaker_names`` setting is off (sanitised: see
        :func:`chat.presets.clean_speaker`).
        """
        parsed = parse_message(message) if isinstance(message, str) else message
        if isinstance(parsed, GrammarError):
            yield Outcome(OutcomeKind.ERROR, parsed.message)
            return
        async with self._channel(channel_id):
            self._cancel[channel_id] = cancel or threading.Event()
            try:
                await self._lease(channel_id)
                if guild_id is not None:
                    await self.record_place(channel_id, guild_id, parent_id)
                ctx = context or await self.context(channel_id)
                if speaker is not None:
                    ctx = replace(ctx, speaker=speaker)
                async for event in self._dispatch(ctx, parsed):
                    yield event
            except EngineError as exc:
                log.error("channel %s: the model failed: %s", channel_id, exc)
                yield Outcome(
                    OutcomeKind.ERROR, f"Sorry, the model failed ({exc}). The conversation is unchanged."
                )
            except FencedError as exc:
                log.warning("channel %s: %s; this service forgets it", channel_id, exc)
                self.states.forget(channel_id)
                yield Outcome(OutcomeKind.ERROR, MOVED)
            except StoreError as exc:
                log.error("channel %s: the database failed: %s", channel_id, exc)
                yield Outcome(
                    OutcomeKind.ERROR, f"Sorry, this could not be saved ({exc}). Nothing was changed."
                )
            finally:
                self._cancel.pop(channel_id, None)

    def busy(self, channel_id: str) -> bool:
        """True while a message of this channel is being handled."""
        lock = self._locks.get(channel_id)
        return lock is not None and lock.lock.locked()

    def stop(self, channel_id: str) -> bool:
        """Stop the generation running in a channel; False when none is running."""
        event = self._cancel.get(channel_id)
        if event is None or event.is_set():
            return False
        event.set()
        return True

    async def prepare(self) -> None:
        """Compute (or load) the default preset's initial snapshot before the first message."""
        await self._init_snapshot(self.presets[self.config.default_preset])

    async def close(self) -> None:
        """Close the database (writes in flight finish first); the engine is the caller's."""
        await self.store.close()

    # ----------------------------------------------------------------- conversations

    async def reset(self, channel_id: str) -> None:
        """Reset a channel's conversation (undoable with :meth:`undo_reset`)."""
        async with self._channel(channel_id), self._fenced(channel_id):
            await self._lease(channel_id)
            await self._reset(channel_id, (await self.context(channel_id)).preset)

    async def undo_reset(self, channel_id: str) -> bool:
        """Bring back the conversation of before the last reset; False when there is none."""
        async with self._channel(channel_id), self._fenced(channel_id):
            await self._lease(channel_id)
            return await self.states.undo_reset(channel_id, Turn("undo-reset", "", "", 0))

    async def purge(self, channel_id: str) -> bool:
        """Forget a deleted channel: its states, transcript and settings. False if none were kept."""
        self.stop(channel_id)
        async with self._channel(channel_id), self._fenced(channel_id):
            await self._lease(channel_id)
            self.states.tiers.drop(channel_id)
            self._known_places.pop(channel_id, None)
            return await self.store.admin.purge_channel(channel_id, epoch=self.states.fence(channel_id))

    async def housekeeping(self, now: float | None = None) -> dict[str, int]:
        """Retention and the database budget (see :func:`chat.housekeeping.keep_house`)."""
        return await keep_house(self, now)

    # ----------------------------------------------------------------- settings

    async def channel_settings(self, channel_id: str) -> dict[str, Any]:
        """The channel's own settings, checked (see :meth:`context`)."""
        return (await self.context(channel_id)).settings

    async def update_settings(self, channel_id: str, **values: Any) -> list[str]:
        """Validate and store channel settings; returns what was set, as readable lines.

        Raises ValueError with a message for the user when a value is not allowed.
        """
        current = dict(await self.channel_settings(channel_id))
        changes: list[str] = []
        for name, value in values.items():
            if value is None:
                continue
            if name in self.limits.ranges:
                number = float(value)
                if not self.limits.check(name, number):
                    low, high = self.limits.ranges[name]
                    raise ValueError(f"{name} must be between {low:g} and {high:g}, not {number:g}")
                current[name] = number
                changes.append(f"{name} {number:g}")
            elif name == "max_tokens":
                if not self.limits.check(name, int(value)):
                    raise ValueError(
                        f"max_tokens must be between 1 and {self.limits.max_tokens}, not {value}"
                    )
                current[name] = int(value)
                changes.append(f"max_tokens {int(value)}")
            elif name == "preset":
                if value not in self.presets:
                    raise ValueError(f"no preset {value!r}; known: {', '.join(sorted(self.presets))}")
                current[name] = value
                changes.append(f"preset {value} (the conversation starts afresh)")
            elif name == "system_prompt":
                changes.append(_set_system_prompt(current, str(value)))
            elif name in SWITCHES:
                current[name] = bool(value)
                changes.append(f"{name} {'on' if value else 'off'}")
            elif name == "thinking":
                if not self.limits.check(name, value):
                    raise ValueError(f"thinking must be one of {', '.join(self.limits.thinking)}")
                current[name] = value
                changes.append(f"thinking {value}")
            else:
                raise ValueError(f"unknown setting {name!r}")
        if changes:
            await self.store.channels.set_settings(channel_id, current)
        return changes

    async def reset_policy(self, guild_id: str) -> str:
        """Who may use ``+reset`` in text in a server: ``everyone`` (the default) or
        ``moderators`` (a value stored wrong reads as the default)."""
        policy = (await self.store.channels.guild_settings(guild_id)).get("reset_policy")
        return policy if policy in RESET_POLICIES else RESET_POLICIES[0]

    async def set_reset_policy(self, guild_id: str, policy: str) -> None:
        """Set who may use ``+reset`` in a server; ValueError for an unknown policy."""
        if policy not in RESET_POLICIES:
            raise ValueError(f"reset_policy must be one of {', '.join(RESET_POLICIES)}")
        settings = await self.store.channels.guild_settings(guild_id)
        settings["reset_policy"] = policy
        await self.store.channels.set_guild_settings(guild_id, settings)

    async def may_reset(self, guild_id: str | None, moderator: bool) -> bool:
        """Whether a member may reset a conversation with ``+reset`` in text."""
        return guild_id is None or moderator or await self.reset_policy(guild_id) == "everyone"

    # ----------------------------------------------------------------- who may talk to it

    async def role_rules(self, guild_id: str | None, channel_id: str) -> RoleRules:
        """The roles allowed and denied in a channel (its server's and its own settings)."""
        server = {} if guild_id is None else await self.store.channels.guild_settings(guild_id)
        return RoleRules.combined(server, await self.channel_settings(channel_id))

    async def set_role_rule(self, guild_id: str, channel_id: str | None, role_id: str, rule: str) -> str:
        """Allow or deny a role in a server (``channel_id`` None) or a channel, or remove what was
        set for it there; the change as a line. ValueError for an unknown rule or role id."""
        if rule not in ROLE_RULES or not role_id.isdigit():
            raise ValueError(f"the rule must be one of {', '.join(ROLE_RULES)}, for a role")
        channels = self.store.channels
        if channel_id is None:
            settings = await channels.guild_settings(guild_id)
        else:
            settings = dict(await self.channel_settings(channel_id))
        for key in ROLE_LISTS.values():
            kept = [r for r in settings.get(key, []) if r != role_id]
            settings[key] = kept
            if not kept:
                del settings[key]
        if rule in ROLE_LISTS:
            settings[ROLE_LISTS[rule]] = [*settings.get(ROLE_LISTS[rule], []), role_id]
        if channel_id is None:
            await channels.set_guild_settings(guild_id, settings)
        else:
            await channels.set_settings(channel_id, settings)
        where = "this server" if channel_id is None else "this channel"
        return {"allow": "allowed", "deny": "denied", "remove": "back to the default"}[rule] + f" in {where}"

    # ----------------------------------------------------------------- where the bot talks

    async def record_place(self, channel_id: str, guild_id: str, parent_id: str | None) -> None:
        """Record a channel's server (and a thread's channel), for server-wide resets and so that
        a thread is forgotten with its channel; written only when it is new."""
        place = (guild_id, parent_id)
        if self._known_places.get(channel_id) == place:
            return
        await self.store.channels.set_place(channel_id, guild_id, parent_id)
        self._known_places[channel_id] = place
        while len(self._known_places) > _KNOWN_PLACES:
            self._known_places.popitem(last=False)

    async def enabled_channels(self, guild_id: str | None = None) -> set[str]:
        """Channels where moderators enabled the bot (of one server, when given)."""
        return await self.store.channels.enabled(guild_id)

    async def disabled_threads(self) -> set[str]:
        """Threads switched off on their own while their channel is enabled."""
        return await self.store.channels.disabled_threads()

    async def set_enabled(
        self, channel_id: str, guild_id: str, enabled: bool, by: str, *, parent_id: str | None = None
    ) -> bool:
        """Enable or disable the bot in a channel or thread. A thread follows its channel unless
        switched off on its own: disabling a thread of an enabled channel records that, and
        returns True (the front end then stops answering there although the channel is on)."""
        if parent_id is not None:
            await self.record_place(channel_id, guild_id, parent_id)
        override = (
            not enabled and parent_id is not None and parent_id in await self.enabled_channels(guild_id)
        )
        await self.store.channels.set_enabled(channel_id, guild_id, enabled, by, override=override)
        return override

    async def server_channels(self, guild_id: str) -> list[str]:
        """The conversations of a server (for a server-wide reset)."""
        return await self.store.channels.guild_channels(guild_id)

    async def server_conversations(self, guild_id: str) -> set[str]:
        """Everything kept for a server: its conversations and its enabled channels."""
        return set(await self.store.channels.guild_channels(guild_id)) | await self.enabled_channels(guild_id)

    async def threads_of(self, channel_id: str) -> list[str]:
        """The threads recorded under a channel (archived ones included)."""
        return await self.store.channels.threads_of(channel_id)

    async def forget_server_settings(self, guild_id: str) -> None:
        """Delete a server's own settings (its conversations are purged one by one)."""
        await self.store.channels.forget_guild(guild_id)

    # ----------------------------------------------------------------- numbers

    def state_metrics(self) -> dict[str, int]:
        """The state tiers' numbers: channels and bytes in each tier, budgets, restores."""
        return self.states.metrics()

    def device_state_bytes(self) -> dict[str, int]:
        """Bytes of conversation states on each device."""
        return self.states.tiers.device_usage()

    async def _lease(self, channel_id: str) -> None:
        """Hold the channel's lease when this service shares its store (see :attr:`owner`)."""
        if self.owner is not None:
            await self.states.lease(channel_id, self.owner)

    @asynccontextmanager
    async def _fenced(self, channel_id: str) -> AsyncIterator[None]:
        """Forget the channel when another service took it meanwhile (the error goes on)."""
        try:
            yield
        except FencedError as exc:
            log.warning("channel %s: %s; this service forgets it", channel_id, exc)
            self.states.forget(channel_id)
            raise

    @asynccontextmanager
    async def _channel(self, channel_id: str) -> AsyncIterator[None]:
        """Hold the channel's lock; the lock is forgotten when nobody holds or awaits it."""
        entry = self._locks.get(channel_id)
        if entry is None:
            entry = self._locks[channel_id] = _ChannelLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[channel_id]
