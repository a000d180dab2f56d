"""The batched engine's core: one worker thread that runs the scheduler's steps on the runner.

A step lets queued requests in, reads prompt chunks, then samples one token for every decoding
sequence with :class:`engine.generation.SequenceRunner`'s policy (the shaping of
:mod:`engine.logits`, the batched draw of :mod:`engine.batch_sampler`, the stop rules of
:mod:`engine.output`) and feeds all of them to the model in one batched step. A sequence that
finishes leaves at once, and a new request joins at the next step. The per-token work on the
host is kept small (penalties decay in one vectorised multiply, the end-of-turn check looks at
the new text only): on a GPU it, not the model, bounds a large batch.

Events go out through each job's ``post``; :meth:`EngineCore._flush` hands a step's events over
(the asyncio side, :mod:`engine.batched_engine`, delivers them in one call per event loop).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.batch_sampler import DrawSeed, sample_batch
from engine.errors import EngineDiedError, EngineError
from engine.formats import ModelSpec
from engine.interface import GenerationRequest, PromptRead, StopReason
from engine.logits import Shaper, avoid_repeat_ids, shape_batch
from engine.metrics import StepStats
from engine.output import OutputProcessor
from engine.runner import ModelRunner
from engine.scheduler import PrefillGroup, Scheduler, by_slot
from engine.selftest import PLAIN, PathReport, choose_path
from engine.state import Snapshot
from engine.threads import WorkerThread
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

PREFILL_BUDGET_CPU = 256  # prompt tokens read per scheduler step, by default
PREFILL_BUDGET_CUDA = 2048


class Failure:
    """A request's end by an error, as its caller will hear it."""

    def __init__(self, error: EngineError) -> None:
        self.error = error


class _Generation:
    """A generation's part in the worker: its draw seed, shaping and output, the token in flight."""

    def __init__(
        self, request: GenerationRequest, tokenizer: Tokenizer, avoid: frozenset[int], last: int | None
    ) -> None:
        self.request = request
        self.draw = DrawSeed(request.seed)
        self.shaper = Shaper(request, avoid, last)
        self.output = OutputProcessor(request, tokenizer)
        self.pending = 0  # the sampled token waiting for the forward pass


def _nobody(item: object) -> None:
    """The event sink of a job before its caller's queue is attached."""


