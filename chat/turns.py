"""The commands of the chat grammar: what each does to a channel's states, and the one path
every generating command takes (generate, stream, store the turn in one transaction).

:class:`TurnCommands` is part of :class:`chat.session.ChatService` (its only user); it is kept
apart so that the service's own file holds the door (entry points, settings, administration).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, Protocol

from chat.grammar import HELP_TEXT, Command, Overrides, Parsed
from chat.outcome import ChatEvent, Outcome, OutcomeKind, split_thinking
from chat.presets import Preset
from chat.settings import ChannelContext, ChatConfig
from chat.states import CarryOver, ChannelStates, Loaded, Step
from chat.storage import HeadName, Storage, Turn
from chat.tuned_states import tuned_opening
from engine.errors import EngineError, StateMismatchError
from engine.interface import Engine, Finished, GenerationRequest, PromptRead, ReplyMode, StopReason, TextDelta
from engine.state import Snapshot
from engine.tokenizer import encode_prompt

log = logging.getLogger(__name__)

INSTRUCTION_TEMPLATE = (
    "\nBelow is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n# Instruction:\n{text}\n\n# Response:\n"
)
_FREE_COMMANDS = {Command.GEN, Command.INSTRUCT, Command.QQ, Command.QA}
OPENINGS_KEPT = 32  # opening states held in memory (one per preset and distinct system prompt)


class FaqLookup(Protocol):
    """Answers ``+faq`` questions from the bundled knowledge base."""

    def answer(self, query: str) -> str | None:
        """The answer text, or None when no topic matches well enough."""

    def miss(self, query: str) -> str:
        """The reply when nothing answers: the closest topics to ask again with."""


class TurnCommands:
    """The grammar's commands, on the service's engine, states and store."""

    engine: Engine
    store: Storage
    states: ChannelStates
    presets: dict[str, Preset]
    config: ChatConfig
    faq: FaqLookup | None
    _cancel: dict[str, threading.Event]
    _seeds: random.Random
    _init_cache: dict[str, Snapshot]

    async def _reset(self, channel_id: str, preset: Preset) -> None:
        await self._init_snapshot(preset)  # stored before anything points at it
        await self.states.reset(channel_id, preset.key, Turn("+reset", "", "", 0))

    async def _init_snapshot(self, preset: Preset) -> Snapshot:
        cached = self._init_cache.get(preset.key)
        if cached is not None:
            return cached
        fingerprint = self.engine.spec.fingerprint
        snapshot = await self.store.states.load_opening(preset.key, fingerprint)
        if snapshot is None:
            start = None if preset.state_file is None else await tuned_opening(self.engine, preset.state_file)
            if start is None or preset.init_prompt.strip():
                snapshot = await self.engine.read(start, await self._encode(preset.init_prompt))
            else:
                snapshot = start
            await self.store.states.save_opening(preset.key, snapshot)
        snapshot = await self.engine.shared(snapshot)  # every new channel starts from it
        self._init_cache[preset.key] = snapshot
        if len(self._init_cache) > OPENINGS_KEPT:  # personas come and go: drop the oldest
            del self._init_cache[next(iter(self._init_cache))]  # (stored; read back if needed)
        return snapshot

    async def _opening(self, preset_key: str) -> Snapshot:
        """The opening state of a preset by its key (also of an edited preset's earlier version,
        as long as its stored copy exists)."""
        for preset in self.presets.values():
            if preset.key == preset_key:
                return await self._init_snapshot(preset)
        snapshot = await self.store.states.load_opening(preset_key, self.engine.spec.fingerprint)
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

    async def _dispatch(self, ctx: ChannelContext, parsed: Parsed) -> AsyncIterator[ChatEvent]:
        channel_id = ctx.channel_id
        notices = list(parsed.notices)
        command = parsed.command
        if command is Command.HELP:
            head = f"Unknown command {parsed.unknown}.\n" if parsed.unknown else ""
            yield Outcome(OutcomeKind.HELP, head + HELP_TEXT, tuple(notices))
        elif command is Command.SETTINGS:
            yield await self._save_settings(ctx, parsed.overrides, notices)
        elif command is Command.FAQ:
            answer = self.faq.answer(parsed.text) if self.faq is not None else None
            if answer is None:
                unavailable = "The FAQ is not available here."
                text = self.faq.miss(parsed.text) if self.faq is not None else unavailable
                yield Outcome(OutcomeKind.NOTICE, text, tuple(notices))
            else:
                yield Outcome(OutcomeKind.FAQ, answer, tuple(notices))
        elif command is Command.RESET:
            await self._reset(channel_id, ctx.preset)
            yield Outcome(OutcomeKind.NOTICE, "Chat reset.", tuple(notices))
        elif command is Command.CHAT:
            async for event in self._chat(ctx, parsed, notices):
                yield event
        elif command is Command.RETRY_CHAT:
            async for event in self._retry_chat(ctx, parsed, notices):
                yield event
        else:
            async for event in self._free(ctx, parsed, notices):
                yield event

    async def _save_settings(self, ctx: ChannelContext, overrides: Overrides, notices: list[str]) -> Outcome:
        settings = {**ctx.settings, **overrides.items()}
        await self.store.channels.set_settings(ctx.channel_id, settings)
        shown = ", ".join(f"{k} {v:g}" for k, v in overrides.items().items())
        return Outcome(OutcomeKind.NOTICE, f"Saved as this channel's defaults: {shown}.", tuple(notices))

    async def _chat(
        self, ctx: ChannelContext, parsed: Parsed, notices: list[str]
    ) -> AsyncIterator[ChatEvent]:
        channel_id, preset = ctx.channel_id, ctx.preset
        try:
            loaded = await self.states.load(channel_id, HeadName.CHAT, notices)
        except CarryOver as why:
            loaded = await self.states.carry_over(channel_id, preset.key, preset.chat_turn, str(why), notices)
        if loaded is not None and loaded.preset_key != preset.key:
            notices.append("This channel's prompt preset changed, so the conversation starts afresh.")
            loaded = None
        start = loaded or self.states.root(await self._init_snapshot(preset), preset.key)
        text = await self._cap_input(parsed.text, notices)
        prompt = await self._encode(preset.chat_turn(text, ctx.named_speaker))
        async for event in self._run(
            ctx,
            kind=OutcomeKind.REPLY,
            start=start,
            prompt=prompt,
            overrides=parsed.overrides,
            mode=ReplyMode.CHAT,
            newline_bias=0.0,
            notices=notices,
            targets=(HeadName.CHAT_PRE, HeadName.CHAT),
            turn=Turn("chat", parsed.text, "", 0),
        ):
            yield event

    async def _retry_chat(
        self, ctx: ChannelContext, parsed: Parsed, notices: list[str]
    ) -> AsyncIterator[ChatEvent]:
        loaded = await self.states.load(ctx.channel_id, HeadName.CHAT_PRE, notices)
        if loaded is None:
            yield Outcome(
                OutcomeKind.NOTICE,
                "There is no chat reply to retry yet: send a message first.",
                tuple(notices),
            )
            return
        async for event in self._run(
            ctx,
            kind=OutcomeKind.REPLY,
            start=loaded,
            prompt=[],
            overrides=parsed.overrides,
            mode=ReplyMode.CHAT,
            newline_bias=0.0,
            notices=notices,
            targets=(None, HeadName.CHAT),
            turn=Turn("+", "", "", 0),
        ):
            yield event

    async def _free(
        self, ctx: ChannelContext, parsed: Parsed, notices: list[str]
    ) -> AsyncIterator[ChatEvent]:
        command = parsed.command
        channel_id, preset = ctx.channel_id, ctx.preset
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
            targets: tuple[HeadName | None, HeadName] = (HeadName.GEN_0, HeadName.GEN_1)
        else:
            name = HeadName.GEN_1 if command is Command.CONTINUE else HeadName.GEN_0
            loaded = await self.states.load(channel_id, name, notices)
            if loaded is None or loaded.snapshot is None:
                what = "continue" if command is Command.CONTINUE else "retry"
                yield Outcome(
                    OutcomeKind.NOTICE,
                    f"There is no free generation to {what} yet: start one with +gen, +i, +qq or +qa.",
                    tuple(notices),
                )
                return
            start = loaded
            newline_bias = float(loaded.snapshot.meta.get("newline_bias", 0.0))
            # +++ continues from gen_1 and makes it the new gen_0, as in the reference.
            targets = (
                (HeadName.GEN_0, HeadName.GEN_1) if command is Command.CONTINUE else (None, HeadName.GEN_1)
            )
        async for event in self._run(
            ctx,
            kind=OutcomeKind.GENERATION,
            start=start,
            prompt=prompt,
            overrides=parsed.overrides,
            mode=ReplyMode.FREE,
            newline_bias=newline_bias,
            notices=notices,
            targets=targets,
            turn=Turn(command.value, parsed.text, "", 0),
        ):
            yield event

    async def _run(
        self,
        ctx: ChannelContext,
        *,
        kind: OutcomeKind,
        start: Loaded,
        prompt: list[int],
        overrides: Overrides,
        mode: ReplyMode,
        newline_bias: float,
        notices: list[str],
        targets: tuple[HeadName | None, HeadName],
        turn: Turn,
    ) -> AsyncIterator[ChatEvent]:
        """Generate, stream, then store the turn's states in one transaction.

        ``targets`` names the states to set: (after the prompt, after the reply); a failed
        generation stores nothing, so the channel keeps its last good state. The state after the
        reply is the engine's read of the reply's tokens from the state before it, so that the
        stored token log rebuilds it exactly (see :mod:`chat.states`).
        """
        channel_id, preset = ctx.channel_id, ctx.preset
        request = self._request(
            ctx, start=start, prompt=prompt, overrides=overrides, mode=mode, newline_bias=newline_bias
        )
        sampling = request.sampling
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
                OutcomeKind.ERROR,
                f"Sorry, the reply failed ({exc}). The conversation is unchanged.",
                tuple(notices),
            )
            return
        assert finished is not None and before is not None
        if finished.reason is StopReason.CANCELLED and not finished.tokens:
            yield Outcome(
                OutcomeKind.NOTICE, "Stopped before the reply began; nothing was changed.", tuple(notices)
            )
            return
        if finished.reason is StopReason.CANCELLED:
            notices.append("The reply was stopped; what was written so far is kept.")
        text = finished.text.strip() if mode is ReplyMode.CHAT else finished.text
        turn = replace(turn, reply_text=text, reply_tokens=len(finished.tokens))
        await self._store_turn(
            channel_id,
            start=start,
            prompt=prompt,
            before=before,
            finished=finished,
            mode=mode,
            targets=targets,
            turn=turn,
        )
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

    def _request(
        self,
        ctx: ChannelContext,
        *,
        start: Loaded,
        prompt: list[int],
        overrides: Overrides,
        mode: ReplyMode,
        newline_bias: float,
    ) -> GenerationRequest:
        """The engine request of a turn: the channel's sampling under the message's overrides,
        the reply's length cap, the channel's stop event and a fresh seed."""
        values: dict[str, Any] = {**ctx.sampling_overrides(), **overrides.items()}
        limit = self.config.chat_max_tokens if mode is ReplyMode.CHAT else self.config.gen_max_tokens
        if "max_tokens" in ctx.settings:
            limit = min(limit, int(ctx.settings["max_tokens"]))
        return GenerationRequest(
            start=start.snapshot,
            prompt=prompt,
            sampling=replace(ctx.preset.sampling, **values),
            mode=mode,
            max_tokens=limit,
            cancel=self._cancel.get(ctx.channel_id) or threading.Event(),
            newline_bias=newline_bias,
            thinking=ctx.preset.thinking,
            seed=self._seeds.randrange(2**63),
        )

    async def _store_turn(
        self,
        channel_id: str,
        *,
        start: Loaded,
        prompt: list[int],
        before: Snapshot,
        finished: Finished,
        mode: ReplyMode,
        targets: tuple[HeadName | None, HeadName],
        turn: Turn,
    ) -> None:
        """Store the turn's states (after the prompt, after the reply) and its transcript line in
        one transaction. A cut chat reply is closed with a blank line, so the next message starts
        a new turn as the chat template expects."""
        reply = list(finished.tokens)
        cut = finished.reason is StopReason.CANCELLED and mode is ReplyMode.CHAT
        if cut and not finished.text.endswith("\n\n"):
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
        await self.states.commit(channel_id, start, steps, heads, turn)
