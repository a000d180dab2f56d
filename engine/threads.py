"""Which threads run torch's intra-op (OpenMP) parallel work: the thread that decodes, only.

Every thread that runs a parallel region gets its own OpenMP team. Once more threads are managed
than there are CPUs, libgomp's waiting threads stop spinning and every parallel region pays a
wake-up; a CPU decode step has hundreds of small ones (measured: up to 2.7x slower). So a model is
loaded (and its weights prepacked) on the thread that will decode with it, and one-off work that
may run parallel regions (a parity check) runs on a thread of its own that ends afterwards: an
ending thread takes its team with it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class _Call:
    def __init__(self, fn: Callable[[], Any], *, last: bool) -> None:
        self.fn, self.last = fn, last
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class WorkerThread:
    """A thread that first runs calls handed to it (loading a model), then its main loop.

    ``call`` runs a function on the thread and returns its result (or raises its error) to the
    caller; ``run`` hands the thread its main loop, after which it takes no more calls.
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        """The thread's name."""
        return self._thread.name

    @property
    def ident(self) -> int | None:
        """The thread's identifier (``threading.get_ident()`` on it)."""
        return self._thread.ident

    def _serve(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            try:
                call.result = call.fn()
            except BaseException as exc:  # handed to the caller
                call.error = exc
            finally:
                call.done.set()
            if call.last:
                return

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on this thread and wait for it."""
        if threading.current_thread() is self._thread:
            return fn()
        call = _Call(fn, last=False)
        self._calls.put(call)
        call.done.wait()
        if call.error is not None:
            raise call.error
        result: T = call.result
        return result

    def run(self, main: Callable[[], None]) -> None:
        """Hand the thread its main loop (it ends when ``main`` returns)."""
        self._calls.put(_Call(main, last=True))

    def stop(self) -> None:
        """End a thread that was never handed its main loop."""
        self._calls.put(None)
        self._thread.join()

    def join(self) -> None:
        """Wait for the thread to end."""
        self._thread.join()

    def is_alive(self) -> bool:
        """Whether the thread still runs."""
        return self._thread.is_alive()


def call_in_new_thread(fn: Callable[[], T], name: str = "rwkv-oneoff") -> T:
    """Run ``fn`` on a thread of its own that ends afterwards (with any OpenMP team it started)."""
    worker = WorkerThread(name)
    try:
        return worker.call(fn)
    finally:
        worker.stop()
