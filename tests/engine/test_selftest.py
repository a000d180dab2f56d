"""The start-up self-test on the CPU: the fast paths replaced through their seams (a graph factory,
an installed fused kernel), each kind of failure forced, and the fallback chain's end and lines."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from engine.batched_engine import BatchedEngine
from engine.cuda_graphs import IndexedStep, RunStep
from engine.formats import inspect_model, load_weights
from engine.models.rwkv7 import RWKV7, recurrent_plain
from engine.native import ENV_SWITCH
from engine.runner import GraphFactory, ModelRunner
from engine.selftest import choose_path, decode_cases
from engine.tokenizer import world_tokenizer


@pytest.fixture(autouse=True)
def pytorch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The seams under test (graphs, an installed fused recurrence) are the PyTorch path's: these
    models do not run the C step."""
    monkeypatch.setenv(ENV_SWITCH, "off")


class EagerGraph:
    """A stand-in for a CUDA graph: each replay runs the captured step eagerly, padding rows
    included, as a correct replay computes it."""

    replays: ClassVar[list[tuple[int, bool]]] = []

    def __init__(self, steps: tuple[IndexedStep, RunStep], bucket: int, in_place: bool) -> None:
        self.steps, self.bucket, self.in_place = steps, bucket, in_place

    def run(self, slots: torch.Tensor | None, tokens: torch.Tensor, scratch: int) -> torch.Tensor:
        n = tokens.numel()
        EagerGraph.replays.append((self.bucket, self.in_place))
        padded = torch.zeros(self.bucket, dtype=torch.long)
        padded[:n] = tokens
        if self.in_place:
            return self.steps[1](padded)[:n].clone()
        idx = torch.full((self.bucket,), scratch, dtype=torch.long)
        assert slots is not None
        idx[:n] = slots
        return self.steps[0](idx, padded)[:n].clone()


class StaleGraph(EagerGraph):
    """A replay that updates the states but hands back the logits of its first replay."""

    def __init__(self, steps: tuple[IndexedStep, RunStep], bucket: int, in_place: bool) -> None:
        super().__init__(steps, bucket, in_place)
        self.first: torch.Tensor | None = None

    def run(self, slots: torch.Tensor | None, tokens: torch.Tensor, scratch: int) -> torch.Tensor:
        logits = super().run(slots, tokens, scratch)
        if self.first is None:
            self.first = logits
        return self.first.clone()


def failing_capture(steps: tuple[IndexedStep, RunStep], bucket: int, in_place: bool) -> EagerGraph:
    raise RuntimeError("operation not permitted when stream is capturing")


