"""What the runner needs of a model family: its shape, its state layout, and three steps.

A model file (``engine/models/rwkv7.py``) holds the math of one RWKV version and nothing else:
the runner owns the slots that hold the sequences' states, the CUDA graphs and the batching, and
hands the model each layer's state of a batch through :class:`LayerStates`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch


@dataclass(frozen=True)
class StateTensor:
    """One tensor of a sequence's state, in every layer: a snapshot holds one per layer, in the
    order of the model's :meth:`BatchedModel.state_layout`."""

    name: str
    shape: tuple[int, ...]  # of one sequence in one layer, as a snapshot holds it
    dtype: torch.dtype
    transposed: bool = False  # the slots keep its last two dimensions swapped (a kernel's layout)


class LayerStates(Protocol):
    """A batch's states, layer by layer (in place on the slots, or gathered and put back)."""

    def read(self, layer: int) -> list[torch.Tensor]:
        """The layer's state tensors of the batch, each ``[B, *shape]`` in the slots' layout."""

    def write(self, layer: int, values: list[torch.Tensor]) -> None:
        """Store the layer's new state tensors (those :meth:`read` gave may have been updated in
        place: they are stored as they are)."""


class BatchedModel(ABC):
    """The math of one RWKV family, for a batch of sequences; subclasses register in
    :mod:`engine.models`."""

    family: ClassVar[int]  # the major version it runs: 7 for RWKV-7
    device: torch.device
    dtype: torch.dtype
    n_layer: int
    n_embd: int
    n_head: int
    head_size: int
    vocab_size: int

    @abstractmethod
    def __init__(
        self,
        weights: Mapping[str, torch.Tensor],
        *,
        device: torch.device,
        dtype: torch.dtype,
        batch_hint: int,
        use_fla: bool | None,
        int8: bool = False,
    ) -> None:
        """Take the weights of a ``.pth`` file onto ``device`` in ``dtype`` (``batch_hint``: the
        usual batch size, for kernels that prepare for one; ``use_fla``: False turns fused
        kernels off, None uses them when they pass their self-check; ``int8``: the large matrix
        products in int8, on the CPU in float32)."""

    @abstractmethod
    def state_layout(self) -> list[StateTensor]:
        """The state tensors of one layer, in snapshot order."""

    @abstractmethod
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, T]`` (or ``[B]``) to inputs ``[B, T, C]`` (or ``[B, C]``)."""

    @abstractmethod
    def forward(self, x: torch.Tensor, states: LayerStates, *, prompt: bool = False) -> torch.Tensor:
        """Run every layer on ``x`` ``[B, T, C]``, updating ``states``; returns the hidden state of
        the last position ``[B, C]``. ``prompt``: a prompt chunk rather than a decode step."""

    @abstractmethod
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[B, vocab]`` of hidden states ``[B, C]``."""

    @property
    @abstractmethod
    def fused_recurrence(self) -> bool:
        """Whether a fused kernel runs the recurrence (else the plain path, token by token)."""

    @property
    def fused_available(self) -> bool:
        """Whether a fused kernel loaded (and passed its own self-check); none by default."""
        return False

    def set_fused(self, on: bool) -> None:
        """Run the recurrence with the fused kernel (when one loaded) or with the plain path."""
        del on  # a family without a fused kernel always runs the plain path

    @abstractmethod
    def kernels(self) -> list[str]:
        """The optional fast paths in use, for logs."""
