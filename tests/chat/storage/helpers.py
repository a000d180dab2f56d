"""Records the storage tests write."""

from __future__ import annotations

import torch

from chat.storage import NewRef, NewState, StateBase
from engine.state import Snapshot


def snapshot(value: float = 1.0, fingerprint: str = "fp") -> Snapshot:
    """A small whole state with a bfloat16 tensor (stored bit for bit)."""
    return Snapshot(
        [torch.full((4,), value), torch.full((2, 2), value, dtype=torch.bfloat16)],
        torch.arange(5, dtype=torch.float32),
        7,
        fingerprint,
        {"mode": "chat"},
    )


def logged(tokens: list[int], parent: int | NewRef | None = None, **kw: object) -> NewState:
    """A state of the token log: ``tokens`` fed to ``parent`` (to the blank state without one)."""
    return NewState(
        base=StateBase.PARENT if parent is not None else StateBase.ZERO,
        preset_key="preset:1",
        tokens=tokens,
        replay=len(tokens),
        fingerprint="fp",
        parent=parent,
        **kw,  # type: ignore[arg-type]
    )
