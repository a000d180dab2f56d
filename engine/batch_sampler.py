"""The batched sampler: :func:`engine.sampling.sample_token`'s rule for every row of a batch,
on the device, with counter-based random numbers.

The cut of each row is found among its top few probabilities (a top-k, not a sort of the whole
vocabulary); the draw is an exponential race over the kept tokens, whose random numbers are
splitmix64 of the row's key (seed, token index) and the position: the same key and the same
logits give the same token whatever else is in the batch, and no generator state is kept. A row
whose cut lies beyond the top 1024 falls back to ``sample_token`` with the row's generator.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from engine import native
from engine.gpu import to_device
from engine.sampling import SamplingParams, sample_token

TOPK_STAGES = (64, 1024)  # where the top-p cut is looked for before falling back to a full sort


class DrawSeed:
    """A generation's seed: it keys the batched draw; its generator serves the rare
    full-vocabulary fallback."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed % (1 << 63) if seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)


def sample_batch(
    shaped: torch.Tensor,
    sampling: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    keys: Sequence[tuple[int, int]],
) -> list[int]:
    """:func:`engine.sampling.sample_token` for every row of ``shaped`` [R, vocab], batched.

    The rule is the same: greedy when ``top_p`` or the temperature is 0; otherwise keep the tokens
    at or above the probability where the sorted cumulative sum first reaches ``top_p``, then
    ``top_k``, then the temperature, and draw. The cut is found among the top few probabilities
    (a top-k, not a sort of the whole vocabulary), on the device for the whole batch, falling
    back to ``sample_token`` (with the row's generator) when it is not there. The draw is an
    exponential race over the kept tokens, which picks each with its probability; its random
    numbers are a hash of the row's key (seed, token index), so the same key and the same logits
    give the same token whatever else is in the batch (on a GPU the batch size can move the last
    bits of the logits; and these are not the reference engine's tokens, which races the whole
    vocabulary). The tokens come back to the host in one transfer, the step's one wait.
    """
    count, vocab = shaped.shape
    device = shaped.device
    tokens = [0] * count
    greedy = [i for i, s in enumerate(sampling) if s.top_p <= 0 or s.temperature <= 0]
    drawn = [i for i, s in enumerate(sampling) if not (s.top_p <= 0 or s.temperature <= 0)]
    parts: list[torch.Tensor] = []
    if greedy:
        rows = shaped if len(greedy) == count else shaped.index_select(0, _rows(greedy, device))
        parts.append(_argmax(rows))
    if drawn:
        probs = torch.softmax(shaped if not greedy else shaped.index_select(0, _rows(drawn, device)), dim=-1)
        params = _RowParams([sampling[i] for i in drawn], [keys[i] for i in drawn], device)
        picks, undecided = _draw(probs, params, TOPK_STAGES[0], stage=0)
        parts += [picks, undecided.long()]
    fetched = torch.cat(parts).tolist() if parts else []  # the step's one wait for the device
    for i, token in zip(greedy, fetched, strict=False):
        tokens[i] = int(token)
    if not drawn:
        return tokens

    def settle(rows: list[int], picks: list[int], undecided: list[int]) -> list[int]:
        """Take the decided rows' tokens; returns the rows (of ``probs``) still undecided."""
        for row, token, open_ in zip(rows, picks, undecided, strict=True):
            if not open_:
                tokens[drawn[row]] = int(token)
        return [row for row, open_ in zip(rows, undecided, strict=True) if open_]

    n = len(greedy) + len(drawn)
    pending = settle(list(range(len(drawn))), fetched[len(greedy) : n], fetched[n:])
    for stage, top in enumerate(TOPK_STAGES[1:], start=1):  # rare: a flat distribution
        if not pending or TOPK_STAGES[stage - 1] >= vocab:
            break
        picks, undecided = _draw(
            probs.index_select(0, _rows(pending, device)), params.take(pending), top, stage
        )
        pending = settle(pending, picks.tolist(), undecided.long().tolist())
    for row in pending:
        i, s = drawn[row], sampling[drawn[row]]
        tokens[i] = sample_token(shaped[i], s.temperature, s.top_p, s.top_k, generators[i])
    return tokens


