"""Greedy ``+gen`` through the whole chat path equals an independent loop over the rwkv package."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chat.session import ChatService
from engine.inprocess import ReferenceEngine
from tests.conftest import open_service

HERE = Path(__file__).parent


def reference_tokens(model: Path, version: int, prompt: str, count: int, service: ChatService) -> list[int]:
    """Token ids from tests/reference_loop.py, run in a fresh interpreter."""
    preset = service.presets[service.config.default_preset].sampling
    result = subprocess.run(
        [
            sys.executable,
            str(HERE / "reference_loop.py"),
            str(model),
            str(version),
            prompt,
            str(count),
            str(preset.presence_penalty),
            str(preset.frequency_penalty),
            str(preset.penalty_decay),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return list(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("version", [4, 5, 6, 7])
async def test_greedy_gen_matches_reference_loop(model_dir: Path, tmp_path: Path, version: int) -> None:
    """For each version, +gen with -top_p=0 yields the reference's greedy tokens with penalties."""
    model = model_dir / f"v{version}.pth"
    engine = ReferenceEngine.load(model)
    assert engine.spec.family == version
    service = await open_service(engine, tmp_path / "db.sqlite3", gen_max_tokens=30)
    try:
        outcome = await service.respond("c1", "+gen -top_p=0 The quick brown fox")
    finally:
        await service.store.close()
        await engine.close()
    assert outcome.kind == "generation"
    expected = reference_tokens(model, version, "\nThe quick brown fox", 30 + 100, service)
    # Ours stops at the first whole character at or after 30 tokens (or at end-of-text).
    assert len(outcome.tokens) >= min(30, len(expected))
    assert outcome.tokens == expected[: len(outcome.tokens)]
    assert len(set(outcome.tokens)) > 3, "a degenerate model would make this check weak"
