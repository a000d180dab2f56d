"""Recent numbers of a batched engine: tokens per second, time to first token, step times."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

WINDOW_S = 10.0  # tokens per second over this many recent seconds


@dataclass
class StepStats:
    """Written by the worker after each step, read by :meth:`summary` (under a lock)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    decoded: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=4096))
    prefilled: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=4096))
    first_token_s: deque[float] = field(default_factory=lambda: deque(maxlen=100))
    step_s: deque[float] = field(default_factory=lambda: deque(maxlen=2000))
    batch: int = 0
    steps: int = 0
    started: float = field(default_factory=time.monotonic)

    def step(self, started: float, now: float, decoded: int, prefilled: int) -> None:
        """A step that began at ``started`` ended at ``now``, having decoded and read this many."""
        with self.lock:
            self.steps += 1
            if decoded or prefilled:
                self.step_s.append(now - started)
            if decoded:
                self.decoded.append((now, decoded))
                self.batch = decoded
            if prefilled:
                self.prefilled.append((now, prefilled))

    def first_token(self, seconds: float) -> None:
        """A reply's first token came this long after its request was submitted."""
        with self.lock:
            self.first_token_s.append(seconds)

    def summary(self) -> dict[str, float]:
        """Throughput over the recent window, latency percentiles, the last batch, the steps."""
        now = time.monotonic()
        with self.lock:
            since = max(now - WINDOW_S, self.started)
            span = max(now - since, 1e-9)
            decoded = sum(n for t, n in self.decoded if t >= since)
            prefilled = sum(n for t, n in self.prefilled if t >= since)
            ttft = list(self.first_token_s)
            steps = list(self.step_s)
            batch, total_steps = self.batch, self.steps
        return {
            "batch": batch,
            "tokens_per_s": decoded / span,
            "prefill_tokens_per_s": prefilled / span,
            "ttft_p50_s": percentile(ttft, 0.5),
            "step_p50_ms": 1000 * percentile(steps, 0.5),
            "step_p99_ms": 1000 * percentile(steps, 0.99),
            "steps": total_steps,
        }


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank); 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
