"""The per-sequence stop rules, driven by a scripted forward function.

A random model cannot be made to write a given text, so these tests feed the runner logits that
force a scripted reply; everything else (tokenizer, stop rules, streaming) is the real code.
"""

from __future__ import annotations

import torch

from engine.generation import SequenceRunner
from engine.interface import Finished, GenerationRequest, ReplyMode, StopReason, TextDelta
from engine.sampling import SamplingParams
from engine.tokenizer import world_tokenizer

GREEDY = SamplingParams(top_p=0.0, presence_penalty=0.0, frequency_penalty=0.0)


def scripted_runner(script: list[int]) -> SequenceRunner:
    """A runner whose model always makes the next token of ``script`` the likeliest."""
    tokenizer = world_tokenizer()
    position = {"i": 0}

    def forward(
        tokens: list[int], state: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if state is not None:  # a generated token was fed (the prompt comes with no state)
            position["i"] += len(tokens)
        logits = torch.zeros(tokenizer.vocab_size)
        logits[script[min(position["i"], len(script) - 1)]] = 100.0
        return logits, [torch.zeros(2)]

    return SequenceRunner(forward, tokenizer, "test")


def run(reply: str, thinking: bool, mode: ReplyMode = ReplyMode.CHAT) -> tuple[str, StopReason, str]:
    runner = scripted_runner(world_tokenizer().encode(reply))
    request = GenerationRequest(None, [1], GREEDY, mode, max_tokens=60, thinking=thinking)
    streamed = ""
    finished = None
    for event in runner.run(request):
        if isinstance(event, TextDelta):
            streamed += event.text
        elif isinstance(event, Finished):
            finished = event
    assert finished is not None
    return finished.text, finished.reason, streamed


def test_blank_line_ends_a_chat_reply() -> None:
    """A chat reply ends at its first blank line; the streamed text is the reply."""
    text, reason, streamed = run("Hello there.\n\nUser: more", thinking=False)
    assert text == "Hello there.\n\n" and reason is StopReason.END_OF_TURN and streamed == text


def test_blank_line_inside_thinking_does_not_end_the_reply() -> None:
    """With a thinking preset, a blank line inside <think> does not end the turn."""
    reply = "<think>step one\n\nstep two</think>The answer.\n\nUser: next"
    text, reason, _ = run(reply, thinking=True)
    assert text == "<think>step one\n\nstep two</think>The answer.\n\n"
    assert reason is StopReason.END_OF_TURN
    cut, _, _ = run(reply, thinking=False)
    assert cut == "<think>step one\n\n"


def test_free_generation_stops_at_end_of_text() -> None:
    """A free generation stops at the end-of-text token, which is not part of the text."""
    runner = scripted_runner([*world_tokenizer().encode("Once"), 0])
    request = GenerationRequest(None, [1], GREEDY, ReplyMode.FREE, max_tokens=60)
    events = list(runner.run(request))
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert finished.reason is StopReason.END_OF_TEXT and finished.text == "Once"
    assert 0 not in finished.tokens
