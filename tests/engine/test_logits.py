"""The shaping of the logits: the batched rows and the one-sequence path give the reference's numbers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.interface import GenerationRequest, ReplyMode
from engine.logits import Shaper, shape_batch, shape_one
from engine.sampling import BANNED, PenaltyTracker, SamplingParams, chat_newline_bias

VOCAB = 5000
NEWLINE, EOS = 11, 0


@dataclass
class Row:
    """A generation in the middle of its generation: its shaping state and token index."""

    shaper: Shaper
    index: int


def reply(mode: ReplyMode, index: int, last: int | None, history: list[int], **extra: Any) -> Row:
    """A reply in the middle of its generation."""
    req = GenerationRequest(None, [1], SamplingParams(), mode, 100, **extra)
    r = Row(Shaper(req, frozenset({77, 78}), last), index)
    for token in history:
        r.shaper.penalties.add(token)
    return r


def reference_shaping(logits: torch.Tensor, r: Row) -> torch.Tensor:
    """The reference chat's shaping of one row, written out."""
    s = r.shaper
    shaped = logits.clone().float()
    if s.last is not None and s.last in s.avoid_ids:
        shaped[s.last] = BANNED
    if s.chat:
        shaped[NEWLINE] += chat_newline_bias(r.index)
        shaped[EOS] = BANNED
    elif s.request.newline_bias:
        shaped[NEWLINE] += s.request.newline_bias
    s.penalties.apply(shaped)
    return shaped


def test_batched_shaping_is_bit_identical_to_the_reference() -> None:
    """Bans, newline biases and penalties of a mixed batch equal the per-row reference exactly;
    so does the one-sequence path."""
    gen = torch.Generator().manual_seed(3)
    replies = [
        reply(ReplyMode.CHAT, 0, 77, []),
        reply(ReplyMode.CHAT, 12, 5, [5, 6, 5, 11, 0]),
        reply(ReplyMode.CHAT, 190, 78, [78, 78, 3]),
        reply(ReplyMode.FREE, 4, None, [9, 9, 9, 11]),
        reply(ReplyMode.FREE, 7, 77, [1, 2, 3], newline_bias=-2.0),
    ]
    replies[3].shaper.penalties = PenaltyTracker(0.3, 0.7, 0.95)
    for token in (9, 4, 9, 11):
        replies[3].shaper.penalties.add(token)
    logits = [torch.randn(VOCAB, generator=gen) * 4 for _ in replies]
    got = shape_batch(logits, [r.shaper for r in replies], [r.index for r in replies], NEWLINE, EOS)
    for row, (raw, r) in enumerate(zip(logits, replies, strict=True)):
        assert torch.equal(got[row], reference_shaping(raw, r))
        assert torch.equal(shape_one(raw, r.shaper, r.index, NEWLINE, EOS), got[row])
        assert not torch.equal(got[row], raw)
