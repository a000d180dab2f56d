"""An engine that runs the reference implementation in a worker thread, one sequence at a time.

All model work happens on one dedicated thread, so the asyncio event loop (and with it the
Discord gateway heartbeat) is never blocked by a forward pass.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch

from engine.errors import EngineDiedError, EngineError
from engine.formats import ModelSpec, inspect_model
from engine.generation import SequenceRunner
from engine.heap import release_free_heap
from engine.interface import Engine, GenerationEvent, GenerationRequest
from engine.reference import load_reference_model
from engine.state import Snapshot
from engine.strategy import Resolved, resolve_strategy
from engine.tokenizer import Tokenizer, load_tokenizer

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class ReferenceEngine(Engine):
    """The ``rwkv`` package's model behind the :class:`Engine` interface."""

    def __init__(
        self,
        model: Any,
        spec: ModelSpec,
        tokenizer: Tokenizer,
        strategy: str,
        executor: concurrent.futures.ThreadPoolExecutor | None = None,
    ) -> None:
        self.model = model
        self.spec = spec
        self.tokenizer = tokenizer
        self.strategy = strategy
        self.resolved = Resolved(strategy)  # how it was chosen (load sets it for an ``auto`` one)
        _, zero = self._forward([0], None)
        layout = [(t.dtype, t.device) for t in zero]
        self._runner = SequenceRunner(self._forward, tokenizer, spec.fingerprint, layout=layout)
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rwkv-model")
        self._closed = False

    @classmethod
    def load(
        cls, path: Path, strategy: str = "cpu fp32", tokenizer: str | Tokenizer = "auto"
    ) -> ReferenceEngine:
        """Check and load a model file (slow: call it from a thread in async code).

        ``tokenizer`` is a setting (see :func:`engine.tokenizer.load_tokenizer`) or a tokenizer;
        an ``auto`` strategy is resolved for the device at hand.
        """
        resolved = resolve_strategy(strategy)
        strategy = resolved.strategy
        spec = inspect_model(path)
        tok = load_tokenizer(tokenizer, spec) if isinstance(tokenizer, str) else tokenizer
        # loaded on the thread that runs the model: one OpenMP team (engine.threads)
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rwkv-model")
        try:
            engine = executor.submit(
                lambda: cls(load_reference_model(spec, strategy), spec, tok, strategy, executor)
            ).result()
            engine.resolved = resolved
            release_free_heap()  # the holes the loading's temporaries left (engine.heap)
            return engine
        except BaseException:
            executor.shutdown(wait=True)
            raise

    def describe(self) -> str:
        """The model and the strategy it runs with."""
        return f"{self.spec.describe()} ({self.resolved.describe()}, reference engine)"

    def _forward(
        self, tokens: list[int], state: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if state is None and self.spec.family >= 7:
            state = self._rwkv7_zero_state()
        with torch.no_grad():
            out, new_state = self.model.forward(tokens, state)
        return out, list(new_state)

    def _rwkv7_zero_state(self) -> list[torch.Tensor]:
        """A blank RWKV-7 state in this model's dtype and device.

        The reference builds it from module-wide globals that the last loaded RWKV-7 model set,
        so two RWKV-7 models of different precision in one process would get the wrong dtype.
        """
        emb = self.model.z["emb.weight"]
        n_embd, heads, size = self.spec.n_embd, self.spec.n_head, self.spec.head_size
        state: list[torch.Tensor] = []
        for _ in range(self.spec.n_layer):  # 0=att_x_prev 1=att_kv 2=ffn_x_prev
            state.append(torch.zeros(n_embd, dtype=emb.dtype, device=emb.device))
            state.append(torch.zeros((heads, size, size), dtype=torch.float32, device=emb.device))
            state.append(torch.zeros(n_embd, dtype=emb.dtype, device=emb.device))
        return state

    def _submit(self, fn: Any, *args: Any) -> asyncio.Future[Any]:
        if self._closed:
            raise EngineDiedError("the engine has been closed")
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def read(self, start: Snapshot | None, tokens: list[int]) -> Snapshot:
        """Feed tokens to a snapshot (or a zero state) in the model thread."""
        try:
            snapshot: Snapshot = await self._submit(self._runner.feed, start, tokens)
            return snapshot
        except torch.cuda.OutOfMemoryError as exc:
            raise EngineError("the GPU ran out of memory while reading the prompt") from exc
        except RuntimeError as exc:
            raise EngineError(f"the model failed while reading the prompt: {exc}") from exc

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Run the generation in the model thread and stream its events here."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def post(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (shutdown): nobody is listening any more
                request.cancel.set()

        def work() -> None:
            try:
                for event in self._runner.run(request):
                    post(event)
            except BaseException as exc:  # forwarded to the caller, who decides
                post(_Failure(exc))
            finally:
                post(_DONE)

        future = self._submit(work)
        finished = False
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    finished = True
                    break
                if isinstance(item, _Failure):
                    finished = True
                    await future
                    exc = item.exc
                    if isinstance(exc, torch.cuda.OutOfMemoryError):
                        raise EngineError("the GPU ran out of memory during this reply") from exc
                    if isinstance(exc, EngineError):
                        raise exc
                    raise EngineError(f"the model failed during this reply: {exc}") from exc
                yield item
        finally:
            if not finished:
                request.cancel.set()
            # Let the model thread finish the (cancelled) request before the next one starts.
            await asyncio.shield(future)

    async def close(self) -> None:
        """Stop accepting work and release the thread."""
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
