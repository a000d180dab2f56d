"""CUDA graphs of the decode step, one per batch bucket (1, 2, 4, 8, ...) and kind of batch.

Launch overhead dominates a decode step at small batches; a graph replays the whole step's
kernels at once. A batch of ``n`` sequences runs in the graph of the next power of two; its
padding rows write either free slots after the batch (the in-place kind, for the slot run
``0..n-1``) or the scratch slot (the gathered kind, for any slots).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

# The decode step with device-side slot indices (gathered), and in place on the slots 0..n-1.
IndexedStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
RunStep = Callable[[torch.Tensor], torch.Tensor]


class StepGraph(Protocol):
    """A captured decode step of one bucket (a :class:`DecodeGraph`, or a test's stand-in)."""

    def run(self, slots: torch.Tensor | None, tokens: torch.Tensor, scratch: int) -> torch.Tensor:
        """Replay the step for ``tokens`` (and ``slots``, gathered kind); the batch's logits."""


class DecodeGraph:
    """A CUDA graph of one decode step for a fixed batch bucket, with its static buffers.

    ``in_place``: the step of the slot run ``0..bucket-1`` in place (the caller makes sure that
    the slots past its batch are free: the padding rows write them); otherwise the batch's slots
    are gathered by index, and the padding rows read and write the scratch slot only.
    """

    def __init__(
        self,
        device: torch.device,
        scratch_slot: int,
        steps: tuple[IndexedStep, RunStep],
        bucket: int,
        pool: Any,
        *,
        in_place: bool,
    ) -> None:
        indexed, run = steps
        self.bucket = bucket
        self.in_place = in_place
        self.slots = torch.full((bucket,), scratch_slot, dtype=torch.long, device=device)
        self.tokens = torch.zeros(bucket, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: lazy init and Triton autotuning happen outside
            for _ in range(2):  # capture; the same kernels on the scratch slot, never a live state
                indexed(self.slots, self.tokens)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the event loop's thread may move conversation states between host and
        # device memory (chat.states) while this worker thread captures.
        # stream=side: the default capture stream is one for the whole process, made on the
        # device current at the first capture; with several GPUs the others' would record nothing.
        with torch.cuda.graph(self.graph, pool=pool, stream=side, capture_error_mode="thread_local"):
            if in_place:
                self.logits = run(self.tokens)
            else:
                self.logits = indexed(self.slots, self.tokens)

    def run(self, slots: torch.Tensor | None, tokens: torch.Tensor, scratch: int) -> torch.Tensor:
        """Replay the step for ``tokens`` (and the batch's ``slots``, gathered kind); returns a
        copy of the logits of the batch's rows."""
        n = tokens.numel()
        if slots is not None:
            self.slots[:n].copy_(slots, non_blocking=True)
            self.slots[n:].fill_(scratch)
        self.tokens[:n].copy_(tokens, non_blocking=True)
        self.tokens[n:].zero_()
        self.graph.replay()
        return self.logits[:n].clone()  # the static buffer is overwritten by the next replay


def graph_buckets(max_batch: int, max_slots: int) -> list[int]:
    """The CUDA-graph buckets that batches of 1 to ``max_batch`` sequences use, largest first."""
    top = min(max_batch, max_slots)
    return sorted({min(bucket_of(n), max_slots) for n in range(1, top + 1)}, reverse=True)


def bucket_of(n: int) -> int:
    """The CUDA-graph batch bucket for ``n`` sequences: the next power of two."""
    bucket = 1
    while bucket < n:
        bucket *= 2
    return bucket
