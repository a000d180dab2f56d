"""The chat session: what a channel message does to that channel's conversation.

This sits between the front ends (terminal, Discord) and the engine. It knows the grammar, the
snapshots of the reference chat and the sampling policy; it imports neither discord nor CUDA code.

Snapshots per channel, as in the reference: ``chat`` (after the last reply), ``chat_pre`` (after
the last user message, before the reply; read by ``+``), ``gen_0`` (after a free-generation
prompt; read by ``++``), ``gen_1`` (after a free generation; read by ``+++``). ``chat_init`` is
the state after a preset's opening prompt, shared by all channels.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from chat.grammar import HELP_TEXT, Command, GrammarError, Overrides, Parsed, parse_message
from chat.presets import Preset
from chat.states import MB, CarryOver, ChannelStates, Loaded, StatePolicy, Step
from chat.store import Store, StoreError, Turn
from engine.errors import EngineError, StateMismatchError
from engine.generation import visible_text
from engine.interface import (
    Engine,
    Finished,
    GenerationRequest,
    PromptRead,
    ReplyMode,
    StopReason,
    TextDelta,
)
from engine.sampling import SAMPLING_RANGES, SamplingParams
from engine.state import Snapshot
from engine.tokenizer import encode_prompt

log = logging.getLogger(__name__)

INSTRUCTION_TEMPLATE = (
    "\nBelow is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n# Instruction:\n{text}\n\n# Response:\n"
)
_FREE_COMMANDS = {Command.GEN, Command.INSTRUCT, Command.QQ, Command.QA}
_SAMPLING_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "penalty_decay")
# Channel settings a moderator may change, with their allowed ranges.
SETTING_RANGES: dict[str, tuple[float, float]] = {
    name: SAMPLING_RANGES[name] for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty")
}
THINKING_DISPLAYS = ("fold", "show", "hide")  # how a front end shows <think> sections
_THINK_RE = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)


class FaqLookup(Protocol):
    """Answers ``+faq`` questions from the bundled knowledge base."""

    def answer(self, query: str) -> str | None:
        """The answer text, or None when no topic matches well enough."""


@dataclass(frozen=True)
class ChatConfig:
    """Limits and defaults of the chat, from the settings."""

    default_preset: str
    max_input_tokens: int = 2048
    gen_max_tokens: int = 256  # +gen/+i/+qq/+qa length (then up to 100 more to end cleanly)
    chat_max_tokens: int = 999  # hard cap of a chat reply
    seed: int | None = None
    states: StatePolicy = field(default_factory=StatePolicy)


@dataclass(frozen=True)
class Outcome:
    """The result of one message: what the front end shows (and ``--jsonl`` prints)."""

    kind: str  # reply, generation, notice, error, help, faq
    text: str
    notices: tuple[str, ...] = ()
    sampling: dict[str, float] | None = None
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    stop_reason: str | None = None
    thinking: str | None = None  # the text of <think> sections, for a front end to fold or hide

    @property
    def answer(self) -> str:
        """The text without thinking sections."""
        return visible_text(self.text).strip() if self.thinking is not None else self.text

    def as_json(self) -> dict[str, Any]:
        """The JSON object of ``--jsonl`` output."""
        data: dict[str, Any] = {"kind": self.kind, "text": self.text}
        if self.notices:
            data["notices"] = list(self.notices)
        if self.sampling is not None:
            data["sampling"] = self.sampling
            data["tokens"] = self.tokens
            data["prompt_tokens"] = self.prompt_tokens
            data["stop_reason"] = self.stop_reason
            data["thinking"] = self.thinking
            data["answer"] = self.answer
        return data


ChatEvent = TextDelta | Outcome


def split_thinking(text: str) -> str | None:
    """The content of ``<think>`` sections of a reply, or None when it has none."""
    parts = _THINK_RE.findall(text)
    return "\n".join(p.strip() for p in parts) if parts else None


@dataclass
class _ChannelLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # holding or waiting


_KNOWN_PLACES = 10_000


class ChatService:
    """Handles the messages of every channel, one at a time per channel."""

    def __init__(
        self,
        engine: Engine,
        store: Store,
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
        self._locks: dict[str, _ChannelLock] = {}  # only channels with a message in hand
        self._cancel: dict[str, threading.Event] = {}
        # recent channels' servers and parent channels
        self._known_places: OrderedDict[str, tuple[str | None, str | None]] = OrderedDict()
        self._init_cache: dict[str, Snapshot] = {}
        self._seeds = random.Random(config.seed)
        self.states = ChannelStates(
            store,
            fingerprint=engine.spec.fingerprint,
            read=engine.read,
            policy=config.states,
            opening=self._opening,
            encode=self._encode,
        )

    # ----------------------------------------------------------------- entry points

    async def respond(self, channel_id: str, message: str) -> Outcome:
        """Handle a message and return only its outcome (no streaming)."""
        outcome: Outcome | None = None
        async for event in self.handle(channel_id, message):
            if isinstance(event, Outcome):
                outcome = event
        assert outcome is not None
        return outcome

    async def handle(
        self,
        channel_id: str,
        message: str,
        *,
        cancel: threading.Event | None = None,
        guild_id: str | None = None,
        parent_id: str | None = None,
    ) -> AsyncGenerator[ChatEvent, None]:
        """Handle a message: text pieces while the model writes, then one :class:`Outcome`.

        Setting ``cancel`` stops a generation early; what was written so far is kept as the
        reply. ``guild_id`` records the server of the channel (for server-wide resets), and
        ``parent_id`` the channel of a thread (purged with it).
        """
        parsed = parse_message(message)
        if isinstance(parsed, GrammarError):
            yield Outcome("error", parsed.message)
            return
        async with self._channel(channel_id):
            self._cancel[channel_id] = cancel or threading.Event()
            try:
                place = (guild_id, parent_id)
                if guild_id is not None and self._known_places.get(channel_id) != place:
                    await self.store.set_channel_place(channel_id, guild_id, parent_id)
                    self._known_places[channel_id] = place
                    while len(self._known_places) > _KNOWN_PLACES:
                        self._known_places.popitem(last=False)
                async for event in self._dispatch(channel_id, parsed):
                    yield event
            except EngineError as exc:
                log.error("channel %s: the model failed: %s", channel_id, exc)
                yield Outcome("error", f"Sorry, the model failed ({exc}). The conversation is unchanged.")
            except StoreError as exc:
                log.error("channel %s: the database failed: %s", channel_id, exc)
                yield Outcome("error", f"Sorry, this could not be saved ({exc}). Nothing was changed.")
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

    def stop_all(self) -> int:
        """Stop every running generation (at shutdown); returns how many were stopped."""
        return sum(self.stop(channel) for channel in list(self._cancel))

    async def reset(self, channel_id: str) -> None:
        """Reset a channel's conversation (undoable with :meth:`undo_reset`)."""
        async with self._channel(channel_id):
            await self._reset(channel_id)

    async def _reset(self, channel_id: str) -> None:
        preset = await self.channel_preset(channel_id)
        await self._init_snapshot(preset)  # stored before anything points at it
        await self.states.reset(channel_id, preset.key, Turn("+reset", "", "", 0))

    async def undo_reset(self, channel_id: str) -> bool:
        """Bring back the conversation of before the last reset; False when there is none."""
        async with self._channel(channel_id):
            return await self.states.undo_reset(channel_id, Turn("undo-reset", "", "", 0))

    async def purge(self, channel_id: str) -> bool:
        """Forget a deleted channel: its states, transcript and settings. False if none were kept."""
        self.stop(channel_id)
        async with self._channel(channel_id):
            self.states.tiers.drop(channel_id)
            self._known_places.pop(channel_id, None)
            return await self.store.purge_channel(channel_id)

    async def housekeeping(self, now: float | None = None) -> dict[str, int]:
        """Retention and the database budget; returns how many channels (or transcript lines)
        each touched.

        Channels idle longer than the retention keep only their chat state. Transcript lines
        older than the transcript retention are deleted: conversations go on from their stored
        states, and only a re-read of a transcript (after a model change or damage, or for a
        channel kept as transcript only) sees fewer messages. While the whole states in the
        database exceed their budget, the least recently used channels that are not in memory
        keep only their transcript (re-read at their next message). Busy channels are skipped;
        each channel is handled under its lock.
        """
        policy = self.config.states
        now = time.time() if now is None else now
        retired = frozen = 0
        if policy.retention_s > 0:
            cutoff = now - policy.retention_s
            skipped: set[str] = set()
            while True:
                batch = [c for c in await self.store.idle_channels(cutoff, 100) if c not in skipped]
                if not batch:
                    break
                for channel in batch:
                    async with self._channel(channel):  # re-checked inside: it may have woken up
                        if await self.states.retire(channel, unused_since=cutoff):
                            retired += 1
                        else:
                            skipped.add(channel)
        if policy.db_bytes > 0:
            usage = await self.store.checkpoint_usage()
            tried: set[str] = set()
            while usage > policy.db_bytes:
                candidates = [
                    (c, size, used)
                    for c, size, used in await self.store.checkpointed_channels(100 + len(tried))
                    if c not in tried and not self.busy(c) and self.states.tiers.where(c) is None
                ]
                if not candidates:
                    log.warning(
                        "the database holds %d MB of states, over its budget of %d MB, all in use",
                        usage // MB,
                        policy.db_bytes // MB,
                    )
                    break
                for channel, size, used in candidates:
                    if usage <= policy.db_bytes:
                        break
                    tried.add(channel)
                    async with self._channel(channel):  # re-checked inside: it may be in use now
                        if await self.states.freeze(channel, unused_since=used):
                            usage -= size
                            frozen += 1
        forgotten = 0
        if policy.transcript_s > 0:
            forgotten = await self.store.delete_turns_before(now - policy.transcript_s)
        if retired or frozen or forgotten:
            log.info(
                "housekeeping: %d idle channels trimmed, %d kept as transcript only, "
                "%d old transcript lines deleted",
                retired,
                frozen,
                forgotten,
            )
        return {"retired": retired, "frozen": frozen, "transcript_lines": forgotten}

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

    async def update_settings(self, channel_id: str, **values: Any) -> list[str]:
        """Validate and store channel settings; returns what was set, as readable lines.

        Raises ValueError with a message for the user when a value is not allowed.
        """
        current = await self.channel_settings(channel_id)
        changes: list[str] = []
        for name, value in values.items():
            if value is None:
                continue
            if name in SETTING_RANGES:
                low, high = SETTING_RANGES[name]
                number = float(value)
                if not low <= number <= high:
                    raise ValueError(f"{name} must be between {low:g} and {high:g}, not {number:g}")
                current[name] = number
                changes.append(f"{name} {number:g}")
            elif name == "max_tokens":
                cap = self.config.chat_max_tokens
                if not 1 <= int(value) <= cap:
                    raise ValueError(f"max_tokens must be between 1 and {cap}, not {value}")
                current[name] = int(value)
                changes.append(f"max_tokens {int(value)}")
            elif name == "preset":
                if value not in self.presets:
                    raise ValueError(f"no preset {value!r}; known: {', '.join(sorted(self.presets))}")
                current[name] = value
                changes.append(f"preset {value} (the conversation starts afresh)")
            elif name == "faq_auto":
                current[name] = bool(value)
                changes.append(f"faq_auto {'on' if value else 'off'}")
            elif name == "thinking":
                if value not in THINKING_DISPLAYS:
                    raise ValueError(f"thinking must be one of {', '.join(THINKING_DISPLAYS)}")
                current[name] = value
                changes.append(f"thinking {value}")
            else:
                raise ValueError(f"unknown setting {name!r}")
        if changes:
            await self.store.set_channel_settings(channel_id, current)
        return changes

    async def channel_settings(self, channel_id: str) -> dict[str, Any]:
        """The channel's stored settings, each checked as :meth:`update_settings` would: a value
        stored wrong (by hand, or by an older version) is logged and left out, so the default
        applies and the channel keeps working."""
        stored = await self.store.channel_settings(channel_id)
        valid: dict[str, Any] = {}
        for name, value in stored.items():
            if self._setting_ok(name, value):
                valid[name] = value
            else:
                log.warning(
                    "channel %s: stored setting %s=%.40r is not valid: using the default",
                    channel_id,
                    name,
                    value,
                )
        return valid

    def _setting_ok(self, name: str, value: object) -> bool:
        number = None if isinstance(value, bool) or not isinstance(value, int | float) else float(value)
        if name in SAMPLING_RANGES:
            low, high = SAMPLING_RANGES[name]
            return number is not None and low <= number <= high
        if name == "max_tokens":
            return number is not None and number.is_integer() and 1 <= number <= self.config.chat_max_tokens
        if name == "preset":
            return isinstance(value, str) and value in self.presets
        if name == "thinking":
            return value in THINKING_DISPLAYS
        if name == "faq_auto":
            return isinstance(value, bool)
        return False

    async def prepare(self) -> None:
        """Compute (or load) the default preset's initial snapshot before the first message."""
        await self._init_snapshot(self.presets[self.config.default_preset])

    # ----------------------------------------------------------------- helpers

    async def channel_preset(self, channel_id: str) -> Preset:
        """The preset a channel uses (its own setting, else the default)."""
        settings = await self.channel_settings(channel_id)
        return self.presets.get(str(settings.get("preset")), self.presets[self.config.default_preset])

    async def _sampling(self, channel_id: str, preset: Preset, overrides: Overrides) -> SamplingParams:
        settings = await self.channel_settings(channel_id)
        values: dict[str, Any] = {k: float(settings[k]) for k in _SAMPLING_FIELDS if k in settings}
        values.update(overrides.items())
        return replace(preset.sampling, **values)

    async def _init_snapshot(self, preset: Preset) -> Snapshot:
        cached = self._init_cache.get(preset.key)
        if cached is not None:
            return cached
        fingerprint = self.engine.spec.fingerprint
        snapshot = await self.store.load_init(preset.key, fingerprint)
        if snapshot is None:
            tokens = await self._encode(preset.init_prompt)
            snapshot = await self.engine.read(None, tokens)
            await self.store.save_init(preset.key, snapshot)
        snapshot = await self.engine.shared(snapshot)  # every new channel starts from it
        self._init_cache[preset.key] = snapshot
        return snapshot

    async def _opening(self, preset_key: str) -> Snapshot:
        """The opening state of a preset by its key (also of an edited preset's earlier version,
        as long as its stored copy exists)."""
        for preset in self.presets.values():
            if preset.key == preset_key:
                return await self._init_snapshot(preset)
        snapshot = await self.store.load_init(preset_key, self.engine.spec.fingerprint)
        if snapshot is None:
            raise StateMismatchError(f"the opening state of preset {preset_key} is no longer stored")
        return snapshot

    async def _encode(self, prompt: str) -> list[int]:
        """Tokenize off the event loop (a long text takes milliseconds the gateway can't spare)."""
        return await asyncio.to_thread(encode_prompt, self.engine.tokenizer, prompt)

    async def _cap_input(self, text: str, notices: list[str]) -> str:
        """The message cut to ``max_input_tokens`` tokens (with a notice when it was cut)."""
        cut, notice = await asyncio.to_thread(self._cap_tokens, text)
        if notice:
            notices.append(notice)
        return cut

    def _cap_tokens(self, text: str) -> tuple[str, str | None]:
        limit = self.config.max_input_tokens
        # No token is longer than 128 characters (World's longest is 128 bytes), so cutting there
        # first loses nothing that would be read, and keeps tokenizing a huge paste cheap.
        precut = text[: limit * 128]
        ids = self.engine.tokenizer.encode(precut)
        if len(ids) <= limit and precut == text:
            return text, None
        notice = f"Your message was longer than {limit} tokens, so only the first {limit} were read."
        return self.engine.tokenizer.decode(ids[:limit]).rstrip("\ufffd"), notice

    # ----------------------------------------------------------------- commands

    async def _dispatch(self, channel_id: str, parsed: Parsed) -> AsyncIterator[ChatEvent]:
        notices = list(parsed.notices)
        command = parsed.command
        if command is Command.HELP:
            head = f"Unknown command {parsed.unknown}.\n" if parsed.unknown else ""
            yield Outcome("help", head + HELP_TEXT, tuple(notices))
        elif command is Command.SETTINGS:
            yield await self._save_settings(channel_id, parsed.overrides, notices)
        elif command is Command.FAQ:
            answer = self.faq.answer(parsed.text) if self.faq is not None else None
            if answer is None:
                text = (
                    f"No FAQ entry matches {parsed.text!r}."
                    if self.faq is not None
                    else "The FAQ is not available here."
                )
                yield Outcome("notice", text, tuple(notices))
            else:
                yield Outcome("faq", answer, tuple(notices))
        elif command is Command.RESET:
            await self._reset(channel_id)
            yield Outcome("notice", "Chat reset.", tuple(notices))
        elif command is Command.CHAT:
            async for event in self._chat(channel_id, parsed, notices):
                yield event
        elif command is Command.RETRY_CHAT:
            async for event in self._retry_chat(channel_id, parsed, notices):
                yield event
        else:
            async for event in self._free(channel_id, parsed, notices):
                yield event

    async def _save_settings(self, channel_id: str, overrides: Overrides, notices: list[str]) -> Outcome:
        settings = await self.channel_settings(channel_id)
        settings.update(overrides.items())
        await self.store.set_channel_settings(channel_id, settings)
        shown = ", ".join(f"{k} {v:g}" for k, v in overrides.items().items())
        return Outcome("notice", f"Saved as this channel's defaults: {shown}.", tuple(notices))

    async def _chat(self, channel_id: str, parsed: Parsed, notices: list[str]) -> AsyncIterator[ChatEvent]:
        preset = await self.channel_preset(channel_id)
        try:
            loaded = await self.states.load(channel_id, "chat", notices)
        except CarryOver as why:
            loaded = await self.states.carry_over(channel_id, preset.key, preset.chat_turn, str(why), notices)
        if loaded is not None and loaded.preset_key != preset.key:
            notices.append("This channel's prompt preset changed, so the conversation starts afresh.")
            loaded = None
        start = loaded or self.states.root(await self._init_snapshot(preset), preset.key)
        text = await self._cap_input(parsed.text, notices)
        prompt = await self._encode(preset.chat_turn(text))
        sampling = await self._sampling(channel_id, preset, parsed.overrides)
        async for event in self._run(
            channel_id=channel_id,
            preset=preset,
            kind="reply",
            start=start,
            prompt=prompt,
            sampling=sampling,
            mode=ReplyMode.CHAT,
            newline_bias=0.0,
            notices=notices,
            targets=("chat_pre", "chat"),
            turn=Turn("chat", parsed.text, "", 0),
        ):
            yield event

    async def _retry_chat(
        self, channel_id: str, parsed: Parsed, notices: list[str]
    ) -> AsyncIterator[ChatEvent]:
        loaded = await self.states.load(channel_id, "chat_pre", notices)
        if loaded is None:
            yield Outcome(
                "notice", "There is no chat reply to retry yet: send a message first.", tuple(notices)
            )
            return
        preset = await self.channel_preset(channel_id)
        sampling = await self._sampling(channel_id, preset, parsed.overrides)
        async for event in self._run(
            channel_id=channel_id,
            preset=preset,
            kind="reply",
            start=loaded,
            prompt=[],
            sampling=sampling,
            mode=ReplyMode.CHAT,
            newline_bias=0.0,
            notices=notices,
            targets=(None, "chat"),
            turn=Turn("+", "", "", 0),
        ):
            yield event

    async def _free(self, channel_id: str, parsed: Parsed, notices: list[str]) -> AsyncIterator[ChatEvent]:
        command = parsed.command
        preset = await self.channel_preset(channel_id)
        sampling = await self._sampling(channel_id, preset, parsed.overrides)
        newline_bias = 0.0
        start = self.states.root(None, preset.key)
        prompt: list[int] = []
        if command in _FREE_COMMANDS:
            text = await self._cap_input(parsed.text, notices)
            if command is Command.GEN:
                prompt = await self._encode("\n" + text.strip())
            elif command is Command.INSTRUCT:
                prompt = await self._encode(INSTRUCTION_TEMPLATE.format(text=text))
            elif command is Command.QQ:
                prompt = await self._encode("\nQ: " + text.strip() + "\nA:")
            else:
                start = self.states.root(await self._init_snapshot(preset), preset.key)
                prompt = await self._encode(preset.chat_turn(text))
                newline_bias = -2.0
            targets: tuple[str | None, str] = ("gen_0", "gen_1")
        else:
            name = "gen_1" if command is Command.CONTINUE else "gen_0"
            loaded = await self.states.load(channel_id, name, notices)
            if loaded is None or loaded.snapshot is None:
                what = "continue" if command is Command.CONTINUE else "retry"
                yield Outcome(
                    "notice",
                    f"There is no free generation to {what} yet: start one with +gen, +i, +qq or +qa.",
                    tuple(notices),
                )
                return
            start = loaded
            newline_bias = float(loaded.snapshot.meta.get("newline_bias", 0.0))
            # +++ continues from gen_1 and makes it the new gen_0, as in the reference.
            targets = ("gen_0", "gen_1") if command is Command.CONTINUE else (None, "gen_1")
        async for event in self._run(
            channel_id=channel_id,
            preset=preset,
            kind="generation",
            start=start,
            prompt=prompt,
            sampling=sampling,
            mode=ReplyMode.FREE,
            newline_bias=newline_bias,
            notices=notices,
            targets=targets,
            turn=Turn(command.value, parsed.text, "", 0),
        ):
            yield event

    async def _run(
        self,
        *,
        channel_id: str,
        preset: Preset,
        kind: str,
        start: Loaded,
        prompt: list[int],
        sampling: SamplingParams,
        mode: ReplyMode,
        newline_bias: float,
        notices: list[str],
        targets: tuple[str | None, str],
        turn: Turn,
    ) -> AsyncIterator[ChatEvent]:
        """Generate, stream, then store the turn's states in one transaction.

        ``targets`` names the states to set: (after the prompt, after the reply); a failed
        generation stores nothing, so the channel keeps its last good state. The state after the
        reply is the engine's read of the reply's tokens from the state before it, so that the
        stored token log rebuilds it exactly (see :mod:`chat.states`).
        """
        settings = await self.channel_settings(channel_id)
        limit = self.config.chat_max_tokens if mode is ReplyMode.CHAT else self.config.gen_max_tokens
        if "max_tokens" in settings:
            limit = min(limit, int(settings["max_tokens"]))
        request = GenerationRequest(
            start=start.snapshot,
            prompt=prompt,
            sampling=sampling,
            mode=mode,
            max_tokens=limit,
            cancel=self._cancel.get(channel_id) or threading.Event(),
            newline_bias=newline_bias,
            thinking=preset.thinking,
            seed=self._seeds.randrange(2**63),
        )
        if start.snapshot is None and not prompt:
            raise ValueError("nothing to generate from")
        before: Snapshot | None = start.snapshot
        finished: Finished | None = None
        try:
            async for event in self.engine.generate(request):
                if isinstance(event, PromptRead):
                    before = event.snapshot
                elif isinstance(event, TextDelta):
                    yield event
                else:
                    finished = event
        except EngineError as exc:
            log.error("channel %s: generation failed: %s", channel_id, exc)
            yield Outcome(
                "error", f"Sorry, the reply failed ({exc}). The conversation is unchanged.", tuple(notices)
            )
            return
        assert finished is not None and before is not None
        if finished.reason is StopReason.CANCELLED and not finished.tokens:
            yield Outcome("notice", "Stopped before the reply began; nothing was changed.", tuple(notices))
            return
        reply = list(finished.tokens)
        if finished.reason is StopReason.CANCELLED:
            notices.append("The reply was stopped; what was written so far is kept.")
            if mode is ReplyMode.CHAT and not finished.text.endswith("\n\n"):
                # Close the cut reply with a blank line, so the next message starts a new turn
                # as the chat template expects.
                reply += await self._encode("\n\n")
        steps: list[Step] = []
        if prompt:
            steps.append(Step(prompt, before))
        after_prompt = len(steps) - 1
        if reply:
            final = await self.engine.read(before, reply)
            steps.append(Step(reply, replace(final, meta=dict(before.meta))))
        heads = {targets[1]: len(steps) - 1}
        if targets[0] is not None:
            heads[targets[0]] = after_prompt
        text = finished.text.strip() if mode is ReplyMode.CHAT else finished.text
        turn = replace(turn, reply_text=text, reply_tokens=len(finished.tokens))
        await self.states.commit(channel_id, start, steps, heads, turn)
        yield Outcome(
            kind,
            text,
            tuple(notices),
            sampling=sampling.as_dict(),
            tokens=finished.tokens,
            prompt_tokens=finished.prompt_tokens,
            stop_reason=finished.reason.value,
            thinking=split_thinking(text) if preset.thinking else None,
        )
