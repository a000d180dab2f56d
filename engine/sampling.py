"""Sampling policy of the reference chat, as pure functions over one sequence's logits.

- penalties: before each token, every id seen in this reply loses ``presence + count*frequency``;
  after sampling, all counts decay by ``penalty_decay`` and the new token's count grows by one.
- top-p: keep the tokens at or above the probability where the sorted cumulative sum first reaches
  ``top_p``; raise to ``1/temperature``; renormalise; sample. ``top_p == 0`` is greedy.
- newline shaping of chat replies by the index of the token being generated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

BANNED = -1e9  # the reference's "-999999999": a logit no token comes back from

TEMPERATURE_RANGE = (0.2, 5.0)
TOP_P_RANGE = (0.0, 1.0)
PENALTY_RANGE = (0.0, 2.0)
# What a preset, a channel setting or a message may set, inclusive (the decay must stay above 0).
SAMPLING_RANGES: dict[str, tuple[float, float]] = {
    "temperature": TEMPERATURE_RANGE,
    "top_p": TOP_P_RANGE,
    "presence_penalty": PENALTY_RANGE,
    "frequency_penalty": PENALTY_RANGE,
    "penalty_decay": (1e-6, 1.0),
}
CHAT_LEN_SHORT = 40  # newlines are discouraged before this many reply tokens
CHAT_LEN_LONG = 150  # and pushed for after this many, so the reply ends


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens: the knobs of the reference sampler."""

    temperature: float = 1.0
    top_p: float = 0.3
    presence_penalty: float = 0.5
    frequency_penalty: float = 0.5
    penalty_decay: float = 0.996
    top_k: int = 0  # 0 = off

    def as_dict(self) -> dict[str, float]:
        """The values, for logs and JSON output."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "penalty_decay": self.penalty_decay,
            "top_k": self.top_k,
        }


class PenaltyTracker:
    """Occurrence counts of the tokens of one reply, decayed per token as in the reference.

    The counts are float64 arrays in first-seen order (the reference keeps a dict of Python
    floats: the same numbers, since both multiply IEEE doubles), so that decaying them costs one
    vectorised multiply per token instead of a Python loop over every token seen.
    """

    def __init__(self, presence: float, frequency: float, decay: float) -> None:
        self.presence = presence
        self.frequency = frequency
        self.decay = decay
        self._ids = np.zeros(32, dtype=np.int64)
        self._counts = np.zeros(32, dtype=np.float64)
        self._size = 0
        self._position: dict[int, int] = {}

    @property
    def ids(self) -> npt.NDArray[np.int64]:
        """The ids seen, in first-seen order (a view: copy it to keep it)."""
        return self._ids[: self._size]

    @property
    def values(self) -> npt.NDArray[np.float64]:
        """Their decayed counts, in the same order (a view)."""
        return self._counts[: self._size]

    @property
    def counts(self) -> dict[int, float]:
        """The counts by id."""
        return dict(zip(self.ids.tolist(), self.values.tolist(), strict=True))

    def __len__(self) -> int:
        return self._size

    def apply(self, logits: torch.Tensor) -> None:
        """Lower, in place, the logit of every token seen so far."""
        if not self._size:
            return
        ids = torch.from_numpy(self.ids.copy()).to(logits.device)
        counts = torch.from_numpy(self.values.copy()).to(device=logits.device, dtype=logits.dtype)
        logits[ids] -= self.presence + counts * self.frequency

    def add(self, token: int) -> None:
        """Record a sampled token: decay every count, then count the new one."""
        size = self._size
        self._counts[:size] *= self.decay
        position = self._position.get(token)
        if position is not None:
            self._counts[position] += 1.0
            return
        if size == len(self._ids):
            self._ids = np.concatenate((self._ids, np.zeros(size, dtype=np.int64)))
            self._counts = np.concatenate((self._counts, np.zeros(size, dtype=np.float64)))
        self._ids[size] = token
        self._counts[size] = 1.0
        self._position[token] = size
        self._size = size + 1


def chat_newline_bias(index: int) -> float:
    """Bias added to the newline logit for the ``index``-th token of a chat reply (from 0)."""
    if index <= 0:
        return BANNED
    if index <= CHAT_LEN_SHORT:
        return (index - CHAT_LEN_SHORT) / 10
    if index <= CHAT_LEN_LONG:
        return 0.0
    return min(3.0, (index - CHAT_LEN_LONG) * 0.25)


def sample_token(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> int:
    """Pick one token id from a 1-D tensor of logits (already penalised and shaped)."""
    if top_p <= 0 or temperature <= 0:
        return int(torch.argmax(logits).item())
    # Sampled on the CPU, as the reference does: the seeded generator lives there, and the same
    # --seed gives the same tokens whatever device the model runs on.
    probs = torch.softmax(logits.detach().float().cpu(), dim=-1)
    sorted_probs = torch.sort(probs, descending=True).values
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    # First place where the cumulative sum reaches top_p; when rounding keeps the sum below 1,
    # top_p = 1 keeps everything (the reference's argmax over all-False would turn it greedy).
    cut = int(torch.searchsorted(cumulative, torch.tensor([top_p], device=probs.device)).item())
    cutoff = sorted_probs[min(cut, sorted_probs.numel() - 1)]
    probs = torch.where(probs < cutoff, torch.zeros_like(probs), probs)
    if 0 < top_k < probs.numel():
        kth = torch.topk(probs, top_k).values[-1]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if temperature != 1.0:
        probs = probs ** (1.0 / temperature)
    total = probs.sum()
    if not torch.isfinite(total) or total <= 0:
        return int(torch.argmax(logits).item())
    return int(torch.multinomial(probs / total, 1, generator=generator).item())
