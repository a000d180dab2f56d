"""The sampler and penalty rules of the reference, as pure functions."""

from __future__ import annotations

import random

import pytest
import torch

from engine.sampling import BANNED, PenaltyTracker, chat_newline_bias, sample_token


@pytest.mark.parametrize(
    ("index", "bias"),
    [
        (0, BANNED),
        (1, -3.9),
        (20, -2.0),
        (40, 0.0),
        (41, 0.0),
        (150, 0.0),
        (151, 0.25),
        (154, 1.0),
        (162, 3.0),
        (999, 3.0),
    ],
)
def test_chat_newline_bias(index: int, bias: float) -> None:
    """Newline shaping by reply position: banned, discouraged, neutral, then pushed."""
    assert chat_newline_bias(index) == pytest.approx(bias)


def test_penalties_follow_presence_frequency_and_decay() -> None:
    """Seen tokens lose presence + count*frequency; counts decay before each new count."""
    tracker = PenaltyTracker(presence=0.5, frequency=0.25, decay=0.5)
    tracker.add(3)
    tracker.add(3)
    tracker.add(5)
    assert tracker.counts == {3: pytest.approx(0.5 * 0.5 + 0.5), 5: 1.0}
    logits = torch.zeros(8)
    tracker.apply(logits)
    assert logits[3].item() == pytest.approx(-(0.5 + 0.75 * 0.25))
    assert logits[5].item() == pytest.approx(-(0.5 + 0.25))
    assert logits[0].item() == 0.0


def test_penalty_counts_are_the_reference_numbers_bit_for_bit() -> None:
    """Over a long reply with repeats and more ids than the first allocation, the counts equal
    the reference's dict of Python floats exactly, and so do the lowered logits."""
    rng = random.Random(11)
    tracker = PenaltyTracker(presence=0.4, frequency=0.6, decay=0.996)
    reference: dict[int, float] = {}
    for _ in range(3000):
        token = rng.choice(range(200)) if rng.random() < 0.7 else rng.choice(range(8))
        tracker.add(token)
        for key in reference:
            reference[key] *= 0.996
        reference[token] = reference.get(token, 0.0) + 1.0
    assert len(tracker) == len(reference) > 32
    assert tracker.counts == reference  # exact: same keys, same floats, same order
    assert list(tracker.counts) == list(reference)
    logits = torch.randn(256, generator=torch.Generator().manual_seed(2))
    expected = logits.clone()
    ids = torch.tensor(list(reference))
    expected[ids] -= 0.4 + torch.tensor(list(reference.values()), dtype=torch.float32) * 0.6
    tracker.apply(logits)
    assert torch.equal(logits, expected)


def test_top_p_zero_is_greedy() -> None:
    """top_p = 0 always picks the largest logit."""
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    assert all(sample_token(logits, 1.0, 0.0) == 1 for _ in range(20))


def test_top_p_keeps_only_the_nucleus() -> None:
    """Only tokens inside the top_p mass are ever sampled."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    generator = torch.Generator().manual_seed(0)
    picked = {sample_token(logits, 1.0, 0.7, generator=generator) for _ in range(300)}
    assert picked == {0, 1}


def test_top_p_one_keeps_everything_despite_rounding() -> None:
    """top_p = 1 samples all tokens (the reference's cumsum can fall short of 1 and go greedy)."""
    logits = torch.zeros(1000)
    generator = torch.Generator().manual_seed(1)
    picked = {sample_token(logits, 1.0, 1.0, generator=generator) for _ in range(500)}
    assert len(picked) > 300


def test_temperature_sharpens_and_flattens() -> None:
    """Low temperature concentrates on the top token; high temperature spreads out."""
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5])
    generator = torch.Generator().manual_seed(2)
    cold = [sample_token(logits, 0.2, 1.0, generator=generator) for _ in range(300)]
    hot = [sample_token(logits, 5.0, 1.0, generator=generator) for _ in range(300)]
    assert cold.count(0) > 250
    assert hot.count(0) < 150


def test_seeded_sampling_is_reproducible() -> None:
    """The same seed gives the same tokens."""
    logits = torch.randn(500, generator=torch.Generator().manual_seed(3))
    first = [sample_token(logits, 1.0, 0.9, generator=torch.Generator().manual_seed(7)) for _ in range(5)]
    second = [sample_token(logits, 1.0, 0.9, generator=torch.Generator().manual_seed(7)) for _ in range(5)]
    assert first == second
