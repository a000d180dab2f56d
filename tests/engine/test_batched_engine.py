"""The batched engine: the reference engine's results, continuous batching, limits and failures."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.batched_engine import BatchedEngine
from engine.errors import EngineDiedError, EngineError
from engine.formats import inspect_model
from engine.inprocess import ReferenceEngine
from engine.interface import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    PromptRead,
    ReplyMode,
    StopReason,
    TextDelta,
)
from engine.runner import ModelRunner
from engine.sampling import SamplingParams
from engine.state import Snapshot
from engine.tokenizer import world_tokenizer

GREEDY = SamplingParams(top_p=0.0)


@pytest.fixture(scope="module")
def batched(model_dir: Path) -> Iterator[BatchedEngine]:
    """The tiny RWKV-7 model in a batched engine, shared by the tests of this module."""
    engine = BatchedEngine.load(model_dir / "v7.pth", max_batch=8)
    yield engine
    asyncio.run(engine.close())


def make_engine(model_dir: Path, **limits: Any) -> BatchedEngine:
    """A batched engine with its own limits (the caller closes it)."""
    return BatchedEngine.load(model_dir / "v7.pth", **limits)


def request(
    prompt: list[int],
    max_tokens: int,
    mode: ReplyMode = ReplyMode.FREE,
    start: Snapshot | None = None,
    **extra: Any,
) -> GenerationRequest:
    """A greedy request."""
    return GenerationRequest(start, prompt, GREEDY, mode, max_tokens, **extra)


async def collect(engine: Any, req: GenerationRequest) -> list[GenerationEvent]:
    """All events of a generation."""
    return [event async for event in engine.generate(req)]


def finished(events: Sequence[GenerationEvent]) -> Finished:
    """The last event, which must be Finished."""
    assert isinstance(events[-1], Finished)
    return events[-1]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding of two implementations."""
    a, b = a.float().reshape(-1), b.float().reshape(-1)
    return bool((a - b).abs().max() <= 1e-5 * b.abs().max())


