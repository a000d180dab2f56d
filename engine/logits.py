"""Logit shaping: what the reference chat does to the logits before a token is sampled.

Per sequence and in this order: ban the last token when it is an avoid-repeat one (Chinese
punctuation); chat: add the newline bias of the token index and ban end-of-text; free: add the
request's newline bias; subtract the penalties. :class:`Shaper` holds a generation's part of
that (its last token, its penalties) and states the rule once (:meth:`Shaper.rules`);
:func:`shape_one` applies it to one sequence, :func:`shape_batch` to a batch in a few indexed
operations, with the same numbers bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engine.gpu import to_device
from engine.interface import GenerationRequest, ReplyMode
from engine.sampling import BANNED, PenaltyTracker, chat_newline_bias
from engine.tokenizer import Tokenizer

# After one of these Chinese punctuation tokens, the same token is banned for the next step.
AVOID_REPEAT = "，：？！"


def avoid_repeat_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Token ids of the punctuation that must not repeat (only where it is one token)."""
    ids = set()
    for char in AVOID_REPEAT:
        encoded = tokenizer.encode(char)
        if len(encoded) == 1:
            ids.add(encoded[0])
    return frozenset(ids)


class Shaper:
    """The shaping state of one generation: its last token and its penalties."""

    def __init__(self, request: GenerationRequest, avoid_ids: frozenset[int], last: int | None) -> None:
        self.request = request
        self.avoid_ids = avoid_ids
        self.chat = request.mode is ReplyMode.CHAT
        s = request.sampling
        self.penalties = PenaltyTracker(s.presence_penalty, s.frequency_penalty, s.penalty_decay)
        self.last = last

    def add(self, token: int) -> None:
        """Record a sampled token (it will be fed): its penalty, and the last token."""
        self.penalties.add(token)
        self.last = token

    def rules(self, index: int) -> tuple[int | None, float | None, bool]:
        """For the token of ``index``: the token to ban (or None), the bias to add to the newline
        logit (None: leave it), and whether end-of-text is banned. The penalties come last."""
        banned = self.last if self.last is not None and self.last in self.avoid_ids else None
        if self.chat:
            return banned, chat_newline_bias(index), True
        return banned, self.request.newline_bias or None, False


def shape_one(logits: torch.Tensor, shaper: Shaper, index: int, newline_id: int, eos_id: int) -> torch.Tensor:
    """The shaped float32 logits of one sequence (a new tensor: the raw logits stay for snapshots)."""
    shaped = logits.clone().float()
    banned, newline_bias, ban_eos = shaper.rules(index)
    if banned is not None:
        shaped[banned] = BANNED
    if newline_bias is not None:
        shaped[newline_id] += newline_bias
    if ban_eos:
        shaped[eos_id] = BANNED
    shaper.penalties.apply(shaped)
    return shaped


def shape_batch(
    logits: Sequence[torch.Tensor],
    shapers: Sequence[Shaper],
    indices: Sequence[int],
    newline_id: int,
    eos_id: int,
) -> torch.Tensor:
    """The shaped logits [R, vocab] of a batch, one row per sequence: :func:`shape_one`'s numbers.

    Each step is one indexed operation for the batch (every (row, column) pair occurs once per
    operation, so the values are the per-row ones).
    """
    shaped = torch.stack(list(logits)).float()  # a new tensor: the raw logits stay for snapshots
    device = shaped.device
    ban_rows: list[int] = []
    ban_cols: list[int] = []
    nl_rows: list[int] = []
    nl_bias: list[float] = []
    eos_rows: list[int] = []
    for row, (shaper, at) in enumerate(zip(shapers, indices, strict=True)):
        banned, newline_bias, ban_eos = shaper.rules(at)
        if banned is not None:
            ban_rows.append(row)
            ban_cols.append(banned)
        if newline_bias is not None:
            nl_rows.append(row)
            nl_bias.append(newline_bias)
        if ban_eos:
            eos_rows.append(row)

    def index(values: list[int]) -> torch.Tensor:
        return to_device(torch.tensor(values, dtype=torch.long), device)

    def floats(values: list[float]) -> torch.Tensor:
        return to_device(torch.tensor(values, dtype=shaped.dtype), device)

    if ban_rows:
        shaped[index(ban_rows), index(ban_cols)] = BANNED
    if nl_rows:
        rows = index(nl_rows)
        shaped[rows, newline_id] = shaped[rows, newline_id] + floats(nl_bias)
    if eos_rows:
        shaped[index(eos_rows), eos_id] = BANNED
    trackers = [shaper.penalties for shaper in shapers]
    lengths = [len(t) for t in trackers]
    if any(lengths):
        # every (row, id) pair once: the ids of a reply are distinct
        rows = to_device(torch.repeat_interleave(torch.arange(len(trackers)), torch.tensor(lengths)), device)
        cols = to_device(torch.from_numpy(np.concatenate([t.ids for t in trackers])), device)
        counts = to_device(
            torch.from_numpy(np.concatenate([t.values for t in trackers])).to(shaped.dtype), device
        )
        presence = floats([t.presence for t in trackers])[rows]
        frequency = floats([t.frequency for t in trackers])[rows]
        shaped[rows, cols] = shaped[rows, cols] - (presence + counts * frequency)
    return shaped