@dataclass(eq=False)
class Job:
    """A request's life in the worker: queued, reading its prompt, then decoding."""

    request: GenerationRequest | None  # None: a prompt read (Engine.read)
    start: Snapshot | None
    prompt: list[int]
    post: Callable[[object], None] = _nobody
    submitted: float = field(default_factory=time.monotonic)
    abandoned: bool = False  # the caller stopped listening: drop the job at the next step
    slot: int = -1
    fed: int = 0  # prompt tokens read so far
    logits: torch.Tensor | None = None  # raw float32 logits after ``last``
    last: int | None = None
    generation: _Generation | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class EngineCore:
    """The worker thread of a batched engine, its request queue and its scheduler."""

    def __init__(
        self,
        runner: ModelRunner,
        spec: ModelSpec,
        tokenizer: Tokenizer,
        *,
        max_batch: int,
        prefill_chunk: int,
        prefill_budget: int | None,
        worker: WorkerThread | None = None,
    ) -> None:
        if not runner.matches(spec):
            raise EngineError(f"the loaded weights do not match {spec.describe()}")
        self._budget_chosen = prefill_budget is not None
        if prefill_budget is None:  # a GPU with the fused kernel reads thousands of tokens in the
            # time of a decode step; the plain recurrence launches kernels token by token
            fast = runner.device.type == "cuda" and runner.fused_recurrence
            prefill_budget = PREFILL_BUDGET_CUDA if fast else PREFILL_BUDGET_CPU
        if max_batch < 1 or prefill_chunk < 1 or prefill_budget < 1:
            raise ValueError("max_batch, prefill_chunk and prefill_budget must be at least 1")
        self.runner = runner
        self.spec = spec
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_resident = runner.max_slots
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget
        self._avoid_ids = avoid_repeat_ids(tokenizer)
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()  # guarded by _cond; the scheduler is the worker's
        self._closing = False
        self._dead: BaseException | None = None
        self._scheduler: Scheduler[Job] = Scheduler(
            runner.max_slots, max_batch=max_batch, prefill_chunk=prefill_chunk, prefill_budget=prefill_budget
        )
        self._stats = StepStats()
        self.path = PathReport(PLAIN, 3)  # the configuration that serves: set by the start-up self-test
        self._ready = threading.Event()  # set once the worker has bound its device (or died)
        # the thread that decodes; best the one that loaded the weights (engine.threads)
        self._thread = worker or WorkerThread(f"rwkv-batch-{runner.device}")

    def _start(self) -> None:
        self._thread.run(self._work)

    def wait_ready(self) -> None:
        """Block until the worker has prepared its device; :class:`EngineError` if it could not."""
        self._ready.wait()
        if self._dead is not None:
            raise EngineError(f"the batched engine could not start on {self.runner.device}: {self._dead}")

    @property
    def alive(self) -> bool:
        """Whether the engine takes requests (not closed, its worker not dead)."""
        return not self._closing and self._dead is None

    def shutdown(self) -> None:
        """Stop the worker (blocks until it has stopped); queued and running requests end with
        :class:`EngineDiedError`."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()

    def busy(self) -> int:
        """Requests waiting or holding a state slot: how loaded this engine is."""
        with self._cond:
            queued = len(self._queue)
        return queued + self._scheduler.resident

    def _submit(self, job: Job) -> None:
        with self._cond:
            if self._dead is not None:
                raise EngineDiedError(f"the engine died: {self._dead}")
            if self._closing:
                raise EngineDiedError("the engine has been closed")
            self._queue.append(job)
            self._cond.notify()

    def _flush(self) -> None:
        """Hand the events of a step over (the asyncio side's)."""

    # ------------------------------------------------------------------------------ the worker

    def _bind(self) -> None:
        """Prepare the worker thread: its GPU, and the decode step's CUDA graphs for every batch
        bucket up to ``max_batch`` (captured now rather than in the middle of someone's reply),
        checked with the fused kernel against plain PyTorch before anything is served
        (:mod:`engine.selftest`)."""
        if self.runner.device.type == "cuda":
            torch.cuda.set_device(self.runner.device)
        self.path = choose_path(self.runner, self.max_batch, chunk=min(self.prefill_chunk, 16))
        if not (self._budget_chosen or self.runner.fused_recurrence):  # the fused kernel stepped aside
            self.prefill_budget = self._scheduler.prefill_budget = min(
                self.prefill_budget, PREFILL_BUDGET_CPU
            )
        if self.path.checked is not None:
            log.info("%s on %s: %s", "batched engine", self.runner.device, self.path.describe())

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
                        while not (self._closing or self._queue or self._scheduler.busy()):
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
            for job in queued + self._scheduler.drain():
                job.post(Failure(EngineDiedError(reason)))
            self._flush()

    def _step(self) -> None:
        started = time.monotonic()
        for job in self._scheduler.abandoned():
            self._release(job)
        self._admit()
        prefilled = self._read_prompts() if self._scheduler.prefilling else 0
        decoded = self._decode() if self._scheduler.decoding else 0
        self._stats.step(started, time.monotonic(), decoded, prefilled)

    def _admit(self) -> None:
        while True:
            with self._cond:
                job = self._scheduler.admit(self._queue)
            if job is None:
                return
            try:
                if job.start is not None:
                    self.runner.load_slot(job.slot, job.start.tensors)
                    job.logits = job.start.logits.to(self.runner.device, torch.float32).reshape(-1)
                    job.last = job.start.last_token
                else:
                    self.runner.zero_slot(job.slot)
                if job.request is not None:
                    job.meta = job.request.snapshot_meta()
                if job.prompt:
                    self._scheduler.read_prompt(job)
                else:
                    self._prompt_done(job)
            except Exception as exc:
                self._fail(job, exc)

    def _read_prompts(self) -> int:
        """Read the chunks the scheduler picked; returns the tokens read."""
        return sum(self._read_group(group) for group in self._scheduler.prefill_groups())

    def _read_group(self, group: PrefillGroup[Job]) -> int:
        try:
            out = self.runner.prefill(
                [j.slot for j, _ in group.items], [c for _, c in group.items], logits=group.last
            )
        except Exception as exc:
            for job, _ in group.items:
                self._fail(job, exc)
            return 0
        done = 0
        for row, (job, chunk) in enumerate(group.items):
            job.fed += len(chunk)
            job.last = chunk[-1]
            done += len(chunk)
            if out is not None:
                job.logits = out[row]
                self._scheduler.prompt_read(job)
                self._prompt_done(job)
        return done

    def _prompt_done(self, job: Job) -> None:
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
        job.generation = _Generation(job.request, self.tokenizer, self._avoid_ids, job.last)
        self._scheduler.start_decoding(job)

    def _decode(self) -> int:
        """One token for the scheduler's decode batch; returns how many were fed."""
        live: list[Job] = []
        for job in self._scheduler.decode_batch():
            assert job.generation is not None
            reason = job.generation.output.stop_before_sampling()
            if reason is not None:
                self._finish(job, reason)
            else:
                live.append(job)
        if not live:
            return 0
        feed = self._sample(live)
        if not feed:
            return 0
        feed = by_slot(feed)  # consecutive slots run in place
        try:
            logits = self.runner.decode([j.slot for j in feed], [_gen(j).pending for j in feed])
        except Exception as exc:
            for job in feed:
                self._fail(job, exc)
            return 0
        now = time.monotonic()
        for row, job in enumerate(feed):
            gen = _gen(job)
            job.logits = logits[row]
            job.last = gen.pending
            if gen.output.index == 0:
                self._stats.first_token(now - job.submitted)
            events, reason = gen.output.accept(gen.pending)
            for event in events:
                job.post(event)
            if reason is not None:
                self._finish(job, reason)
        return len(feed)

    def _sample(self, live: list[Job]) -> list[Job]:
        """Shape and sample a token for each job; returns those whose token is to be fed."""
        gens = [_gen(j) for j in live]
        try:
            indices = [g.output.index for g in gens]
            shaped = shape_batch(
                [j.logits for j in live if j.logits is not None],
                [g.shaper for g in gens],
                indices,
                self.tokenizer.newline_id,
                self.tokenizer.eos_id,
            )
            tokens = sample_batch(
                shaped,
                [g.request.sampling for g in gens],
                [g.draw.generator for g in gens],
                [(g.draw.seed, index) for g, index in zip(gens, indices, strict=True)],
            )
        except Exception as exc:
            for job in live:
                self._fail(job, exc)
            return []
        feed: list[Job] = []
        for job, gen, token in zip(live, gens, tokens, strict=True):
            reason = gen.output.stop_at(token)
            if reason is not None:
                self._finish(job, reason)
            else:
                gen.shaper.add(token)
                gen.pending = token
                feed.append(job)
        return feed

    def _snapshot(self, job: Job) -> Snapshot:
        assert job.logits is not None
        return Snapshot(
            self.runner.export_slot(job.slot),
            job.logits.clone(),
            job.last,
            self.spec.fingerprint,
            dict(job.meta),
        )

    def _finish(self, job: Job, reason: StopReason) -> None:
        try:
            snapshot = self._snapshot(job)
        except Exception as exc:
            self._fail(job, exc)
            return
        for event in _gen(job).output.finish(reason, snapshot, len(job.prompt)):
            job.post(event)
        self._release(job)

    def _fail(self, job: Job, exc: BaseException) -> None:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            error = EngineError("the GPU ran out of memory during this reply")
        elif isinstance(exc, EngineError):
            error = exc
        elif job.request is None or job.generation is None:
            error = EngineError(f"the model failed while reading the prompt: {exc}")
        else:
            error = EngineError(f"the model failed during this reply: {exc}")
        if error is not exc:
            error.__cause__ = exc
        log.warning("a request failed in the batched engine: %s", exc)
        job.post(Failure(error))
        self._release(job)

    def _release(self, job: Job) -> None:
        slot = self._scheduler.release(job)
        if slot is not None:
            self.runner.release_slot(slot)


def _gen(job: Job) -> _Generation:
    """The generation of a decoding job."""
    assert job.generation is not None
    return job.generation
