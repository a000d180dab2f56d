"""The per-sequence generation loop: the reference chat's rules for one sequence.

It is written against two callables (``forward`` feeds tokens and returns logits) so that it is
independent of where the model runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from engine.errors import StateMismatchError
from engine.interface import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    PromptRead,
    ReplyMode,
    StopReason,
    TextDelta,
)
from engine.sampling import BANNED, PenaltyTracker, chat_newline_bias, sample_token
from engine.state import Snapshot
from engine.tokenizer import Tokenizer

# After one of these Chinese punctuation tokens, the same token is banned for the next step.
AVOID_REPEAT = "，：？！"
PENDING_LIMIT = 16  # emit text anyway once this many tokens failed to form whole characters

# Feeds tokens to a state (None: a zero state) and returns (logits after the last, new state).
Forward = Callable[[list[int], list[torch.Tensor] | None], tuple[torch.Tensor, list[torch.Tensor]]]


def avoid_repeat_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Token ids of the punctuation that must not repeat (only where it is one token)."""
    ids = set()
    for char in AVOID_REPEAT:
        encoded = tokenizer.encode(char)
        if len(encoded) == 1:
            ids.add(encoded[0])
    return frozenset(ids)


def visible_text(text: str) -> str:
    """The reply text outside ``<think>...</think>`` sections (an open one hides the rest)."""
    out = []
    rest = text
    while True:
        start = rest.find("<think>")
        if start < 0:
            out.append(rest)
            break
        out.append(rest[:start])
        end = rest.find("</think>", start)
        if end < 0:
            break
        rest = rest[end + len("</think>") :]
    return "".join(out)


class SequenceRunner:
    """Runs one :class:`GenerationRequest` to the end with a ``forward`` function."""

    def __init__(
        self,
        forward: Forward,
        tokenizer: Tokenizer,
        fingerprint: str,
        chunk_len: int = 256,
        layout: list[tuple[torch.dtype, torch.device]] | None = None,
    ) -> None:
        self.forward = forward
        # dtype and device of each state tensor where the model reads it: a snapshot stored by a
        # run with another strategy (fp32 on the CPU, say) is moved and cast on the way in.
        self.layout = layout
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.chunk_len = chunk_len
        self.avoid_ids = avoid_repeat_ids(tokenizer)

    def feed(
        self,
        start: Snapshot | None,
        tokens: list[int],
        meta: dict[str, Any] | None = None,
        cancel: threading.Event | None = None,
    ) -> Snapshot:
        """Feed tokens in chunks; the start snapshot is copied, never changed."""
        state = self.adopt(start.tensors) if start is not None else None
        logits = start.logits if start is not None else None
        last = start.last_token if start is not None else None
        for i in range(0, len(tokens), self.chunk_len):
            if cancel is not None and cancel.is_set() and logits is not None:
                break  # stopped while reading: the caller sees the cancel and stores nothing
            out, state = self.forward(tokens[i : i + self.chunk_len], state)
            logits = out.detach().float().reshape(-1)
            last = tokens[min(i + self.chunk_len, len(tokens)) - 1]
        if logits is None:
            raise ValueError("a generation needs a prompt or a start snapshot with logits")
        assert state is not None
        return Snapshot(list(state), logits, last, self.fingerprint, dict(meta or {}))

    def adopt(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Fresh copies of state tensors, on the model's device and in its dtypes."""
        if self.layout is None:
            return [t.clone() for t in tensors]
        if len(tensors) != len(self.layout):
            raise StateMismatchError(
                f"a state of {len(tensors)} tensors does not fit this model ({len(self.layout)})"
            )
        return [
            t.to(device=device, dtype=dtype, copy=True)
            for t, (dtype, device) in zip(tensors, self.layout, strict=True)
        ]

    def run(self, request: GenerationRequest) -> Iterator[GenerationEvent]:
        """Yield :class:`PromptRead`, then :class:`TextDelta` pieces, then :class:`Finished`."""
        meta = {"mode": request.mode.value, "newline_bias": request.newline_bias}
        snapshot = self.feed(request.start, request.prompt, meta, request.cancel)
        yield PromptRead(snapshot)

        generator = torch.Generator(device="cpu")
        if request.seed is not None:
            generator.manual_seed(request.seed)
        else:
            generator.seed()
        sampling = request.sampling
        penalties = PenaltyTracker(
            sampling.presence_penalty, sampling.frequency_penalty, sampling.penalty_decay
        )
        tok = self.tokenizer
        state = self.adopt(snapshot.tensors)
        logits = snapshot.logits
        last = snapshot.last_token
        tokens: list[int] = []
        emitted = 0  # tokens already turned into streamed text
        text = ""
        chat = request.mode is ReplyMode.CHAT
        limit = request.max_tokens if chat else request.max_tokens + request.extra_tokens
        reason = StopReason.LENGTH

        for index in range(limit):
            if request.cancel.is_set():
                reason = StopReason.CANCELLED
                break
            shaped = logits.clone().float()
            if last is not None and last in self.avoid_ids:
                shaped[last] = BANNED
            if chat:
                shaped[tok.newline_id] += chat_newline_bias(index)
                shaped[tok.eos_id] = BANNED
            elif request.newline_bias:
                shaped[tok.newline_id] += request.newline_bias
            penalties.apply(shaped)
            token = sample_token(shaped, sampling.temperature, sampling.top_p, sampling.top_k, generator)
            if not chat and token == tok.eos_id:
                reason = StopReason.END_OF_TEXT
                break
            penalties.add(token)
            out, state = self.forward([token], state)
            logits = out.detach().float().reshape(-1)
            last = token
            tokens.append(token)

            piece = tok.decode(tokens[emitted:])
            clean = "\ufffd" not in piece
            if clean or len(tokens) - emitted >= PENDING_LIMIT:
                text += piece
                emitted = len(tokens)
                if piece:
                    yield TextDelta(piece)
            if chat:
                if "\n\n" in (visible_text(text) if request.thinking else text):
                    reason = StopReason.END_OF_TURN
                    break
            elif clean and index + 1 >= request.max_tokens:
                reason = StopReason.LENGTH
                break

        if emitted < len(tokens):
            piece = tok.decode(tokens[emitted:])
            text += piece
            if piece:
                yield TextDelta(piece)
        final = Snapshot(list(state), logits, last, self.fingerprint, dict(meta))
        yield Finished(final, tokens, text, reason, len(request.prompt))
