"""The bench command runs both engines on a tiny model and writes its numbers as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import native
from engine.errors import EngineError
from engine.strategy import Resolved, resolve_strategy
from engine.tokenizer import world_tokenizer
from tools import bench, parity
from tools.bench import _token_gaps, main
from tools.parity import CPU_BF16_LIMIT, INT8_LIMIT, fp32_limit


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
    # a shallow model: the package agrees with itself far within the limit, which then decides
    assert report["parity"]["reference_self_rel_err"] < 1e-5
    assert report["parity"]["prefill_limit"] == report["parity"]["limit"]
    assert "graphs_rel_err" not in report["parity"]  # CUDA graphs: on a GPU only
    keys = {"decode_tokens_per_s", "prefill_tokens_per_s", "ttft_ms_p50", "step_ms_p50", "step_ms_p99"}
    for row in report["results"]:
        assert row["ratio"] > 0
        for name in ("reference", "batched"):
            assert keys <= set(row[name]) and row[name]["decode_tokens_per_s"] > 0
            assert 0 < row[name]["generated_tokens"] <= 4 * row["concurrency"]
    table = capsys.readouterr().out
    assert "ratio" in table and "decode tok/s" in table


def test_bench_runs_int8_against_the_reference_in_fp32(tmp_path: Path) -> None:
    """'cpu int8' is measured against the rwkv package in fp32, and its parity is held to the
    int8 limit."""
    out = tmp_path / "bench.json"
    argv = ["--layers", "1", "--embd", "64", "--concurrency", "1", "--tokens", "2", "--strategy", "cpu int8"]
    assert main([*argv, "--prompt-tokens", "3", "--parity", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["strategy"] == "cpu int8" and report["reference_strategy"] == "cpu fp32"
    parity = report["parity"]
    # the C step's int8 weights; fbgemm's int8 products where it cannot be built (no compiler)
    int8 = "int8 weights" if native.load().lib is not None else "int8 products"
    assert parity["limit"] == INT8_LIMIT and parity["ok"] and int8 in parity["kernels"]
    assert parity["decode_rel_err"] > fp32_limit(1)  # int8 is not fp32
    assert int8 in report["batched_engine"]


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


def test_bench_auto_reports_what_it_resolved_to(tmp_path: Path) -> None:
    """--strategy auto is resolved once: the report, the device and both engines use the result,
    and the request is kept beside it."""
    out = tmp_path / "bench.json"
    argv = ["--layers", "1", "--embd", "64", "--concurrency", "1", "--tokens", "2", "--prompt-tokens", "3"]
    assert main([*argv, "--strategy", "auto", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    want = resolve_strategy("auto")
    assert report["strategy"] == want.strategy != "auto"
    assert report["requested_strategy"] == "auto" and report["strategy_reason"] == want.reason
    assert report["device"].startswith(want.strategy.split()[0])
    assert f"({want.strategy}, batched engine" in report["batched_engine"]


def test_bench_auto_writes_the_model_in_the_resolved_precision(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An ``auto`` that resolves to fp16 writes the random model in fp16, as 'cuda fp16' does."""
    monkeypatch.setattr(bench, "resolve_strategy", lambda s: Resolved("cuda fp16", "a CUDA GPU is there"))
    written: list[torch.dtype] = []

    def write(*args: object, dtype: torch.dtype, **kwargs: object) -> Path:
        written.append(dtype)
        raise EngineError("stop here")

    monkeypatch.setattr(bench, "write_random_model", write)
    assert main(["--layers", "1", "--embd", "64", "--strategy", "auto"]) == 2
    assert written == [torch.float16]
    assert "stop here" in capsys.readouterr().err


