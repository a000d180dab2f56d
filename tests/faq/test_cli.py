"""The `rwkv-discord faq` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from faq.cli import main


def test_found_prints_answer_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """A question with a topic prints its answer."""
    assert main(["can", "I", "use", "it", "commercially?"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("**What license does RWKV use?**")
    assert "Apache 2.0" in out


def test_not_found_says_so_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    """A question without a topic says that no entry matches."""
    assert main(["how", "do", "I", "bake", "bread"]) == 1
    assert capsys.readouterr().out == "No FAQ entry matches 'how do I bake bread'.\n"


def test_json_found(capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints one object with the topic, title, confidence and answer."""
    assert main(["--json", "wat", "data", "was", "it", "trained", "on"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert set(payload) == {"topic", "title", "confidence", "answer", "tied", "suggestions"}
    assert payload["topic"] == "training-data"
    assert payload["title"] == "What data is RWKV trained on?"
    assert 0.5 < payload["confidence"] <= 1.0
    assert "The Pile" in payload["answer"]


def test_json_not_found(capsys: pytest.CaptureFixture[str]) -> None:
    """--json without a match has topic, title and answer null."""
    assert main(["--json", "what's the weather in Paris"]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    payload = json.loads(out)
    assert payload["topic"] is None and payload["title"] is None and payload["answer"] is None
    assert 0.0 <= payload["confidence"] < 0.55


def test_extra_dir_overrides_and_reports_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--dir adds an operator folder; its broken files are listed on stderr, one line each."""
    (tmp_path / "rules.md").write_text(
        '+++\ntitle = "Server rules"\nkeywords = ["server rules"]\n+++\nBe kind.\n', "utf-8"
    )
    (tmp_path / "bad.md").write_text("no front matter\n", "utf-8")
    assert main(["--dir", str(tmp_path), "--json", "server", "rules"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["topic"] == "rules"
    assert captured.err == f"{tmp_path / 'bad.md'}:1: must start with a '+++' line (TOML front matter)\n"


def test_missing_query_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """No query at all exits 2 with a usage message."""
    assert main([]) == 2
    assert "usage: rwkv-discord faq" in capsys.readouterr().err
