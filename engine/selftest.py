"""The start-up self-test: the fast paths prove themselves against plain PyTorch, or step aside.

Before the engine serves, every path the scheduler can pick for a decode step (in place with and
without padding rows, gathered by index) runs a few steps on scratch slots, and one prompt chunk
is read, first on the fast path and then, from the same states, eagerly in plain PyTorch (no
CUDA graphs, no fused kernel). Logits and states must agree within the precision's limit, and
no slot outside the batch (and its padding) may change.

On a mismatch or an error, one line names the path and the measured difference, and the next
safer configuration is tried: no CUDA graphs, then no fused kernel (graphs of the plain
recurrence), then plain PyTorch, which is the reference itself and always serves. The
:class:`PathReport` says which serves and why (``describe()``, the ``path_level`` metric).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from engine.runner import ModelRunner

log = logging.getLogger(__name__)

PLAIN = "plain PyTorch"
# (CUDA graphs, fused kernel, name), fastest first; the index is the ``path_level`` metric
LEVELS = (
    (True, True, "CUDA graphs + fla-core"),
    (False, True, "fla-core, no CUDA graphs"),
    (True, False, "CUDA graphs, plain recurrence"),
    (False, False, PLAIN),
)
STEPS = 3  # decode steps per path
WATCHED = 8  # slots whose states are compared (the batch's and bystanders')


@dataclass(frozen=True)
class PathReport:
    """Which configuration serves, what the self-test checked, and why faster ones do not."""

    path: str
    level: int  # the index in LEVELS: 0 every fast path, 3 plain PyTorch
    checked: str | None = None  # None: there was no fast path to check
    fallback_reason: str | None = None

    def describe(self) -> str:
        """For the start-up line and ``/rwkv status``."""
        text = f"path: {self.path}"
        if self.checked is not None:
            text += f" (self-test: {self.checked})"
        if self.fallback_reason is not None:
            text += f", fell back: {self.fallback_reason}"
        return text


def choose_path(runner: ModelRunner, max_batch: int, *, chunk: int = 16) -> PathReport:
    """Capture, check and pick the fastest configuration that agrees with plain PyTorch; the
    runner is left configured for it, its slots zeroed."""
    levels = [
        (index, graphs, fused, name)
        for index, (graphs, fused, name) in enumerate(LEVELS)
        if (runner.graphs_wanted or not graphs) and (runner.model.fused_available or not fused)
    ]
    if len(levels) == 1:
        return PathReport(PLAIN, len(LEVELS) - 1)
    started = time.perf_counter()
    reasons: list[str] = []
    for (index, graphs, fused, name), after in itertools.pairwise(levels):
        runner.configure(graphs=graphs, fused=fused)
        checked, problem = _check(runner, max_batch, graphs=graphs, chunk=chunk)
        if problem is None:
            took = time.perf_counter() - started  # captures included: the check's own time is in it
            return PathReport(name, index, f"{checked}; {took:.2f} s in all", "; ".join(reasons) or None)
        log.warning("start-up self-test: %s %s; serving with %s instead", name, problem, after[3])
        reasons.append(f"{name} {problem}")
    runner.configure(graphs=False, fused=False)
    took = time.perf_counter() - started
    return PathReport(PLAIN, len(LEVELS) - 1, f"{took:.2f} s in all", "; ".join(reasons))


def limit_for(runner: ModelRunner) -> float:
    """The largest difference, relative to the largest value, that two float paths may have."""
    if runner.dtype != torch.float32:
        return 1e-2
    tf32 = runner.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return 2e-3 if tf32 else 1e-5


def _check(runner: ModelRunner, max_batch: int, *, graphs: bool, chunk: int) -> tuple[str, str | None]:
    """(what was checked, the problem or None) for the runner's current configuration."""
    if graphs:
        runner.capture_graphs(max_batch)
        if not runner.cuda_graphs:
            return "", runner.graph_failure or "could not be captured"
    names: list[str] = []
    started = time.perf_counter()
    try:
        for kind, slots in decode_cases(runner, max_batch):
            bucket, in_place = runner.graph_plan(slots)
            padding = set(range(len(slots), bucket)) if graphs and in_place else set()
            count = f"{len(slots)} row" + "s" * (len(slots) > 1)  # no padding without graphs
            label = (
                f"decode {kind} (bucket {bucket})" if graphs else f"decode {kind.split(' with')[0]} ({count})"
            )
            names.append(label)
            problem = _compare(runner, partial(_decode, runner, slots), slots, padding)
            if problem is not None:
                return "", f"failed on {label}: {problem}"
        rows = [0, 1][: runner.max_slots]
        problem = _compare(runner, lambda: _prefill(runner, rows, chunk), rows, set())
        if problem is not None:
            return "", f"failed on a {chunk}-token prompt chunk: {problem}"
    except Exception as exc:  # a kernel or a replay that raises
        return "", f"raised {type(exc).__name__}: {exc}"
    finally:
        for t in runner.states:
            t.zero_()
    took = time.perf_counter() - started
    return f"{', '.join(names)} and a {chunk}-token prompt chunk agree with {PLAIN} ({took:.2f} s)", None


