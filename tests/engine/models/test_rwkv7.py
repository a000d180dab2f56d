"""The batched RWKV-7 model gives the rwkv package's logits and states, for mixed batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine.errors import EngineError, StateMismatchError
from engine.formats import inspect_model
from engine.reference import load_reference_model
from engine.runner import ModelRunner
from engine.strategy import parse_strategy
from tools.make_model import ModelShape, write_random_model

LIMIT = 1e-5  # largest |difference| over the largest |value|, float32 on the CPU


@pytest.fixture(scope="module", params=[ModelShape(3, 128, 1000), ModelShape(2, 64, 500)], ids=["H2", "H1"])
def models(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, ModelRunner]:
    """The rwkv package's model and ours on one random RWKV-7 file (two heads, or one)."""
    path = write_random_model(tmp_path_factory.mktemp("batched") / "m.pth", 7, request.param, seed=5)
    reference = load_reference_model(inspect_model(path), "cpu fp32")
    return reference, ModelRunner.load(path, "cpu fp32", max_slots=6)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference relative to the largest value."""
    return float((got - want).abs().max() / want.abs().max())


def reference_state(reference: Any, prompt: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and state of the package after a prompt, from a blank state."""
    with torch.no_grad():
        logits, state = reference.forward(prompt, None)
    return logits.clone(), [t.clone() for t in state]


PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [40, 50], [9], [300, 301, 302, 303, 304]]


def test_decode_matches_the_package_for_a_mixed_batch(models: tuple[Any, ModelRunner]) -> None:
    """Sequences with different histories in scattered slots decode together, as each alone."""
    reference, model = models
    states = [reference_state(reference, p)[1] for p in PROMPTS]
    slots = [4, 0, 2, 5]
    for slot, state in zip(slots, states, strict=True):
        model.load_slot(slot, state)
    for step in range(4):
        tokens = [17 * step + 3 * i + 1 for i in range(len(slots))]
        got = model.decode(slots, tokens)
        assert got.shape == (len(slots), model.vocab_size) and got.dtype == torch.float32
        for row, token in enumerate(tokens):
            with torch.no_grad():
                want, states[row] = reference.forward([token], states[row])
            assert rel(got[row], want) < LIMIT
    for slot, state in zip(slots, states, strict=True):
        for ours, theirs in zip(model.export_slot(slot), state, strict=True):
            assert rel(ours, theirs) < LIMIT


def test_decode_in_place_on_consecutive_slots(models: tuple[Any, ModelRunner]) -> None:
    """A batch of consecutive slots (the in-place path) matches too, and leaves other slots alone."""
    reference, model = models
    states = [reference_state(reference, p)[1] for p in PROMPTS[:3]]
    for slot, state in enumerate(states):
        model.load_slot(slot, state)
    model.zero_slot(3)
    for step in range(3):
        got = model.decode([0, 1, 2], [5 + step, 6, 7])
        for row, token in enumerate([5 + step, 6, 7]):
            with torch.no_grad():
                want, states[row] = reference.forward([token], states[row])
            assert rel(got[row], want) < LIMIT
    assert all(float(t.abs().max()) == 0.0 for t in model.export_slot(3))


def test_graph_plan_pads_in_place_onto_free_slots_only(models: tuple[Any, ModelRunner]) -> None:
    """A CUDA graph's step works in place only on the slots 0..n-1 with free slots up to its bucket."""
    _, model = models
    for slot in range(model.max_slots):
        model.zero_slot(slot)
    assert model.live_slots == list(range(6))
    assert model.graph_plan([0, 1, 2, 3]) == (4, True)  # no padding
    assert model.graph_plan([0, 1, 2]) == (4, False)  # slot 3 holds a sequence
    model.release_slot(3)
    assert model.graph_plan([0, 1, 2]) == (4, True)
    assert model.graph_plan([1, 2]) == (2, False)  # not from slot 0
    assert model.graph_plan([2, 0, 1]) == (4, False)  # not in order
    model.release_slot(5)
    assert model.graph_plan([0, 1, 2, 3, 4]) == (6, True)  # the bucket is capped at the slots
    model.zero_slot(5)
    assert model.graph_plan([0, 1, 2, 3, 4]) == (6, False)