def stray_kernel(runner: Callable[[], ModelRunner]) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The plain recurrence, plus a write into slot 5's states (never in a test batch)."""

    def fused(
        state: torch.Tensor, *, packed: bool, **inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        runner().states[1][0, 5].add_(0.5)
        return recurrent_plain(state, **inputs)

    return fused


def good_kernel(
    state: torch.Tensor, *, packed: bool, **inputs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return recurrent_plain(state, **inputs)


def make_runner(
    model_dir: Path, factory: GraphFactory | None, kernel: str | None, max_slots: int = 8
) -> ModelRunner:
    """The tiny RWKV-7 on the CPU with the given stand-ins for CUDA graphs and fla-core."""
    path = model_dir / "v7.pth"
    model = RWKV7(
        load_weights(path), device=torch.device("cpu"), dtype=torch.float32, batch_hint=8, use_fla=False
    )
    runner = ModelRunner(model, max_slots=max_slots, graph_factory=factory)
    if kernel == "good":
        model.install_fused(good_kernel, in_place=True)
    elif kernel == "stray":
        model.install_fused(stray_kernel(lambda: runner), in_place=True)
    return runner


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "engine.selftest" and r.levelno == logging.WARNING
    ]


def test_every_path_agrees_so_the_fastest_serves(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Correct graphs and kernel: level 0, every kind of decode batch replayed, the slots zeroed."""
    EagerGraph.replays.clear()
    runner = make_runner(model_dir, EagerGraph, "good")
    report = choose_path(runner, 8)
    assert (report.path, report.level, report.fallback_reason) == ("CUDA graphs + fla-core", 0, None)
    assert report.checked is not None
    for part in (
        "in place (bucket 1)",
        "in place with padding (bucket 4)",
        "gathered (bucket 2)",
        "prompt chunk",
    ):
        assert part in report.checked
    assert {(1, True), (4, True), (2, False)} <= set(EagerGraph.replays)
    assert runner.cuda_graphs and runner.fused_recurrence
    assert all(float(t.abs().max()) == 0 for t in runner.states)
    assert warnings(caplog) == []


def test_a_stale_replay_drops_the_graphs(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A graph that returns stale logits: one line names it and the difference; fla-core serves
    without graphs."""
    runner = make_runner(model_dir, StaleGraph, "good")
    report = choose_path(runner, 8)
    assert (report.path, report.level) == ("fla-core, no CUDA graphs", 1)
    [line] = warnings(caplog)
    assert line.startswith("start-up self-test: CUDA graphs + fla-core failed on decode in place (bucket 1)")
    assert "logits differ by" in line and line.endswith("serving with fla-core, no CUDA graphs instead")
    assert report.fallback_reason is not None and "logits differ by" in report.fallback_reason
    assert not runner.cuda_graphs and runner.fused_recurrence


def test_a_capture_that_raises_drops_the_graphs(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    runner = make_runner(model_dir, failing_capture, "good")
    report = choose_path(runner, 8)
    assert (report.path, report.level) == ("fla-core, no CUDA graphs", 1)
    [line] = warnings(caplog)
    assert "CUDA graphs + fla-core capture failed (RuntimeError: operation not permitted" in line


def test_a_kernel_that_writes_outside_its_slots_is_not_used(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The kernel fails with and without graphs; graphs of the plain recurrence serve."""
    runner = make_runner(model_dir, EagerGraph, "stray")
    report = choose_path(runner, 8)
    assert (report.path, report.level) == ("CUDA graphs, plain recurrence", 2)
    lines = warnings(caplog)
    assert len(lines) == 2
    assert lines[0].startswith("start-up self-test: CUDA graphs + fla-core failed on decode in place")
    assert lines[1].startswith("start-up self-test: fla-core, no CUDA graphs failed on decode in place")
    assert all("wrote outside its slots" in line for line in lines)
    assert runner.cuda_graphs and not runner.fused_recurrence


def test_everything_failing_ends_on_the_plain_path(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    runner = make_runner(model_dir, StaleGraph, "stray")
    report = choose_path(runner, 8)
    assert (report.path, report.level) == ("plain PyTorch", 3)
    lines = warnings(caplog)
    assert len(lines) == 3 and lines[-1].endswith("serving with plain PyTorch instead")
    assert report.fallback_reason is not None and report.fallback_reason.count("failed on") == 3
    assert not runner.cuda_graphs and not runner.fused_recurrence


def test_graphs_alone_fall_back_to_plain(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No fused kernel: the chain is graphs, then plain PyTorch."""
    runner = make_runner(model_dir, StaleGraph, None)
    report = choose_path(runner, 8)
    assert (report.path, report.level) == ("plain PyTorch", 3)
    [line] = warnings(caplog)
    assert line.startswith("start-up self-test: CUDA graphs, plain recurrence failed on decode in place")
    assert line.endswith("serving with plain PyTorch instead")


def test_nothing_to_check_on_a_plain_cpu_runner(model_dir: Path) -> None:
    report = choose_path(make_runner(model_dir, None, None), 8)
    assert (report.path, report.level, report.checked) == ("plain PyTorch", 3, None)


def test_small_limits_pick_only_the_paths_the_scheduler_can_take(model_dir: Path) -> None:
    runner = make_runner(model_dir, None, None, max_slots=2)
    assert decode_cases(runner, 1) == [("in place", [0]), ("gathered", [1])]
    assert [kind for kind, _ in decode_cases(runner, 2)] == ["in place", "gathered"]
    assert len(decode_cases(make_runner(model_dir, None, None, max_slots=1), 1)) == 1


def test_the_engine_says_which_path_serves_and_why(model_dir: Path) -> None:
    """describe() and the metrics carry the self-test's verdict, and the engine serves on the
    path it chose: a prompt read gives the plain runner's logits."""
    runner = make_runner(model_dir, EagerGraph, "stray")
    spec = inspect_model(model_dir / "v7.pth")
    engine = BatchedEngine(runner, spec, world_tokenizer(), "cpu fp32", max_batch=4)
    try:
        engine.wait_ready()
        text = engine.describe()
        assert "path: CUDA graphs, plain recurrence (self-test:" in text
        assert "fell back: CUDA graphs + fla-core failed on decode in place" in text
        numbers: dict[str, Any] = engine.metrics()
        assert (numbers["path_level"], numbers["path_fallback"]) == (2, 1.0)
        prompt = [5, 9, 12, 40]
        snapshot = asyncio.run(engine.read(None, prompt))
        plain = make_runner(model_dir, None, None)
        plain.zero_slot(0)
        want = plain.prefill([0], [prompt], logits=True)
        assert want is not None and torch.allclose(snapshot.logits, want[0], rtol=0, atol=1e-5)
    finally:
        asyncio.run(engine.close())
