"""The bench command runs both engines on a tiny model and writes its numbers as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.tokenizer import world_tokenizer
from tools.bench import _token_gaps, main
from tools.parity import fp32_limit


def test_bench_writes_the_expected_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both engines at two levels, with the ratio, memory and a passing logits parity."""
    out = tmp_path / "bench.json"
    argv = ["--layers", "1", "--embd", "64", "--concurrency", "1,3", "--tokens", "4"]
    status = main([*argv, "--prompt-tokens", "5", "--parity", "--graph-parity", "--json", str(out)])
    assert status == 0
    report = json.loads(out.read_text())
    assert report["concurrency"] == [1, 3] and report["tokens"] == 4 and report["model"]["random"]
    assert set(report["memory_mb"]) == {"reference", "batched"}
    assert report["parity"]["ok"]
    assert "graphs_rel_err" not in report["parity"]  # CUDA graphs: on a GPU only
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


def test_graph_parity_goes_with_parity(capsys: pytest.CaptureFixture[str]) -> None:
    """--graph-parity alone is a usage error, not silently ignored."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--graph-parity"])
    assert exit_info.value.code == 2
    assert "--graph-parity goes with --parity" in capsys.readouterr().err


def test_bench_with_a_small_vocabulary(tmp_path: Path) -> None:
    """--vocab writes a random model with that head, read by the World tokenizer in both engines."""
    out = tmp_path / "bench.json"
    argv = ["--layers", "1", "--embd", "64", "--vocab", "512", "--concurrency", "2", "--tokens", "3"]
    assert main([*argv, "--prompt-tokens", "4", "--parity", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "vocab 512" in report["model"]["description"] and report["parity"]["ok"]
    for name in ("reference", "batched"):
        assert report["results"][0][name]["generated_tokens"] > 0


@pytest.mark.parametrize(
    "extra", [["--vocab", "100"], ["--vocab", "70000"], ["--model", "x.pth", "--vocab", "512"]]
)
def test_bench_refuses_a_wrong_vocabulary(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """--vocab takes 256 to 65,536, and only for random models."""
    assert main(extra) == 2
    assert "--vocab" in capsys.readouterr().err


def test_token_gaps_share_a_piece_s_gap_among_its_tokens() -> None:
    """A piece that carries several tokens (text held back, or merged for a slow caller) spreads
    its gap over them; pieces the rule cannot explain fall back to one gap per piece."""
    tok = world_tokenizer()
    tokens = tok.encode("one two three four five")
    texts = [tok.decode([t]) for t in tokens]
    assert len(tokens) == 5 and "".join(texts) == "one two three four five"
    pieces = [texts[0], texts[1] + texts[2], texts[3] + texts[4]]
    gaps = _token_gaps([0.0, 1.0, 1.5], pieces, tokens, tok)
    assert gaps == pytest.approx([0.5, 0.5, 0.25, 0.25])
    assert _token_gaps([0.0, 1.0], ["one", " two!"], tokens, tok) == pytest.approx([1.0])


def test_greedy_means_no_penalties(tmp_path: Path) -> None:
    """--greedy: top-p 0 and neither penalty, as the report's sampling says."""
    out = tmp_path / "bench.json"
    argv = ["--layers", "1", "--embd", "64", "--concurrency", "1", "--tokens", "2", "--prompt-tokens", "3"]
    assert main([*argv, "--greedy", "--reference-max", "1", "--json", str(out)]) == 0
    sampling = json.loads(out.read_text())["sampling"]
    assert sampling["top_p"] == 0 and sampling["presence_penalty"] == 0 and sampling["frequency_penalty"] == 0


def test_the_fp32_parity_limit_grows_with_depth() -> None:
    """1e-5-class at a few layers; at 12 above the 4.3e-5 two correct fp32 implementations show."""
    assert fp32_limit(2) == fp32_limit(4) == pytest.approx(2e-5)
    assert 4.3e-5 < fp32_limit(12) < 1e-4 and fp32_limit(24) > fp32_limit(12)
