"""The per-sequence generation loop of the reference engine: one sequence at a time.

It is written against a callable (``forward`` feeds tokens and returns logits) so that it is
independent of where the model runs. The shaping (:mod:`engine.logits`) and the stop and
streaming rules (:mod:`engine.output`) are the ones the batched engine uses too; the draw is
:func:`engine.sampling.sample_token` with the request's seeded generator.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from engine.errors import StateMismatchError
from engine.interface import GenerationEvent, GenerationRequest, PromptRead
from engine.logits import Shaper, avoid_repeat_ids, shape_one
from engine.output import OutputProcessor
from engine.sampling import sample_token
from engine.state import Snapshot
from engine.tokenizer import Tokenizer

__all__ = ["Forward", "SequenceRunner"]

# Feeds tokens to a state (None: a zero state) and returns (logits after the last, new state).
Forward = Callable[[list[int], list[torch.Tensor] | None], tuple[torch.Tensor, list[torch.Tensor]]]


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
        meta = request.snapshot_meta()
        snapshot = self.feed(request.start, request.prompt, meta, request.cancel)
        yield PromptRead(snapshot)

        generator = torch.Generator(device="cpu")
        if request.seed is not None:
            generator.manual_seed(request.seed)
        else:
            generator.seed()
        sampling = request.sampling
        tok = self.tokenizer
        shaper = Shaper(request, self.avoid_ids, snapshot.last_token)
        output = OutputProcessor(request, tok)
        state = self.adopt(snapshot.tensors)
        logits = snapshot.logits
        while (reason := output.stop_before_sampling()) is None:
            shaped = shape_one(logits, shaper, output.index, tok.newline_id, tok.eos_id)
            token = sample_token(shaped, sampling.temperature, sampling.top_p, sampling.top_k, generator)
            reason = output.stop_at(token)
            if reason is not None:
                break
            shaper.add(token)
            out, state = self.forward([token], state)
            logits = out.detach().float().reshape(-1)
            events, reason = output.accept(token)
            yield from events
            if reason is not None:
                break
        final = Snapshot(list(state), logits, shaper.last, self.fingerprint, dict(meta))
        yield from output.finish(reason, final, len(request.prompt))
