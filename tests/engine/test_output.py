"""The output processor: text streamed whole characters at a time, and the stop rules."""

from __future__ import annotations

import pytest
import torch

from engine.interface import Finished, GenerationRequest, ReplyMode, StopReason, TextDelta
from engine.output import PENDING_LIMIT, OutputProcessor, visible_text
from engine.sampling import SamplingParams
from engine.state import Snapshot
from engine.tokenizer import world_tokenizer

TOK = world_tokenizer()


def processor(mode: ReplyMode = ReplyMode.CHAT, max_tokens: int = 60) -> OutputProcessor:
    """An output processor of a fresh request."""
    return OutputProcessor(GenerationRequest(None, [1], SamplingParams(), mode, max_tokens), TOK)


def feed(out: OutputProcessor, tokens: list[int]) -> tuple[list[str], StopReason | None]:
    """Accept tokens until one ends the generation; the pieces streamed and the reason."""
    pieces: list[str] = []
    for token in tokens:
        events, reason = out.accept(token)
        pieces += [e.text for e in events if isinstance(e, TextDelta)]
        if reason is not None:
            return pieces, reason
    return pieces, None


@pytest.mark.parametrize(
    ("text", "visible"),
    [
        ("plain", "plain"),
        ("<think>a\n\nb</think>Answer", "Answer"),
        ("x<think>open", "x"),
        ("<think>1</think>a<think>2</think>b", "ab"),
    ],
)
def test_visible_text_leaves_out_think_sections(text: str, visible: str) -> None:
    """Text inside <think>...</think> is not visible; an open section hides the rest."""
    assert visible_text(text) == visible


def test_a_character_split_over_tokens_is_held_back_until_whole() -> None:
    """The bytes of one emoji arrive over three tokens; the text comes once it is whole."""
    out = processor(ReplyMode.FREE)
    pieces, reason = feed(out, TOK.encode("A😀B"))
    assert pieces == ["A", "😀", "B"] and reason is None


def test_text_that_never_forms_characters_goes_out_after_the_pending_limit() -> None:
    """Tokens that form no whole character are emitted anyway after PENDING_LIMIT of them."""
    out = processor(ReplyMode.FREE)
    broken = TOK.encode("😀")[:1] * PENDING_LIMIT
    pieces, _ = feed(out, broken)
    assert len(pieces) == 1 and out.emitted == PENDING_LIMIT


def test_a_free_generation_ends_at_the_first_whole_character_past_its_length() -> None:
    """At max_tokens a free generation waits for the character in progress, then ends."""
    out = processor(ReplyMode.FREE, max_tokens=2)
    pieces, reason = feed(out, TOK.encode("A😀B"))
    assert "".join(pieces) == "A😀" and reason is StopReason.LENGTH and len(out.tokens) == 4


def test_end_of_text_ends_only_a_free_generation() -> None:
    """End-of-text stops a free generation before it is fed; in a chat it is just a token."""
    assert processor(ReplyMode.FREE).stop_at(TOK.eos_id) is StopReason.END_OF_TEXT
    assert processor(ReplyMode.CHAT).stop_at(TOK.eos_id) is None


def test_limit_and_cancel_end_before_sampling() -> None:
    """A chat at its hard cap, or a cancelled request, stops before the next token."""
    out = processor(ReplyMode.CHAT, max_tokens=1)
    assert out.stop_before_sampling() is None
    _, reason = feed(out, TOK.encode("Hi"))
    assert reason is StopReason.LENGTH and out.stop_before_sampling() is StopReason.LENGTH
    cancelled = processor()
    cancelled.request.cancel.set()
    assert cancelled.stop_before_sampling() is StopReason.CANCELLED


def test_finish_sends_the_held_back_text_before_finished() -> None:
    """The text still held back comes out as one piece, then Finished with all of it."""
    out = processor(ReplyMode.FREE)
    feed(out, TOK.encode("ok😀")[:-1])  # the emoji's last byte never comes
    events = out.finish(StopReason.CANCELLED, Snapshot([], torch.zeros(1), None, "f"), 1)
    assert isinstance(events[0], TextDelta) and isinstance(events[-1], Finished)
    assert events[-1].text == "ok" + events[0].text and events[-1].reason is StopReason.CANCELLED
