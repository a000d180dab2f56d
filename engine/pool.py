"""A batched engine: one worker thread per device runs a continuous-batching scheduler.

Each step of the scheduler
1. lets queued requests in (FIFO) while state slots are free;
2. reads a chunk of every waiting prompt, within a token budget per step, so that a long prompt
   never stalls the others (prompts are cut at fixed ``prefill_chunk`` boundaries, so the state
   after a read does not depend on the load);
3. samples one token for every decoding sequence (at most ``max_batch``, taken round-robin when
   more are resident) with exactly :class:`engine.generation.SequenceRunner`'s policy, and feeds
   all of them to the model in one batched step.

A sequence that finishes leaves at once, and a new request joins at the next step. The events of
a step reach the asyncio side in one ``loop.call_soon_threadsafe`` call; the event loop never
waits on the model, and a caller that falls behind gets the text already waiting as one piece.
The per-token work on the host is kept small (penalties decay in one vectorised multiply, the
end-of-turn check looks at the new text only): on a GPU it, not the model, bounds a large batch.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.batched import BatchedRWKV7, to_device
from engine.errors import EngineDiedError, EngineError
from engine.formats import ModelSpec, inspect_model
from engine.generation import PENDING_LIMIT, avoid_repeat_ids, visible_text
from engine.interface import (
    Engine,
    Finished,
    GenerationEvent,
    GenerationRequest,
    PromptRead,
    ReplyMode,
    StopReason,
    TextDelta,
)
from engine.sampling import BANNED, PenaltyTracker, SamplingParams, chat_newline_bias, sample_token
from engine.state import Snapshot
from engine.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

PREFILL_BUDGET_CPU = 256  # prompt tokens read per scheduler step, by default
PREFILL_BUDGET_CUDA = 2048
TOPK_STAGES = (64, 1024)  # where the top-p cut is looked for before falling back to a full sort
_WINDOW_S = 10.0  # metrics: tokens per second over this many recent seconds


# ------------------------------------------------------------------------------------- sampling


def sample_batch(
    shaped: torch.Tensor,
    sampling: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    keys: Sequence[tuple[int, int]],
) -> list[int]:
    """:func:`engine.sampling.sample_token` for every row of ``shaped`` [R, vocab], batched.

    The rule is the same: greedy when ``top_p`` or the temperature is 0; otherwise keep the tokens
    at or above the probability where the sorted cumulative sum first reaches ``top_p``, then
    ``top_k``, then the temperature, and draw. The cut is found among the top few probabilities
    (a top-k, not a sort of the whole vocabulary), on the device for the whole batch, falling
    back to ``sample_token`` (with the row's generator) when it is not there. The draw is an
    exponential race over the kept tokens, which picks each with its probability; its random
    numbers are a hash of the row's key (seed, token index), so the same key and the same logits
    give the same token whatever else is in the batch (on a GPU the batch size can move the last
    bits of the logits; and these are not the reference engine's tokens, which races the whole
    vocabulary). The tokens come back to the host in one transfer, the step's one wait.
    """
    count, vocab = shaped.shape
    device = shaped.device
    tokens = [0] * count
    greedy = [i for i, s in enumerate(sampling) if s.top_p <= 0 or s.temperature <= 0]
    drawn = [i for i, s in enumerate(sampling) if not (s.top_p <= 0 or s.temperature <= 0)]
    parts: list[torch.Tensor] = []
    if greedy:
        rows = shaped if len(greedy) == count else shaped.index_select(0, _rows(greedy, device))
        parts.append(rows.argmax(dim=-1))
    if drawn:
        probs = torch.softmax(shaped if not greedy else shaped.index_select(0, _rows(drawn, device)), dim=-1)
        params = _RowParams([sampling[i] for i in drawn], [keys[i] for i in drawn], device)
        picks, undecided = _draw(probs, params, TOPK_STAGES[0], stage=0)
        parts += [picks, undecided.long()]
    fetched = torch.cat(parts).tolist() if parts else []  # the step's one wait for the device
    for i, token in zip(greedy, fetched, strict=False):
        tokens[i] = int(token)
    if not drawn:
        return tokens

    def settle(rows: list[int], picks: list[int], undecided: list[int]) -> list[int]:
        """Take the decided rows' tokens; returns the rows (of ``probs``) still undecided."""
        for row, token, open_ in zip(rows, picks, undecided, strict=True):
            if not open_:
                tokens[drawn[row]] = int(token)
        return [row for row, open_ in zip(rows, undecided, strict=True) if open_]

    n = len(greedy) + len(drawn)
    pending = settle(list(range(len(drawn))), fetched[len(greedy) : n], fetched[n:])
    for stage, top in enumerate(TOPK_STAGES[1:], start=1):  # rare: a flat distribution
        if not pending or TOPK_STAGES[stage - 1] >= vocab:
            break
        picks, undecided = _draw(
            probs.index_select(0, _rows(pending, device)), params.take(pending), top, stage
        )
        pending = settle(pending, picks.tolist(), undecided.long().tolist())
    for row in pending:
        i, s = drawn[row], sampling[drawn[row]]
        tokens[i] = sample_token(shaped[i], s.temperature, s.top_p, s.top_k, generators[i])
    return tokens


def _rows(rows: list[int], device: torch.device) -> torch.Tensor:
    """Row numbers as an index on the device (a Python list as an index would wait for it)."""
    return to_device(torch.tensor(rows, dtype=torch.long), device)


class _RowParams:
    """The sampling settings and draw keys of a batch's rows, as device tensors [R, 1]."""

    def __init__(
        self, sampling: Sequence[SamplingParams], keys: Sequence[tuple[int, int]], device: torch.device
    ) -> None:
        self.sampling = list(sampling)
        self.keys = list(keys)
        floats = torch.tensor([[s.top_p, 1.0 / s.temperature] for s in sampling], dtype=torch.float32)
        whole = torch.tensor([[s.top_k, _row_key(*key)] for s, key in zip(sampling, keys, strict=True)])
        floats, whole = to_device(floats, device), to_device(whole, device)  # two, without waiting
        self.top_p, self.inv_temperature = floats[:, :1].contiguous(), floats[:, 1:].contiguous()
        self.top_k, self.row_keys = whole[:, :1].contiguous(), whole[:, 1:].contiguous()
        self.plain = all(s.temperature == 1.0 for s in sampling)

    def take(self, rows: Sequence[int]) -> _RowParams:
        return _RowParams([self.sampling[r] for r in rows], [self.keys[r] for r in rows], self.top_p.device)


def _draw(probs: torch.Tensor, params: _RowParams, top: int, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One stage of the batched draw: the picked token of each row and whether the row's cut lay
    beyond the top ``top`` probabilities (undecided), both on the device."""
    vocab = probs.shape[-1]
    values, ids = torch.topk(probs, min(top, vocab), dim=-1)
    weights, undecided = _nucleus(values, params, vocab)
    race = _exponentials(params.row_keys, stage, values.shape[-1])
    picks = ids.gather(1, torch.argmax(weights.double() / race, dim=-1, keepdim=True)).flatten()
    return picks, undecided


def _nucleus(values: torch.Tensor, params: _RowParams, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``sample_token`` keeps from each row's top probabilities (descending): the weights
    (the probabilities after the temperature, 0 for the others) [R, k], and whether the top k
    did not decide the row [R] (then the caller looks further)."""
    rows, k = values.shape
    partial = k < vocab
    cumulative = torch.cumsum(values, dim=-1)
    cut = torch.searchsorted(cumulative, params.top_p.to(values.dtype))  # where the sum reaches top_p
    undecided = (cut >= k).flatten() if partial else torch.zeros(rows, dtype=torch.bool, device=values.device)
    cutoff = values.gather(1, cut.clamp_max(k - 1))
    if partial:  # ties with the cut may continue past the top k
        undecided |= (values[:, -1:] >= cutoff).flatten()
    keep = values >= cutoff
    top_k = params.top_k
    # a top_k at or above the kept count removes nothing: it does not apply
    applies = (top_k > 0) & (top_k < vocab) & (top_k <= keep.sum(dim=-1, keepdim=True))
    kth = values.gather(1, (top_k - 1).clamp(0, k - 1))
    keep &= ~applies | (values >= kth)
    weights = torch.where(keep, values, torch.zeros_like(values))
    if not params.plain:
        weights = torch.where(params.inv_temperature == 1.0, weights, weights**params.inv_temperature)
    total = weights.sum(dim=-1)
    undecided |= ~torch.isfinite(total) | (total <= 0)
    return weights, undecided


_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's constants
_MIX_1 = 0xBF58476D1CE4E5B9
_MIX_2 = 0x94D049BB133111EB


def _splitmix(z: int) -> int:
    """splitmix64's finaliser on a Python integer (64 bits)."""
    z &= _MASK
    z = ((z ^ (z >> 30)) * _MIX_1) & _MASK
    z = ((z ^ (z >> 27)) * _MIX_2) & _MASK
    return z ^ (z >> 31)


def _row_key(seed: int, index: int) -> int:
    """A row's 64-bit draw key from its seed and token index, as a signed int64 value."""
    return _signed(_splitmix(seed ^ _splitmix(index * _GOLDEN)))


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 value with those bits."""
    return value - (1 << 64) if value >> 63 else value


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping products; logical shifts made from
    arithmetic ones)."""
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _signed(_MIX_1)
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _signed(_MIX_2)
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def _exponentials(row_keys: torch.Tensor, stage: int, k: int) -> torch.Tensor:
    """Standard exponential variates [R, k] (float64), a pure function of each row's key, the
    stage and the position: counter-based, so no generator state is kept."""
    position = torch.arange(1, k + 1, dtype=torch.long, device=row_keys.device) + stage * k
    bits = _mix(row_keys + position * _signed(_GOLDEN))
    uniform = (((bits >> 11) & ((1 << 53) - 1)).double() + 0.5) * 2.0**-53  # in (0, 1)
    return -torch.log(uniform)


def nucleus(
    values: torch.Tensor, ids: torch.Tensor, s: SamplingParams, vocab: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The tokens ``sample_token`` may pick and their weights, for one row (see :func:`_nucleus`);
    None when the top ``len(values)`` do not decide it."""
    weights, undecided = _nucleus(values.unsqueeze(0), _RowParams([s], [(0, 0)], values.device), vocab)
    if bool(undecided[0]):
        return None
    keep = weights[0] > 0
    return ids[keep], weights[0][keep]


def shape_batch(
    logits: Sequence[torch.Tensor], replies: Sequence[_Reply], newline_id: int, eos_id: int
) -> torch.Tensor:
    """The shaped logits [R, vocab] of a batch: SequenceRunner's shaping, one row per reply.

    Per row and in this order, as the reference: ban the last token when it is an avoid-repeat
    one; chat: add the newline bias of the token index, ban end-of-text; free: add the request's
    newline bias; subtract the penalties. Each step is one indexed operation for the batch
    (every (row, column) pair occurs once per operation, so the values are the per-row ones).
    """
    shaped = torch.stack(list(logits)).float()  # a new tensor: the raw logits stay for snapshots
    device = shaped.device
    ban_rows: list[int] = []
    ban_cols: list[int] = []
    nl_rows: list[int] = []
    nl_bias: list[float] = []
    eos_rows: list[int] = []
    for row, reply in enumerate(replies):
        if reply.last is not None and reply.last in reply.avoid_ids:
            ban_rows.append(row)
            ban_cols.append(reply.last)
        if reply.chat:
            nl_rows.append(row)
            nl_bias.append(chat_newline_bias(reply.index))
            eos_rows.append(row)
        elif reply.request.newline_bias:
            nl_rows.append(row)
            nl_bias.append(reply.request.newline_bias)

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
    trackers = [reply.penalties for reply in replies]
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


# ------------------------------------------------------------------------------- one sequence


class _Reply:
    """SequenceRunner.run's loop for one request, cut at the forward pass so many share a step."""

    def __init__(self, request: GenerationRequest, tokenizer: Tokenizer, avoid_ids: frozenset[int]) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.avoid_ids = avoid_ids
        # The seed keys the batched draw; the generator serves the rare full-vocabulary fallback.
        self.seed = request.seed % (1 << 63) if request.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        s = request.sampling
        self.penalties = PenaltyTracker(s.presence_penalty, s.frequency_penalty, s.penalty_decay)
        self.chat = request.mode is ReplyMode.CHAT
        self.limit = request.max_tokens if self.chat else request.max_tokens + request.extra_tokens
        self.index = 0  # the index of the token being generated
        self.last: int | None = None
        self.tokens: list[int] = []
        self.emitted = 0  # tokens already turned into streamed text
        self.text = ""
        self.pending = 0  # the sampled token waiting for the forward pass

    def stop_before_sampling(self) -> StopReason | None:
        """The reason to end before this index's token is sampled, if any."""
        if self.index >= self.limit:
            return StopReason.LENGTH
        if self.request.cancel.is_set():
            return StopReason.CANCELLED
        return None

    def choose(self, token: int) -> StopReason | None:
        """Take the sampled token; end-of-text ends a free generation without feeding it."""
        if not self.chat and token == self.tokenizer.eos_id:
            return StopReason.END_OF_TEXT
        self.penalties.add(token)
        self.pending = token
        return None

    def advance(self) -> tuple[list[GenerationEvent], StopReason | None]:
        """After the pending token was fed: stream its text and apply the stop rules."""
        token, index = self.pending, self.index
        self.last = token
        self.tokens.append(token)
        self.index += 1
        events: list[GenerationEvent] = []
        piece = self.tokenizer.decode(self.tokens[self.emitted :])
        clean = "\ufffd" not in piece
        grew = clean or len(self.tokens) - self.emitted >= PENDING_LIMIT
        if grew:
            self.text += piece
            self.emitted = len(self.tokens)
            if piece:
                events.append(TextDelta(piece))
        if self.chat:
            if self.request.thinking:
                ended = "\n\n" in visible_text(self.text)
            else:  # the text before this piece had no blank line: look at the new end only
                ended = grew and "\n\n" in self.text[-len(piece) - 1 :]
            if ended:
                return events, StopReason.END_OF_TURN
        elif clean and index + 1 >= self.request.max_tokens:
            return events, StopReason.LENGTH
        if self.index >= self.limit:
            return events, StopReason.LENGTH
        return events, None

    def final_events(
        self, reason: StopReason, snapshot: Snapshot, prompt_tokens: int
    ) -> list[GenerationEvent]:
        """The text still held back, then :class:`Finished`."""
        events: list[GenerationEvent] = []
        if self.emitted < len(self.tokens):
            piece = self.tokenizer.decode(self.tokens[self.emitted :])
            self.text += piece
            if piece:
                events.append(TextDelta(piece))
        events.append(Finished(snapshot, self.tokens, self.text, reason, prompt_tokens))
        return events


def _nobody(item: object) -> None:
    """The event sink of a job before its caller's queue is attached."""


def _deliver(items: list[tuple[asyncio.Queue[object], _Job, object]]) -> None:
    """On the event loop: put a step's events into their callers' queues."""
    for queue, _job, item in items:
        queue.put_nowait(item)


class _Failure:
    def __init__(self, error: EngineError) -> None:
        self.error = error


@dataclass(eq=False)
class _Job:
    """A request's life in the scheduler: queued, reading its prompt, then decoding."""

    request: GenerationRequest | None  # None: a prompt read (Engine.read)
    start: Snapshot | None
    prompt: list[int]
    post: Callable[[object], None]
    submitted: float = field(default_factory=time.monotonic)
    abandoned: bool = False  # the caller stopped listening: drop the job at the next step
    slot: int = -1
    fed: int = 0  # prompt tokens read so far
    logits: torch.Tensor | None = None  # raw float32 logits after ``last``
    last: int | None = None
    reply: _Reply | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Stats:
    """Recent numbers for :meth:`BatchedEngine.metrics` (written by the worker, under a lock)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    decoded: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=4096))
    prefilled: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=4096))
    first_token_s: deque[float] = field(default_factory=lambda: deque(maxlen=100))
    step_s: deque[float] = field(default_factory=lambda: deque(maxlen=2000))
    batch: int = 0
    steps: int = 0
    started: float = field(default_factory=time.monotonic)


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# --------------------------------------------------------------------------------- the engine


class BatchedEngine(Engine):
    """RWKV-7 with continuous batching behind the :class:`Engine` interface."""

    def __init__(
        self,
        model: BatchedRWKV7,
        spec: ModelSpec,
        tokenizer: Tokenizer,
        strategy: str,
        *,
        max_batch: int = 32,
        prefill_chunk: int = 128,
        prefill_budget: int | None = None,
    ) -> None:
        if not model.matches(spec):
            raise EngineError(f"the loaded weights do not match {spec.describe()}")
        if prefill_budget is None:  # a GPU with the fused kernel reads thousands of tokens in the
            # time of a decode step; the plain recurrence launches kernels token by token
            fast = model.device.type == "cuda" and model.fused_recurrence
            prefill_budget = PREFILL_BUDGET_CUDA if fast else PREFILL_BUDGET_CPU
        if max_batch < 1 or prefill_chunk < 1 or prefill_budget < 1:
            raise ValueError("max_batch, prefill_chunk and prefill_budget must be at least 1")
        self.model = model
        self.spec = spec
        self.tokenizer = tokenizer
        self.strategy = strategy
        self.max_batch = max_batch
        self.max_resident = model.max_slots
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget
        self._avoid_ids = avoid_repeat_ids(tokenizer)
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()  # guarded by _cond; everything below is the worker's
        self._closing = False
        self._dead: BaseException | None = None
        self._free = list(range(model.max_slots))  # a heap: the lowest free slot first
        self._prefilling: list[_Job] = []
        self._decoding: list[_Job] = []
        self._prefill_turn = 0
        self._decode_turn = 0
        self._stats = _Stats()
        self._outbox: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[object], _Job, object]] = []
        self._ready = threading.Event()  # set once the worker has bound its device (or died)
        self._thread = threading.Thread(target=self._work, name=f"rwkv-batch-{model.device}", daemon=True)
        self._thread.start()

    def wait_ready(self) -> None:
        """Block until the worker has prepared its device; :class:`EngineError` if it could not."""
        self._ready.wait()
        if self._dead is not None:
            raise EngineError(f"the batched engine could not start on {self.model.device}: {self._dead}")

    @property
    def alive(self) -> bool:
        """Whether the engine takes requests (not closed, its worker not dead)."""
        return not self._closing and self._dead is None

    @classmethod
    def load(
        cls,
        path: Path,
        strategy: str = "cpu fp32",
        tokenizer: str | Tokenizer = "auto",
        *,
        max_batch: int = 32,
        max_resident: int | None = None,
        prefill_chunk: int = 128,
        prefill_budget: int | None = None,
        cuda_graphs: bool = True,
        use_fla: bool | None = None,
    ) -> BatchedEngine:
        """Check and load a model file (slow: call it from a thread in async code).

        ``max_resident`` (default ``max_batch``) is the number of state slots: requests beyond
        it wait in a FIFO queue; with more resident than ``max_batch``, decoding takes turns (a
        batch never exceeds the resident states).
        """
        spec = inspect_model(path)
        if spec.family != 7:
            raise EngineError(
                f"the batched engine runs RWKV-7 models only; {path.name} is {spec.describe()}: "
                "use the reference engine for it"
            )
        tok = load_tokenizer(tokenizer, spec) if isinstance(tokenizer, str) else tokenizer
        resident = max_resident or max_batch
        model = BatchedRWKV7.load(
            path, strategy, max_slots=resident, cuda_graphs=cuda_graphs, use_fla=use_fla
        )
        engine = cls(
            model,
            spec,
            tok,
            strategy,
            max_batch=min(max_batch, resident),
            prefill_chunk=prefill_chunk,
            prefill_budget=prefill_budget,
        )
        try:
            engine.wait_ready()  # a GPU that cannot run the model says so now, not at the first reply
        except BaseException:
            engine.shutdown()
            raise
        return engine

    def describe(self) -> str:
        """The model, the strategy, and the batch limits."""
        return (
            f"{self.spec.describe()} ({self.strategy}, batched engine: max batch {self.max_batch}, "
            f"{self.max_resident} resident, {self.model.describe_kernels()})"
        )

    # ----------------------------------------------------------------------------- asyncio side

    async def read(self, start: Snapshot | None, tokens: list[int]) -> Snapshot:
        """Feed tokens to a snapshot (or a zero state) in the worker."""
        queue: asyncio.Queue[object] = asyncio.Queue()
        job = _Job(None, start, list(tokens), _nobody)
        job.post = self._poster(queue, job)
        self._submit(job)
        done = False
        try:
            item = await queue.get()
            done = True
            if isinstance(item, _Failure):
                raise item.error
            assert isinstance(item, Snapshot)
            return item
        finally:
            if not done:
                job.abandoned = True

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Queue the generation and stream its events as the worker produces them."""
        queue: asyncio.Queue[object] = asyncio.Queue()
        job = _Job(request, request.start, list(request.prompt), _nobody)
        job.post = self._poster(queue, job)
        self._submit(job)
        done = False
        held: object | None = None
        try:
            while True:
                item, held = (held, None) if held is not None else (await queue.get(), None)
                if isinstance(item, _Failure):
                    done = True
                    raise item.error
                assert isinstance(item, PromptRead | TextDelta | Finished)
                if isinstance(item, TextDelta) and not queue.empty():
                    # A caller that fell behind gets the text already waiting as one piece.
                    pieces = [item.text]
                    while not queue.empty():
                        later = queue.get_nowait()
                        if not isinstance(later, TextDelta):
                            held = later
                            break
                        pieces.append(later.text)
                    item = TextDelta("".join(pieces))
                if isinstance(item, Finished):
                    done = True
                yield item
                if done:
                    return
        finally:
            if not done:
                request.cancel.set()
                job.abandoned = True

    async def close(self) -> None:
        """Stop the worker; queued and running generations end with :class:`EngineDiedError`."""
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown)

    def shutdown(self) -> None:
        """:meth:`close` for code outside an event loop: blocks until the worker has stopped."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()

    def busy(self) -> int:
        """Requests waiting or holding a state slot: how loaded this engine is."""
        with self._cond:
            queued = len(self._queue)
        return queued + self.max_resident - len(self._free)

    def metrics(self) -> dict[str, float]:
        """Recent numbers: queue, batch, resident states, tokens/s, time to first token, steps."""
        now = time.monotonic()
        stats = self._stats
        with stats.lock:
            since = max(now - _WINDOW_S, stats.started)
            span = max(now - since, 1e-9)
            decoded = sum(n for t, n in stats.decoded if t >= since)
            prefilled = sum(n for t, n in stats.prefilled if t >= since)
            ttft = list(stats.first_token_s)
            steps = list(stats.step_s)
            batch, total_steps = stats.batch, stats.steps
        with self._cond:
            queued = len(self._queue)
        return {
            "queue": queued,
            "batch": batch,
            "resident": self.max_resident - len(self._free),
            "max_batch": self.max_batch,
            "max_resident": self.max_resident,
            "tokens_per_s": decoded / span,
            "prefill_tokens_per_s": prefilled / span,
            "ttft_p50_s": _percentile(ttft, 0.5),
            "step_p50_ms": 1000 * _percentile(steps, 0.5),
            "step_p99_ms": 1000 * _percentile(steps, 0.99),
            "steps": total_steps,
        }

    def _poster(self, queue: asyncio.Queue[object], job: _Job) -> Callable[[object], None]:
        loop = asyncio.get_running_loop()

        def post(item: object) -> None:  # on the worker: sent with the step's other events
            self._outbox.append((loop, queue, job, item))

        return post

    def _flush(self) -> None:
        """Hand the events of a step to their event loops, one call per loop (not one per event:
        each call wakes the loop through a socket, which costs more than the event at batch 128)."""
        if not self._outbox:
            return
        sent, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[object], _Job, object]]] = {}
        for loop, queue, job, item in sent:
            by_loop.setdefault(loop, []).append((queue, job, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is gone (shutdown): nobody is listening any more
                for _, job, _ in items:
                    job.abandoned = True

    def _submit(self, job: _Job) -> None:
        with self._cond:
            if self._dead is not None:
                raise EngineDiedError(f"the engine died: {self._dead}")
            if self._closing:
                raise EngineDiedError("the engine has been closed")
            self._queue.append(job)
            self._cond.notify()

    # ------------------------------------------------------------------------------ the worker

    def _bind(self) -> None:
        """Prepare the worker thread: its GPU, and the decode step's CUDA graphs for every batch
        bucket up to ``max_batch`` (captured now rather than in the middle of someone's reply)."""
        if self.model.device.type == "cuda":
            torch.cuda.set_device(self.model.device)
            self.model.capture_graphs(self.max_batch)

    def _work(self) -> None:
        try:
            with torch.no_grad():
                try:
                    self._bind()
                except BaseException as exc:
                    self._dead = exc  # before the event: wait_ready reads it
                    raise
                finally:
                    self._ready.set()
                while True:
                    with self._cond:
                        while not (self._closing or self._queue or self._prefilling or self._decoding):
                            self._cond.wait()
                        if self._closing:
                            break
                    try:
                        self._step()
                    finally:
                        self._flush()
        except BaseException as exc:  # a bug in the scheduler: every caller hears of it
            log.exception("the batched engine's worker died")
            self._dead = exc
        finally:
            with self._cond:
                self._closing = True
                queued = list(self._queue)
                self._queue.clear()
            reason = "the engine has been closed" if self._dead is None else f"the engine died: {self._dead}"
            for job in queued + self._prefilling + self._decoding:
                job.post(_Failure(EngineDiedError(reason)))
            self._flush()
            self._prefilling.clear()
            self._decoding.clear()

    def _step(self) -> None:
        started = time.monotonic()
        self._drop_abandoned()
        self._admit()
        prefilled = self._read_prompts() if self._prefilling else 0
        decoded = self._decode() if self._decoding else 0
        now = time.monotonic()
        with self._stats.lock:
            self._stats.steps += 1
            if decoded or prefilled:
                self._stats.step_s.append(now - started)
            if decoded:
                self._stats.decoded.append((now, decoded))
                self._stats.batch = decoded
            if prefilled:
                self._stats.prefilled.append((now, prefilled))

    def _drop_abandoned(self) -> None:
        for jobs in (self._prefilling, self._decoding):
            for job in [j for j in jobs if j.abandoned]:
                self._release(job)

    def _admit(self) -> None:
        while self._free:
            with self._cond:
                if not self._queue:
                    return
                job = self._queue.popleft()
            if job.abandoned:
                continue
            job.slot = heapq.heappop(self._free)
            try:
                if job.start is not None:
                    self.model.load_slot(job.slot, job.start.tensors)
                    job.logits = job.start.logits.to(self.model.device, torch.float32).reshape(-1)
                    job.last = job.start.last_token
                else:
                    self.model.zero_slot(job.slot)
                if job.request is not None:
                    job.meta = {"mode": job.request.mode.value, "newline_bias": job.request.newline_bias}
                if job.prompt:
                    self._prefilling.append(job)
                else:
                    self._prompt_done(job)
            except Exception as exc:
                self._fail(job, exc)

    def _read_prompts(self) -> int:
        """Read one chunk of as many waiting prompts as the budget allows; returns tokens read."""
        budget = self.prefill_budget
        count = len(self._prefilling)
        first = self._prefill_turn % count
        self._prefill_turn += 1
        groups: dict[tuple[int, bool], list[tuple[_Job, list[int]]]] = {}
        for offset in range(count):
            job = self._prefilling[(first + offset) % count]
            # Whole chunks only: where a prompt is cut never depends on what else is waiting, so
            # a read gives the same state whatever the load (the state log relies on it).
            take = min(self.prefill_chunk, len(job.prompt) - job.fed)
            if offset and take > budget:
                break
            budget -= take
            chunk = job.prompt[job.fed : job.fed + take]
            groups.setdefault((take, job.fed + take == len(job.prompt)), []).append((job, chunk))
        done = 0
        for (_, last), group in groups.items():
            group.sort(key=lambda item: item[0].slot)  # consecutive slots run in place
            try:
                out = self.model.prefill([j.slot for j, _ in group], [c for _, c in group], logits=last)
            except Exception as exc:
                for job, _ in group:
                    self._fail(job, exc)
                continue
            for row, (job, chunk) in enumerate(group):
                job.fed += len(chunk)
                job.last = chunk[-1]
                done += len(chunk)
                if out is not None:
                    job.logits = out[row]
                    self._prefilling.remove(job)
                    self._prompt_done(job)
        return done

    def _prompt_done(self, job: _Job) -> None:
        """The prompt has been read: answer a read, or start decoding."""
        try:
            if job.logits is None:
                raise ValueError("a generation needs a prompt or a start snapshot with logits")
            snapshot = self._snapshot(job)
        except Exception as exc:
            self._fail(job, exc)
            return
        if job.request is None:
            job.post(snapshot)
            self._release(job)
            return
        job.post(PromptRead(snapshot))
        job.reply = _Reply(job.request, self.tokenizer, self._avoid_ids)
        job.reply.last = job.last
        self._decoding.append(job)

    def _decode(self) -> int:
        """One token for up to ``max_batch`` decoding sequences; returns how many were fed."""
        count = len(self._decoding)
        if count <= self.max_batch:
            batch = list(self._decoding)
        else:
            first = self._decode_turn % count
            batch = [self._decoding[(first + i) % count] for i in range(self.max_batch)]
            self._decode_turn += self.max_batch
        live: list[_Job] = []
        for job in batch:
            assert job.reply is not None
            reason = job.reply.stop_before_sampling()
            if reason is not None:
                self._finish(job, reason)
            else:
                live.append(job)
        if not live:
            return 0
        replies = [j.reply for j in live if j.reply is not None]
        try:
            shaped = shape_batch(
                [j.logits for j in live if j.logits is not None],
                replies,
                self.tokenizer.newline_id,
                self.tokenizer.eos_id,
            )
            tokens = sample_batch(
                shaped,
                [r.request.sampling for r in replies],
                [r.generator for r in replies],
                [(r.seed, r.index) for r in replies],
            )
        except Exception as exc:
            for job in live:
                self._fail(job, exc)
            return 0
        feed: list[_Job] = []
        for job, reply, token in zip(live, replies, tokens, strict=True):
            reason = reply.choose(token)
            if reason is not None:
                self._finish(job, reason)
            else:
                feed.append(job)
        if not feed:
            return 0
        feed.sort(key=lambda j: j.slot)  # consecutive slots run in place
        try:
            logits = self.model.decode([j.slot for j in feed], [j.reply.pending for j in feed if j.reply])
        except Exception as exc:
            for job in feed:
                self._fail(job, exc)
            return 0
        now = time.monotonic()
        for row, job in enumerate(feed):
            fed = job.reply
            assert fed is not None
            job.logits = logits[row]
            job.last = fed.pending
            if fed.index == 0:
                with self._stats.lock:
                    self._stats.first_token_s.append(now - job.submitted)
            events, reason = fed.advance()
            for event in events:
                job.post(event)
            if reason is not None:
                self._finish(job, reason)
        return len(feed)

    def _snapshot(self, job: _Job) -> Snapshot:
        assert job.logits is not None
        return Snapshot(
            self.model.export_slot(job.slot),
            job.logits.clone(),
            job.last,
            self.spec.fingerprint,
            dict(job.meta),
        )

    def _finish(self, job: _Job, reason: StopReason) -> None:
        assert job.reply is not None
        try:
            snapshot = self._snapshot(job)
        except Exception as exc:
            self._fail(job, exc)
            return
        for event in job.reply.final_events(reason, snapshot, len(job.prompt)):
            job.post(event)
        self._release(job)

    def _fail(self, job: _Job, exc: BaseException) -> None:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            error = EngineError("the GPU ran out of memory during this reply")
        elif isinstance(exc, EngineError):
            error = exc
        elif job.request is None or job.reply is None:
            error = EngineError(f"the model failed while reading the prompt: {exc}")
        else:
            error = EngineError(f"the model failed during this reply: {exc}")
        if error is not exc:
            error.__cause__ = exc
        log.warning("a request failed in the batched engine: %s", exc)
        job.post(_Failure(error))
        self._release(job)

    def _release(self, job: _Job) -> None:
        for jobs in (self._prefilling, self._decoding):
            if job in jobs:
                jobs.remove(job)
        if job.slot >= 0:
            self.model.release_slot(job.slot)
            heapq.heappush(self._free, job.slot)
            job.slot = -1
