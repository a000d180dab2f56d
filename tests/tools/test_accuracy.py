"""``python -m tools.accuracy``: a reduced precision measured against fp32, teacher-forced."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.accuracy import main, measure
from tools.make_model import ModelShape, write_random_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("acc") / "m.pth", 7, ModelShape(2, 256, 1024), seed=5)


def test_int8_is_measured_close_to_fp32_and_not_equal(model: Path) -> None:
    """int8 against fp32: some error, small, and the greedy tokens mostly agree."""
    n = measure(model, "cpu int8", "cpu fp32", sequences=2, steps=6, prompt_tokens=4, seed=0)
    assert 1e-5 < n["mean_rel"] <= n["largest_rel"] < 0.1
    assert n["greedy_steps"] == 12 and n["greedy_agree"] >= 9


def test_a_strategy_against_itself_measures_nothing(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same strategy on both sides: zero error, every token agrees, and the line says so."""
    argv = [str(model), "--strategy", "cpu fp32", "--sequences", "2", "--steps", "3", "--prompt-tokens", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "0.00% mean relative error" in out and "agreed in 6 of 6" in out
