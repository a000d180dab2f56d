"""The `rwkv-discord faq` command."""

from __future__ import annotations

import json
import subprocess
import sys
import time
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


def test_list_prints_every_topic(capsys: pytest.CaptureFixture[str]) -> None:
    """--list prints one "id: title" line per topic, in title order."""
    assert main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10
    assert "license: What license does RWKV use?" in lines
    titles = [line.split(": ", 1)[1] for line in lines]
    assert titles == sorted(titles, key=str.casefold)


def test_list_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    """--list --json prints one array of {topic, title}."""
    assert main(["--list", "--json"]) == 0
    topics = json.loads(capsys.readouterr().out)
    assert {"topic": "raccoon", "title": "What is Raccoon?"} in topics


def test_no_answer_names_the_closest_topics(capsys: pytest.CaptureFixture[str]) -> None:
    """Without an answer, the closest topics are listed under the miss."""
    assert main(["tell", "me", "about", "tokens"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["No FAQ entry matches 'tell me about tokens'.", "Closest topics:"]
    assert "- Why do model names include a context length like 4k or 8k? (context-length)" in lines


def test_tie_asks_did_you_mean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two topics that fit equally well are offered, in text and in JSON."""
    (tmp_path / "cats.md").write_text('+++\ntitle = "Cats and dogs"\nkeywords = ["cats"]\n+++\nA\n', "utf-8")
    (tmp_path / "dogs.md").write_text('+++\ntitle = "Dogs and cats"\nkeywords = ["dogs"]\n+++\nB\n', "utf-8")
    assert main(["--dir", str(tmp_path), "cats", "dogs"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "Did you mean one of these?"
    assert set(lines[2:]) == {"- Cats and dogs (cats)", "- Dogs and cats (dogs)"}
    assert main(["--dir", str(tmp_path), "--json", "cats", "dogs"]) == 1
    payload = json.loads(capsys.readouterr().out)
    assert payload["topic"] is None and payload["tied"] is True
    assert {s["topic"] for s in payload["suggestions"]} == {"cats", "dogs"}


def test_cold_start_is_fast_and_imports_no_torch() -> None:
    """`python -m faq.cli` answers from a cold interpreter without importing torch or discord."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "faq.cli", "what", "license", "is", "rwkv", "under"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("**What license does RWKV use?**")
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert not {name for name in imported if name.split(".")[0] in {"torch", "discord", "numpy"}}
    # Typically about 0.3 s; the bound leaves room for a busy machine.
    assert elapsed < 3.0