def decode_cases(runner: ModelRunner, max_batch: int) -> list[tuple[str, list[int]]]:
    """The decode batches that take each path the scheduler can pick, on the smallest buckets:
    in place without padding, in place with padding (3 in a bucket of 4), gathered."""
    top = min(max_batch, runner.max_slots)
    cases = [("in place", [0])]
    if top >= 3 and runner.max_slots >= 4:
        cases.append(("in place with padding", [0, 1, 2]))
    if top >= 2:
        cases.append(("gathered", [1, 0]))
    elif runner.max_slots >= 2:
        cases.append(("gathered", [1]))
    return cases


def _decode(runner: ModelRunner, slots: list[int]) -> list[torch.Tensor]:
    return [
        runner.decode(slots, [(7 * step + 3 * row + 1) % runner.vocab_size for row in range(len(slots))])
        for step in range(STEPS)
    ]


def _prefill(runner: ModelRunner, slots: list[int], chunk: int) -> list[torch.Tensor]:
    tokens = [[(5 * i + 11 * row + 2) % runner.vocab_size for i in range(chunk)] for row in range(len(slots))]
    out = runner.prefill(slots, tokens, logits=True)
    assert out is not None
    return [out]


def _compare(
    runner: ModelRunner, run: Callable[[], list[torch.Tensor]], slots: list[int], padding: set[int]
) -> str | None:
    """Run on the fast path, then from the same states in plain PyTorch; None if they agree."""
    watched = min(runner.max_slots, WATCHED)
    gen = torch.Generator(device=runner.device).manual_seed(1234)
    for t in runner.states:  # random states in the batch's slots; the others keep theirs
        for slot in slots:
            noise = torch.randn(t[:, slot].shape, generator=gen, device=runner.device)
            t[:, slot].copy_(noise * (0.1 if t.dtype == torch.float32 else 1.0))
    before = [t[:, :watched].clone() for t in runner.states]
    got = run()
    got_states = [t[:, :watched].clone() for t in runner.states]
    for t, saved in zip(runner.states, before, strict=True):
        t[:, :watched].copy_(saved)
    with runner.plain():
        want = run()
    limit = limit_for(runner)
    worst = max(_rel(g, w) for g, w in zip(got, want, strict=True))
    if not worst <= limit:
        return f"logits differ by {worst:.1e} (limit {limit:.0e})"
    batch = [s for s in slots if s < watched]
    others = [s for s in range(watched) if s not in slots and s not in padding]
    for g, t in zip(got_states, runner.states, strict=True):
        w = t[:, :watched]
        if others:
            moved = _rel(g[:, others], w[:, others], scale=w[:, batch])
            if not moved <= limit:
                return f"wrote outside its slots (states of other slots moved by {moved:.1e})"
        diff = _rel(g[:, batch], w[:, batch])
        if not diff <= limit:
            return f"states differ by {diff:.1e} (limit {limit:.0e})"
    return None


def _rel(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """The largest difference over the largest value (of ``scale``, default ``want``); NaN is
    never within a limit."""
    top = float((want if scale is None else scale).abs().max().float())
    return float((got.float() - want.float()).abs().max()) / max(top, 1e-30)