def test_the_parity_limit_prints_with_its_digits(capsys: pytest.CaptureFixture[str]) -> None:
    """0.25 prints as 0.25, not 2e-01; int8 shows the unjudged short-prompt error beside it."""
    m = {"decode_tokens_per_s": 1.0, "prefill_tokens_per_s": 1.0, "ttft_ms_p50": 1.0, "step_ms_p50": 1.0}
    m = {**m, "step_ms_p99": 1.0, "measured": True}
    parity = {"decode_rel_err": 0.05, "prefill_rel_err": 0.2, "limit": 0.25, "ok": True, "kernels": "k"}
    parity |= {"short_prefill_rel_err": 0.7, "short_prefill_tokens": 2, "prefill_tokens": 8}
    parity |= {"reference_self_rel_err": 0.01, "prefill_limit": 0.3}
    report = {
        "sampling": {"top_p": 0.0},
        "model": {"description": "d", "random": True, "path": "p"},
        "strategy": "cpu int8",
        "requested_strategy": "cpu int8",
        "device": "cpu",
        "prompt_tokens": 3,
        "tokens": 2,
        "results": [{"concurrency": 1, "reference": m, "batched": m, "ratio": 1.0}],
        "memory_kind": "rss",
        "memory_mb": {"reference": 1.0, "batched": 1.0},
        "parity": parity,
    }
    bench._print_table(report)
    table = capsys.readouterr().out
    assert "decode 5.00e-02 (limit 0.25), prefill 2.00e-01 (limit 0.3: the package differs" in table
    assert "from itself by 1.00e-02): ok" in table
    assert "prompts of 8+ tokens; after 2 tokens from a blank state 7.00e-01 (not judged" in table


@pytest.mark.slow
def test_int8_parity_at_the_0_1b_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The review's command: 'cpu int8' at L12 D768 with the World vocabulary passes --parity
    (measured: decode 0.049, prefill 0.22 over 8+ tokens, 0.72 after 2 tokens, unjudged)."""
    out = tmp_path / "bench.json"
    argv = ["--layers", "12", "--embd", "768", "--concurrency", "1", "--tokens", "2", "--prompt-tokens", "3"]
    assert main([*argv, "--strategy", "cpu int8", "--parity", "--json", str(out)]) == 0
    parity = json.loads(out.read_text())["parity"]
    assert parity["ok"] and parity["limit"] == INT8_LIMIT
    assert parity["prefill_tokens"] >= 8 and parity["short_prefill_tokens"] == 2
    assert 0.01 < parity["decode_rel_err"] < INT8_LIMIT and 0.01 < parity["prefill_rel_err"] < INT8_LIMIT
    if native.load().lib is not None:
        assert "C step" in parity["kernels"] and "int8 weights" in parity["kernels"]
    else:
        assert "int8 products (fbgemm, 73 of 73 matrices" in parity["kernels"]
    printed = capsys.readouterr().out
    assert f"(limit {INT8_LIMIT:.2g}:" in printed and "): ok [" in printed


def test_bf16_on_the_c_step_passes_parity_against_the_packages_bf16(tmp_path: Path) -> None:
    """'cpu bf16' on the C step (float32 arithmetic on bf16 weights) is held to CPU_BF16_LIMIT
    against the package's bf16, and passes it (measured: decode 1.1e-2, prefill 2.1e-2, which the
    16-bit limit of 2e-2 failed)."""
    if not native.load().bf16:
        pytest.skip("the C step has no AVX-512 BF16 here: 'cpu bf16' runs PyTorch, held to 2e-2")
    out = tmp_path / "bench.json"
    argv = ["--layers", "2", "--embd", "256", "--vocab", "1024", "--concurrency", "1", "--tokens", "2"]
    assert (
        main([*argv, "--prompt-tokens", "3", "--strategy", "cpu bf16", "--parity", "--json", str(out)]) == 0
    )
    parity = json.loads(out.read_text())["parity"]
    assert parity["ok"] and parity["limit"] == CPU_BF16_LIMIT
    assert "bf16 weights" in parity["kernels"]
    assert 1e-3 < parity["prefill_rel_err"] < CPU_BF16_LIMIT


@pytest.mark.parametrize(("self_err", "ok"), [(0.05, True), (0.0, False)])
def test_the_prefill_limit_is_at_least_three_times_the_packages_own_disagreement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, self_err: float, ok: bool
) -> None:
    """A prefill error of 0.1 passes where the package differs from itself by 0.05 (a deep random
    model: rounding grows chaotically over a prompt), and fails where it agrees with itself."""
    monkeypatch.setattr(parity, "_reference_self_error", lambda reference, prompts: self_err)
    monkeypatch.setattr(parity, "_prefill_error", lambda reference, model, prompts: 0.1)
    out = tmp_path / "bench.json"
    argv = ["--layers", "1", "--embd", "64", "--concurrency", "1", "--tokens", "2", "--prompt-tokens", "3"]
    assert main([*argv, "--parity", "--json", str(out)]) == (0 if ok else 1)
    report = json.loads(out.read_text())["parity"]
    assert report["ok"] is ok and report["reference_self_rel_err"] == self_err
    assert report["prefill_limit"] == pytest.approx(max(report["limit"], 3 * self_err))
    assert report["decode_rel_err"] < report["limit"]  # decode keeps the fp32 limit