def _topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` of each row (values, ids), highest first: on the CPU by the C step's library
    where it is at hand (:func:`engine.native.topk`, a pass over each row), else torch's."""
    fast = native.topk(x, k)  # None off the CPU, without the library, or on a NaN
    if fast is not None:
        return fast
    values, ids = torch.topk(x, k, dim=-1)
    return values, ids


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Each row's first largest value's id (``torch.argmax``), by :func:`_topk`'s pass on the CPU."""
    fast = native.topk(x, 1)
    return fast[1].flatten() if fast is not None else x.argmax(dim=-1)


def _rows(rows: list[int], device: torch.device) -> torch.Tensor:
    """Row numbers as an index on the device (a Python list as an index would wait for it)."""
    return to_device(torch.tensor(rows, dtype=torch.long), device)


class _RowParams:
    """The sampling settings and draw keys of a batch's rows, as device tensors [R, 1]."""

    def __init__(
        self, sampling: Sequence[SamplingParams], keys: Sequence[tuple[int, int]], device: torch.device
    ) -> None:
        self.sampling = list(sampling)
        self.keys = list(keys)
        floats = torch.tensor([[s.top_p, 1.0 / s.temperature] for s in sampling], dtype=torch.float32)
        whole = torch.tensor([[s.top_k, _row_key(*key)] for s, key in zip(sampling, keys, strict=True)])
        floats, whole = to_device(floats, device), to_device(whole, device)  # two, without waiting
        self.top_p, self.inv_temperature = floats[:, :1].contiguous(), floats[:, 1:].contiguous()
        self.top_k, self.row_keys = whole[:, :1].contiguous(), whole[:, 1:].contiguous()
        self.plain = all(s.temperature == 1.0 for s in sampling)

    def take(self, rows: Sequence[int]) -> _RowParams:
        return _RowParams([self.sampling[r] for r in rows], [self.keys[r] for r in rows], self.top_p.device)


def _draw(probs: torch.Tensor, params: _RowParams, top: int, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One stage of the batched draw: the picked token of each row and whether the row's cut lay
    beyond the top ``top`` probabilities (undecided), both on the device."""
    vocab = probs.shape[-1]
    values, ids = _topk(probs, min(top, vocab))
    weights, undecided = _nucleus(values, params, vocab)
    race = _exponentials(params.row_keys, stage, values.shape[-1])
    picks = ids.gather(1, torch.argmax(weights.double() / race, dim=-1, keepdim=True)).flatten()
    return picks, undecided


def _nucleus(values: torch.Tensor, params: _RowParams, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``sample_token`` keeps from each row's top probabilities (descending): the weights
    (the probabilities after the temperature, 0 for the others) [R, k], and whether the top k
    did not decide the row [R] (then the caller looks further)."""
    rows, k = values.shape
    partial = k < vocab
    cumulative = torch.cumsum(values, dim=-1)
    cut = torch.searchsorted(cumulative, params.top_p.to(values.dtype))  # where the sum reaches top_p
    undecided = (cut >= k).flatten() if partial else torch.zeros(rows, dtype=torch.bool, device=values.device)
    cutoff = values.gather(1, cut.clamp_max(k - 1))
    if partial:  # ties with the cut may continue past the top k
        undecided |= (values[:, -1:] >= cutoff).flatten()
    keep = values >= cutoff
    top_k = params.top_k
    # a top_k at or above the kept count removes nothing: it does not apply
    applies = (top_k > 0) & (top_k < vocab) & (top_k <= keep.sum(dim=-1, keepdim=True))
    kth = values.gather(1, (top_k - 1).clamp(0, k - 1))
    keep &= ~applies | (values >= kth)
    weights = torch.where(keep, values, torch.zeros_like(values))
    if not params.plain:
        weights = torch.where(params.inv_temperature == 1.0, weights, weights**params.inv_temperature)
    total = weights.sum(dim=-1)
    undecided |= ~torch.isfinite(total) | (total <= 0)
    return weights, undecided


_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's constants
_MIX_1 = 0xBF58476D1CE4E5B9
_MIX_2 = 0x94D049BB133111EB


def _splitmix(z: int) -> int:
    """splitmix64's finaliser on a Python integer (64 bits)."""
    z &= _MASK
    z = ((z ^ (z >> 30)) * _MIX_1) & _MASK
    z = ((z ^ (z >> 27)) * _MIX_2) & _MASK
    return z ^ (z >> 31)


def _row_key(seed: int, index: int) -> int:
    """A row's 64-bit draw key from its seed and token index, as a signed int64 value."""
    return _signed(_splitmix(seed ^ _splitmix(index * _GOLDEN)))


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 value with those bits."""
    return value - (1 << 64) if value >> 63 else value


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping products; logical shifts made from
    arithmetic ones)."""
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _signed(_MIX_1)
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _signed(_MIX_2)
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def _exponentials(row_keys: torch.Tensor, stage: int, k: int) -> torch.Tensor:
    """Standard exponential variates [R, k] (float64), a pure function of each row's key, the
    stage and the position: counter-based, so no generator state is kept."""
    position = torch.arange(1, k + 1, dtype=torch.long, device=row_keys.device) + stage * k
    bits = _mix(row_keys + position * _signed(_GOLDEN))
    uniform = (((bits >> 11) & ((1 << 53) - 1)).double() + 0.5) * 2.0**-53  # in (0, 1)
    return -torch.log(uniform)


def nucleus(
    values: torch.Tensor, ids: torch.Tensor, s: SamplingParams, vocab: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The tokens ``sample_token`` may pick and their weights, for one row (see :func:`_nucleus`);
    None when the top ``len(values)`` do not decide it."""
    weights, undecided = _nucleus(values.unsqueeze(0), _RowParams([s], [(0, 0)], values.device), vocab)
    if bool(undecided[0]):
        return None
    keep = weights[0] > 0
    return ids[keep], weights[0][keep]