def test_the_in_place_graph_step_matches_and_touches_only_free_padding(
    models: tuple[Any, ModelRunner],
) -> None:
    """The step an in-place CUDA graph captures (``_decode_run``), run eagerly with a padding row:
    the batch's rows are the package's, the free padding slot is the only other slot written."""
    reference, model = models
    states = [reference_state(reference, p)[1] for p in PROMPTS[:3]]
    for slot, state in enumerate(states):
        model.load_slot(slot, state)
    model.release_slot(3)
    model.load_slot(4, reference_state(reference, PROMPTS[3])[1])
    model.zero_slot(5)
    assert model.graph_plan([0, 1, 2]) == (4, True)
    others = {slot: model.export_slot(slot) for slot in (4, 5)}
    for step in range(3):
        tokens = [5 + step, 6, 7]
        with torch.no_grad():
            got = model._decode_run(torch.tensor([*tokens, 0]))
        assert got.shape == (4, model.vocab_size)
        for row, token in enumerate(tokens):
            with torch.no_grad():
                want, states[row] = reference.forward([token], states[row])
            assert rel(got[row], want) < LIMIT
    for slot, state in enumerate(states):
        for ours, theirs in zip(model.export_slot(slot), state, strict=True):
            assert rel(ours, theirs) < LIMIT
    for slot, saved in others.items():
        assert all(torch.equal(a, b) for a, b in zip(model.export_slot(slot), saved, strict=True))
    assert any(float(t.abs().max()) > 0 for t in model.export_slot(3))  # the padding row ran there


def test_prefill_matches_the_package_in_chunks_and_batches(models: tuple[Any, ModelRunner]) -> None:
    """Prompts read in chunks, several sequences at once, end in the package's logits and state."""
    reference, model = models
    long_prompt = [(7 * i) % 400 + 1 for i in range(23)]
    want_logits, want_state = reference_state(reference, long_prompt)
    model.zero_slot(1)
    assert model.prefill([1], [long_prompt[:10]], logits=False) is None
    got = model.prefill([1], [long_prompt[10:]], logits=True)
    assert got is not None and rel(got[0], want_logits) < LIMIT
    for ours, theirs in zip(model.export_slot(1), want_state, strict=True):
        assert rel(ours, theirs) < LIMIT

    pair = [[11, 12, 13, 14], [200, 100, 50, 25]]
    for slot in (3, 0):
        model.zero_slot(slot)
    got = model.prefill([3, 0], pair, logits=True)
    assert got is not None
    for row, prompt in enumerate(pair):
        assert rel(got[row], reference_state(reference, prompt)[0]) < LIMIT


def test_snapshot_tensors_round_trip_exactly(models: tuple[Any, ModelRunner]) -> None:
    """A slot exported and loaded back is bit-identical, in the package's layout and dtypes."""
    reference, model = models
    _, state = reference_state(reference, PROMPTS[0])
    model.load_slot(2, state)
    exported = model.export_slot(2)
    assert [(t.shape, t.dtype) for t in exported] == [(t.shape, t.dtype) for t in state]
    assert all(torch.equal(a, b) for a, b in zip(exported, state, strict=True))
    model.load_slot(5, exported)
    assert all(torch.equal(a, b) for a, b in zip(model.export_slot(5), state, strict=True))


def test_a_state_of_another_shape_is_refused(models: tuple[Any, ModelRunner]) -> None:
    """Loading a state of the wrong length or shape raises StateMismatchError."""
    _, model = models
    state = model.export_slot(0)
    with pytest.raises(StateMismatchError):
        model.load_slot(0, state[:-3])
    with pytest.raises(StateMismatchError):
        model.load_slot(0, [t.reshape(-1)[:5] for t in state])


def test_only_rwkv7_and_known_strategies_load(model_dir: Path) -> None:
    """An RWKV-6 file and an unknown strategy are refused with a clear EngineError."""
    with pytest.raises(EngineError, match="RWKV-7 models only"):
        ModelRunner.load(model_dir / "v6.pth")
    with pytest.raises(EngineError, match="not supported"):
        parse_strategy("cpu fp16i8")
    with pytest.raises(EngineError):
        parse_strategy("tpu fp32")
    assert parse_strategy("cpu bf16") == (torch.device("cpu"), torch.bfloat16)
