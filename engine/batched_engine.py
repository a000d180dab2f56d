"""The batched engine behind the :class:`Engine` interface: the asyncio side of its worker.

The worker (:class:`engine.core.EngineCore`) runs a continuous-batching scheduler on its own
thread. The events of a step reach the asyncio side in one ``loop.call_soon_threadsafe`` call
per event loop; the event loop never waits on the model, and a caller that falls behind gets the
text already waiting as one piece.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from engine.core import EngineCore, Failure, Job
from engine.errors import EngineError
from engine.formats import ModelSpec, inspect_model
from engine.interface import Engine, Finished, GenerationEvent, GenerationRequest, PromptRead, TextDelta
from engine.models import describe_families, has_family
from engine.runner import ModelRunner
from engine.state import Snapshot
from engine.strategy import Resolved, resolve_strategy
from engine.threads import WorkerThread
from engine.tokenizer import Tokenizer, load_tokenizer

_Outgoing = tuple[asyncio.Queue[object], Job, object]


class BatchedEngine(EngineCore, Engine):
    """A model of a registered family with continuous batching behind the :class:`Engine`
    interface."""

    def __init__(
        self,
        runner: ModelRunner,
        spec: ModelSpec,
        tokenizer: Tokenizer,
        strategy: str,
        *,
        max_batch: int = 32,
        prefill_chunk: int = 128,
        prefill_budget: int | None = None,
        worker: WorkerThread | None = None,
    ) -> None:
        super().__init__(
            runner,
            spec,
            tokenizer,
            max_batch=max_batch,
            prefill_chunk=prefill_chunk,
            prefill_budget=prefill_budget,
            worker=worker,
        )
        self.strategy = strategy
        self.resolved = Resolved(strategy)  # how it was chosen (load sets it for an ``auto`` one)
        self._outbox: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[object], Job, object]] = []
        self._start()

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
        batch never exceeds the resident states). An ``auto`` strategy is resolved for the device
        at hand (:func:`engine.strategy.resolve_strategy`).
        """
        resolved = resolve_strategy(strategy)
        strategy = resolved.strategy
        spec = inspect_model(path)
        if not has_family(spec.family):
            raise EngineError(
                f"the batched engine runs {describe_families()} models only; {path.name} is "
                f"{spec.describe()}: use the reference engine for it"
            )
        tok = load_tokenizer(tokenizer, spec) if isinstance(tokenizer, str) else tokenizer
        resident = max_resident or max_batch
        # The weights are loaded (and prepacked) on the thread that will decode with them: one
        # OpenMP team in the process, not one per thread (engine.threads).
        worker = WorkerThread("rwkv-batch")
        try:
            runner = worker.call(
                lambda: ModelRunner.load(
                    path, strategy, max_slots=resident, cuda_graphs=cuda_graphs, use_fla=use_fla
                )
            )
            engine = cls(
                runner,
                spec,
                tok,
                strategy,
                max_batch=min(max_batch, resident),
                prefill_chunk=prefill_chunk,
                prefill_budget=prefill_budget,
                worker=worker,
            )
            engine.resolved = resolved
        except BaseException:
            worker.stop()
            raise
        try:
            engine.wait_ready()  # a GPU that cannot run the model says so now, not at the first reply
        except BaseException:
            engine.shutdown()
            raise
        return engine

    def describe(self) -> str:
        """The model, the strategy, the batch limits, the fast paths and (after a start-up
        self-test) which configuration serves and why."""
        checked = f", {self.path.describe()}" if self.path.checked is not None else ""
        return (
            f"{self.spec.describe()} ({self.resolved.describe()}, batched engine: max batch "
            f"{self.max_batch}, {self.max_resident} resident, {self.runner.describe_kernels()}{checked})"
        )

    async def read(self, start: Snapshot | None, tokens: list[int]) -> Snapshot:
        """Feed tokens to a snapshot (or a zero state) in the worker."""
        queue: asyncio.Queue[object] = asyncio.Queue()
        job = Job(None, start, list(tokens))
        job.post = self._poster(queue, job)
        self._submit(job)
        done = False
        try:
            item = await queue.get()
            done = True
            if isinstance(item, Failure):
                raise item.error
            assert isinstance(item, Snapshot)
            return item
        finally:
            if not done:
                job.abandoned = True

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Queue the generation and stream its events as the worker produces them."""
        queue: asyncio.Queue[object] = asyncio.Queue()
        job = Job(request, request.start, list(request.prompt))
        job.post = self._poster(queue, job)
        self._submit(job)
        done = False
        held: object | None = None
        try:
            while True:
                item, held = (held, None) if held is not None else (await queue.get(), None)
                if isinstance(item, Failure):
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

    def metrics(self) -> dict[str, float]:
        """Recent numbers: queue, batch, resident states, tokens/s, time to first token, steps;
        ``path_level`` the configuration that serves (0 CUDA graphs and the fused kernel, 1 no
        graphs, 2 no fused kernel, 3 plain PyTorch) and ``path_fallback`` 1 when the start-up
        self-test turned a faster one down."""
        recent = self._stats.summary()
        with self._cond:
            queued = len(self._queue)
        return {
            "queue": queued,
            "batch": recent["batch"],
            "resident": self._scheduler.resident,
            "max_batch": self.max_batch,
            "max_resident": self.max_resident,
            **{key: value for key, value in recent.items() if key != "batch"},
            "path_level": self.path.level,
            "path_fallback": float(self.path.fallback_reason is not None),
        }

    def _poster(self, queue: asyncio.Queue[object], job: Job) -> Callable[[object], None]:
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
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outgoing]] = {}
        for loop, queue, job, item in sent:
            by_loop.setdefault(loop, []).append((queue, job, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is gone (shutdown): nobody is listening any more
                for _, job, _ in items:
                    job.abandoned = True


def _deliver(items: list[_Outgoing]) -> None:
    """On the event loop: put a step's events into their callers' queues."""
    for queue, _job, item in items:
        queue.put_nowait(item)
