"""The model runner's limits: what it refuses to load, and why; the CUDA-graph buckets."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.cuda_graphs import graph_buckets
from engine.errors import EngineError
from engine.runner import ModelRunner


def test_too_many_resident_states_for_the_memory_is_refused_plainly(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slots that would not fit in free memory give one line naming the settings, and how many fit."""
    model = ModelRunner.load(model_dir / "v7.pth", max_slots=1)
    per_slot = sum(states[:, 0].nbytes for states in model.states)
    monkeypatch.setattr("engine.runner._free_memory", lambda device: 100 * per_slot)
    with pytest.raises(EngineError, match=r"lower max_resident \(or max_batch\) to at most 89"):
        ModelRunner.load(model_dir / "v7.pth", max_slots=100)
    assert ModelRunner.load(model_dir / "v7.pth", max_slots=89).max_slots == 89


def test_graph_buckets_cover_every_batch_size() -> None:
    """The buckets captured at start are the ones decode steps of 1 to max_batch sequences use."""
    assert graph_buckets(128, 128) == [128, 64, 32, 16, 8, 4, 2, 1]
    assert graph_buckets(70, 100) == [100, 64, 32, 16, 8, 4, 2, 1]  # 65 to 70 use the 100 slots
    assert graph_buckets(5, 3) == [3, 2, 1]
    assert graph_buckets(1, 32) == [1]
