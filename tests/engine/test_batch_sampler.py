"""The batched sampler applies sample_token's rule, row by row, with counter-based random numbers."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from engine.batch_sampler import TOPK_STAGES, _exponentials, _row_key, nucleus, sample_batch
from engine.sampling import SamplingParams, sample_token

VOCAB = 5000


CASES = [
    SamplingParams(temperature=1.0, top_p=0.3),
    SamplingParams(temperature=0.7, top_p=0.5),
    SamplingParams(temperature=1.5, top_p=0.9, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.95, top_k=40),
    SamplingParams(temperature=2.0, top_p=0.2, top_k=1),
]


@pytest.mark.parametrize("params", CASES)
@pytest.mark.parametrize("spread", [0.5, 3.0, 8.0])
def test_nucleus_is_the_reference_distribution(
    params: SamplingParams, spread: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tokens and weights kept equal what sample_token hands to torch.multinomial."""
    gen = torch.Generator().manual_seed(int(spread * 10) + params.top_k)
    captured: list[torch.Tensor] = []

    def multinomial(probs: torch.Tensor, n: int, generator: Any = None) -> torch.Tensor:
        captured.append(probs.clone())
        return torch.tensor([0])

    for _ in range(4):
        logits = torch.randn(VOCAB, generator=gen) * spread
        captured.clear()
        with monkeypatch.context() as patch:
            patch.setattr(torch, "multinomial", multinomial)
            sample_token(logits, params.temperature, params.top_p, params.top_k, gen)
        probs = torch.softmax(logits, dim=-1)
        found = None
        for k in (*TOPK_STAGES, VOCAB):
            values, ids = torch.topk(probs, min(k, VOCAB))
            found = nucleus(values, ids, params, VOCAB)
            if found is not None:
                break
        assert found is not None
        chosen, weights = found
        if not captured:  # sample_token went greedy (nothing above zero after the cut)
            continue
        want = captured[0]
        assert set(chosen.tolist()) == set(torch.nonzero(want).flatten().tolist())
        assert torch.allclose(weights / weights.sum(), want[chosen], rtol=1e-5, atol=1e-7)


def test_sample_batch_greedy_rows_are_argmax_and_seeds_replay() -> None:
    """Greedy rows take the argmax; a row draws the same tokens again for the same key (seed,
    token index), within its nucleus, whatever else is in the batch."""
    gen = torch.Generator().manual_seed(9)
    shaped = torch.randn(4, VOCAB, generator=gen) * 3
    shaped[1, :3] = 30.0  # three equal favourites: the nucleus of row 1 holds all three
    params = [
        SamplingParams(top_p=0.0),
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(top_p=1.0),
    ]

    def draw(seed: int) -> list[list[int]]:
        gens = [torch.Generator().manual_seed(seed + i) for i in range(4)]
        return [sample_batch(shaped, params, gens, [(seed + i, n) for i in range(4)]) for n in range(20)]

    first, again = draw(1), draw(1)
    assert first == again
    assert all(row[0] == int(shaped[0].argmax()) and row[2] == int(shaped[2].argmax()) for row in first)
    values, ids = torch.topk(torch.softmax(shaped[1], dim=-1), 64)
    found = nucleus(values, ids, params[1], VOCAB)
    assert found is not None
    assert {row[1] for row in first} <= set(found[0].tolist())
    assert {row[1] for row in first} == {0, 1, 2}  # the token index moves the draw on
    alone = [sample_batch(shaped[1:2], params[1:2], [torch.Generator()], [(2, n)]) for n in range(20)]
    assert [[row[1]] for row in first] == alone  # the same key alone in its batch: the same tokens
    # top_p = 1 keeps everything: that row is sample_token's own draw, same generator, same token
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    tokens = sample_batch(shaped[3:], params[3:], [gen_a], [(5, 0)])
    assert tokens == [sample_token(shaped[3], 1.0, 1.0, 0, gen_b)]


def test_the_draw_is_splitmix64() -> None:
    """The counter-based random numbers are splitmix64 (written out here on Python integers), so
    the int64 tensor arithmetic wraps as it should."""
    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z &= mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    seeds, index, stage, k = [3, (1 << 63) - 1, 123456789], 41, 1, 5
    keys = [_row_key(seed, index) for seed in seeds]
    got = _exponentials(torch.tensor([[key] for key in keys]), stage, k)
    for row, seed in enumerate(seeds):
        base = mix(seed ^ mix(index * 0x9E3779B97F4A7C15))
        assert keys[row] & mask == base
        for j in range(k):
            bits = mix(base + (stage * k + j + 1) * 0x9E3779B97F4A7C15)
            uniform = ((bits >> 11) + 0.5) * 2.0**-53
            assert got[row, j].item() == -math.log(uniform)


def test_the_draw_picks_each_kept_token_with_its_probability() -> None:
    """Over many keys, the batched draw's frequencies match the nucleus weights (a chi-square
    test at a 1e-4 false alarm rate, with the keys fixed so the outcome is too)."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -1.0, -3.0] + [-9.0] * (VOCAB - 6))
    params = SamplingParams(temperature=0.8, top_p=0.9)
    rows = 4000
    shaped = logits.repeat(rows, 1)
    tokens = sample_batch(shaped, [params] * rows, [torch.Generator()] * rows, [(77, n) for n in range(rows)])
    values, ids = torch.topk(torch.softmax(logits, dim=-1), 64)
    found = nucleus(values, ids, params, VOCAB)
    assert found is not None
    chosen, weights = found
    expected = (weights / weights.sum() * rows).tolist()
    counts = [tokens.count(int(t)) for t in chosen]
    assert sum(counts) == rows  # nothing outside the nucleus
    chi2 = sum((c - e) ** 2 / e for c, e in zip(counts, expected, strict=True))
    assert chi2 < 23.5, (counts, expected)  # df <= 5: P(chi2 > 23.5) < 1e-4


def test_rows_decided_further_down_keep_their_places() -> None:
    """A batch whose rows are decided at different stages: in the top 64, in the top 1024, or
    only by sample_token over everything (a flat row, ties past any top k); each row's token is
    its own rule's."""
    peaked = torch.full((VOCAB,), -5.0)
    peaked[7], peaked[9] = 6.0, 5.8
    slope = -torch.arange(VOCAB, dtype=torch.float32) * 1e-3  # top_p 0.3 needs a few hundred tokens
    flat = torch.zeros(VOCAB)
    greedy = torch.randn(VOCAB, generator=torch.Generator().manual_seed(4))
    shaped = torch.stack([greedy, flat, slope, peaked, slope])
    params = [SamplingParams(top_p=0.0)] + [SamplingParams(top_p=0.3)] * 4
    fallback_gen, again = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    gens = [torch.Generator(), fallback_gen, torch.Generator(), torch.Generator(), torch.Generator()]
    tokens = sample_batch(shaped, params, gens, [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0)])
    assert tokens.pop(0) == int(greedy.argmax())  # a greedy row first: the others' places shift
    assert tokens[0] == sample_token(flat, 1.0, 0.3, 0, again)  # the fallback, with the row's generator
    values, ids = torch.topk(torch.softmax(slope, dim=-1), 64)
    assert nucleus(values, ids, params[1], VOCAB) is None  # not decided in the top 64
    values, ids = torch.topk(torch.softmax(slope, dim=-1), 1024)
    found = nucleus(values, ids, params[1], VOCAB)
    assert found is not None and tokens[1] in found[0].tolist() and tokens[3] in found[0].tolist()
    assert tokens[2] in (7, 9)