def same_snapshot(a: Snapshot, b: Snapshot) -> bool:
    """Same layout, last token and meta; values equal up to rounding."""
    return (
        [(t.shape, t.dtype) for t in a.tensors] == [(t.shape, t.dtype) for t in b.tensors]
        and all(close(x, y) for x, y in zip(a.tensors, b.tensors, strict=True))
        and close(a.logits, b.logits)
        and (a.last_token, a.fingerprint, a.meta) == (b.last_token, b.fingerprint, b.meta)
    )


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    """Poll until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def spy_decode(engine: BatchedEngine, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Record the slots of every decode step of the engine's model."""
    calls: list[list[int]] = []
    original = engine.runner.decode

    def decode(slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        calls.append(list(slots))
        return original(slots, tokens)

    monkeypatch.setattr(engine.runner, "decode", decode)
    return calls


PROMPTS = [
    "Hello there",
    "User: what is RWKV?\n\nAssistant:",
    "a",
    "The quick brown fox jumps over the lazy dog. " * 6,
]


@pytest.mark.parametrize("mode", [ReplyMode.CHAT, ReplyMode.FREE])
async def test_greedy_generations_equal_the_reference_engine(
    engine7: ReferenceEngine, batched: BatchedEngine, mode: ReplyMode
) -> None:
    """Concurrent greedy requests give the reference engine's tokens, text, reasons and snapshots."""
    tok = engine7.tokenizer
    requests = [
        request(tok.encode(p), 10 + 9 * i, mode, thinking=i == 1, newline_bias=-2.0 if i == 2 else 0.0)
        for i, p in enumerate(PROMPTS)
    ]
    expected = [await collect(engine7, r) for r in requests]
    got = await asyncio.gather(*(collect(batched, r) for r in requests))
    for want, have in zip(expected, got, strict=True):
        assert isinstance(have[0], PromptRead) and isinstance(want[0], PromptRead)
        assert same_snapshot(have[0].snapshot, want[0].snapshot)
        w, h = finished(want), finished(have)
        assert (h.tokens, h.text, h.reason, h.prompt_tokens) == (w.tokens, w.text, w.reason, w.prompt_tokens)
        assert "".join(e.text for e in have if isinstance(e, TextDelta)) == h.text
        assert same_snapshot(h.snapshot, w.snapshot)
    assert len({tuple(finished(g).tokens) for g in got}) == len(got)


async def test_snapshots_move_between_engines(engine7: ReferenceEngine, batched: BatchedEngine) -> None:
    """A state read or finished by either engine continues the same way in the other."""
    tok = engine7.tokenizer
    prompt = tok.encode("Once upon a time")
    theirs, ours = await engine7.read(None, prompt), await batched.read(None, prompt)
    assert same_snapshot(ours, theirs)

    follow = request(tok.encode(" there was"), 15, start=theirs)
    want, have = finished(await collect(engine7, follow)), finished(await collect(batched, follow))
    assert have.tokens == want.tokens

    follow = request(tok.encode("\n"), 12, start=have.snapshot)
    assert finished(await collect(engine7, follow)).tokens == finished(await collect(batched, follow)).tokens

    no_prompt = request([], 8, start=ours)  # sampling straight from a snapshot's logits
    assert (
        finished(await collect(batched, no_prompt)).tokens
        == finished(await collect(engine7, no_prompt)).tokens
    )


async def test_a_new_request_joins_the_running_batch(
    batched: BatchedEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short request started during a long one is served at once, and both advance every step."""
    tok = batched.tokenizer
    long_req, short_req = request(tok.encode("Long"), 150), request(tok.encode("Short one"), 6)
    solo = finished(await collect(batched, long_req)).tokens
    calls = spy_decode(batched, monkeypatch)
    order: list[str] = []
    started = asyncio.Event()

    async def run_long() -> Finished:
        events = []
        async for event in batched.generate(long_req):
            events.append(event)
            if len(events) == 4:
                started.set()
        order.append("long")
        return finished(events)

    async def run_short() -> Finished:
        await started.wait()
        result = finished(await collect(batched, short_req))
        order.append("short")
        return result

    long_done, short_done = await asyncio.gather(run_long(), run_short())
    assert order == ["short", "long"]
    assert long_done.tokens == solo and len(short_done.tokens) == 6
    together = [c for c in calls if len(c) == 2]
    assert len(together) >= 5  # the short reply's tokens, each fed in a step with the long one
    first, last = calls.index(together[0]), len(calls) - 1 - calls[::-1].index(together[-1])
    assert all(len(c) == 2 for c in calls[first : last + 1]), "one of them skipped a step"


async def test_more_resident_than_batch_take_turns(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With 4 resident and a batch of 2, every sequence advances and results are unchanged."""
    engine = make_engine(model_dir, max_batch=2, max_resident=4)
    try:
        tok = engine.tokenizer
        requests = [request(tok.encode(p), 8) for p in PROMPTS]
        solo = [finished(await collect(engine, r)).tokens for r in requests]
        calls = spy_decode(engine, monkeypatch)
        got = await asyncio.gather(*(collect(engine, r) for r in requests))
        assert [finished(g).tokens for g in got] == solo
        assert max(len(c) for c in calls) == 2
        assert any(set(a).isdisjoint(b) for a, b in itertools.pairwise(calls))
    finally:
        await engine.close()


async def test_admission_limit_queues_the_excess_in_order(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond max_resident, requests wait in a FIFO queue and start as others leave."""
    engine = make_engine(model_dir, max_batch=2, max_resident=2)
    try:
        tok = engine.tokenizer
        seen: list[dict[str, float]] = []
        original = engine.runner.decode

        def decode(slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
            seen.append(engine.metrics())
            return original(slots, tokens)

        monkeypatch.setattr(engine.runner, "decode", decode)
        prompt_read: list[int] = []

        async def run(i: int) -> Finished:
            events = []
            async for event in engine.generate(request(tok.encode(PROMPTS[i]), 10)):
                if isinstance(event, PromptRead):
                    prompt_read.append(i)
                events.append(event)
            return finished(events)

        results = await asyncio.gather(*(run(i) for i in range(4)))
        assert all(len(r.tokens) == 10 for r in results)
        assert max(m["resident"] for m in seen) == 2
        assert max(m["queue"] for m in seen) >= 1
        assert sorted(prompt_read[:2]) == [0, 1] and sorted(prompt_read[2:]) == [2, 3]
        await wait_for(lambda: engine.metrics()["resident"] == 0)
    finally:
        await engine.close()


async def test_cancel_ends_the_reply(batched: BatchedEngine) -> None:
    """Setting request.cancel ends the generation with CANCELLED and a usable snapshot."""
    req = request(batched.tokenizer.encode("Tell me"), 500)
    events = []
    async for event in batched.generate(req):
        events.append(event)
        if sum(isinstance(e, TextDelta) for e in events) == 3:
            req.cancel.set()
    done = finished(events)
    assert done.reason is StopReason.CANCELLED
    assert 3 <= len(done.tokens) <= 6
    assert done.snapshot.last_token == done.tokens[-1]


async def test_closing_the_iterator_frees_the_slot(batched: BatchedEngine) -> None:
    """A caller that stops listening cancels its request; the engine goes on serving."""
    req = request(batched.tokenizer.encode("Keep going"), 500)
    stream = batched.generate(req)
    assert isinstance(stream, AsyncIterator)
    await anext(stream)
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    assert req.cancel.is_set()
    await wait_for(lambda: batched.metrics()["resident"] == 0)
    assert batched.runner.live_slots == []  # free for the padding rows of an in-place step
    assert len(finished(await collect(batched, request([1, 2, 3], 5))).tokens) == 5
    assert batched.runner.live_slots == []


async def test_a_failed_step_fails_only_its_requests(
    batched: BatchedEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forward pass that raises fails the requests in it with EngineError; others go on."""
    original_prefill = batched.runner.prefill

    def prefill(slots: Sequence[int], tokens: Sequence[Sequence[int]], logits: bool) -> torch.Tensor | None:
        if any(run[0] == 666 for run in tokens):
            raise RuntimeError("boom in prefill")
        return original_prefill(slots, tokens, logits)

    monkeypatch.setattr(batched.runner, "prefill", prefill)
    bad, good = request([666, 1, 2], 5), request([5, 6, 7, 8, 9], 5)
    outcome = await asyncio.gather(collect(batched, bad), collect(batched, good), return_exceptions=True)
    assert isinstance(outcome[0], EngineError) and "boom in prefill" in str(outcome[0])
    assert not isinstance(outcome[1], BaseException) and len(finished(outcome[1]).tokens) == 5

    calls = {"n": 0}
    original_decode = batched.runner.decode

    def decode(slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom in decode")
        return original_decode(slots, tokens)

    monkeypatch.setattr(batched.runner, "decode", decode)
    with pytest.raises(EngineError, match="boom in decode"):
        await collect(batched, request([3, 4], 5))
    monkeypatch.setattr(batched.runner, "decode", original_decode)
    assert len(finished(await collect(batched, request([3, 4], 5))).tokens) == 5
    with pytest.raises(EngineError, match="needs a prompt"):
        await collect(batched, request([], 5))
    await wait_for(lambda: batched.metrics()["resident"] == 0)


async def test_the_event_loop_is_never_blocked(batched: BatchedEngine) -> None:
    """While the worker generates, the event loop keeps ticking."""
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.002)
            lags.append(time.perf_counter() - before - 0.002)

    tick = asyncio.create_task(ticker())
    await asyncio.gather(*(collect(batched, request([i + 1] * 40, 30)) for i in range(4)))
    stop.set()
    await tick
    assert len(lags) > 10 and max(lags) < 0.25


async def test_close_ends_pending_work_with_engine_died(model_dir: Path) -> None:
    """Closing fails running and queued generations and refuses new ones."""
    engine = make_engine(model_dir, max_batch=1)
    running = asyncio.create_task(collect(engine, request([1, 2, 3], 4000)))
    queued = asyncio.create_task(collect(engine, request([4, 5], 4000)))
    await wait_for(lambda: engine.metrics()["steps"] > 3)
    await engine.close()
    for task in (running, queued):
        with pytest.raises(EngineDiedError):
            await task
    with pytest.raises(EngineDiedError):
        await collect(engine, request([1], 2))


def test_load_refuses_other_versions(model_dir: Path) -> None:
    """An RWKV-6 file is refused with a message that names the reference engine."""
    with pytest.raises(EngineError, match="reference engine"):
        BatchedEngine.load(model_dir / "v6.pth")


async def test_metrics_report_the_recent_work(batched: BatchedEngine) -> None:
    """metrics() has the queue, batch, throughput and latency numbers."""
    await asyncio.gather(*(collect(batched, request([7, i + 1], 6)) for i in range(3)))
    m = batched.metrics()
    for key in ("queue", "batch", "resident", "tokens_per_s", "ttft_p50_s", "step_p50_ms", "step_p99_ms"):
        assert key in m
    assert m["queue"] == 0 and m["tokens_per_s"] > 0 and m["ttft_p50_s"] > 0 and m["batch"] >= 1
    assert "batched engine" in batched.describe()


async def test_a_read_gives_the_same_state_whatever_else_is_read(model_dir: Path) -> None:
    """Prompts are cut at fixed chunk boundaries, so a read under load equals the read alone,
    bit for bit (the stored token log rebuilds states by reading again)."""
    engine = make_engine(model_dir, prefill_chunk=32, prefill_budget=40)
    try:
        prompts = [list(range(100 + i, 100 + i + n)) for i, n in enumerate((90, 17, 64, 33, 70))]
        alone = [await engine.read(None, p) for p in prompts]
        together = await asyncio.gather(*(engine.read(None, p) for p in prompts))
        for a, b in zip(alone, together, strict=True):
            assert torch.equal(a.logits, b.logits)
            assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors, strict=True))
    finally:
        await engine.close()


async def test_a_step_wakes_the_event_loop_once(
    batched: BatchedEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The events of one step (one per channel) reach the loop in one call, not one call each."""
    loop = asyncio.get_running_loop()
    calls = 0
    original = loop.call_soon_threadsafe

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    prompts = [batched.tokenizer.encode(f"Channel {i} says") for i in range(6)]
    results = await asyncio.gather(*(collect(batched, request(p, 12)) for p in prompts))
    events = sum(len(r) for r in results)
    steps = max(len(finished(r).tokens) for r in results) + 4  # decode steps, prompt reads, the end
    assert events >= 6 * 12
    assert calls <= steps, (calls, events)


async def test_a_caller_that_falls_behind_gets_the_waiting_text_as_one_piece(batched: BatchedEngine) -> None:
    """Text produced while the caller was busy comes as one TextDelta; nothing is lost."""
    req = request(batched.tokenizer.encode("A long story:"), 24)
    alone = await collect(batched, request(batched.tokenizer.encode("A long story:"), 24))
    stream = batched.generate(req)
    first = await anext(stream)
    assert isinstance(first, PromptRead)
    await wait_for(lambda: batched.metrics()["resident"] == 0)  # all of it is waiting now
    rest = [event async for event in stream]
    deltas = [e for e in rest if isinstance(e, TextDelta)]
    done = finished(rest)
    assert len(deltas) == 1 and len(done.tokens) == 24
    assert deltas[0].text == done.text == finished(alone).text


async def test_a_worker_that_cannot_start_fails_requests_at_once(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that dies while preparing its device makes the load fail with the reason; an
    engine built without waiting answers every request with it instead of leaving it waiting."""

    def no_gpu(self: BatchedEngine) -> None:
        raise RuntimeError("CUDA error: no kernel image is available")

    monkeypatch.setattr(BatchedEngine, "_bind", no_gpu)
    with pytest.raises(EngineError, match="could not start on cpu: CUDA error: no kernel image"):
        make_engine(model_dir)
    path = model_dir / "v7.pth"
    engine = BatchedEngine(ModelRunner.load(path), inspect_model(path), world_tokenizer(), "cpu fp32")
    try:
        with pytest.raises(EngineDiedError, match="no kernel image"):
            await asyncio.wait_for(engine.read(None, [1, 2, 3]), 10)
        with pytest.raises(EngineDiedError, match="no kernel image"):
            await asyncio.wait_for(collect(engine, request([1, 2], 3)), 10)
    finally:
        await engine.close()
