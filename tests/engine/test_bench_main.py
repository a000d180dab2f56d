"""The bench command runs both engines on a tiny model and writes its numbers as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.bench import main


def test_bench_writes_the_expected_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both engines at two levels, with the ratio, memory and a passing logits parity."""
    out = tmp_path / "bench.json"
    argv = ["--layers", "1", "--embd", "64", "--concurrency", "1,3", "--tokens", "4"]
    status = main([*argv, "--prompt-tokens", "5", "--parity", "--json", str(out)])
    assert status == 0
    report = json.loads(out.read_text())
    assert report["concurrency"] == [1, 3] and report["tokens"] == 4 and report["model"]["random"]
    assert set(report["memory_mb"]) == {"reference", "batched"}
    assert report["parity"]["ok"]
    keys = {"decode_tokens_per_s", "prefill_tokens_per_s", "ttft_ms_p50", "step_ms_p50", "step_ms_p99"}
    for row in report["results"]:
        assert row["ratio"] > 0
        for name in ("reference", "batched"):
            assert keys <= set(row[name]) and row[name]["decode_tokens_per_s"] > 0
            assert 0 < row[name]["generated_tokens"] <= 4 * row["concurrency"]
    table = capsys.readouterr().out
    assert "ratio" in table and "decode tok/s" in table


def test_bench_refuses_bad_levels(capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed --concurrency is a usage error."""
    assert main(["--concurrency", "one"]) == 2
    assert "concurrency" in capsys.readouterr().err
