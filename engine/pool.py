"""Where the batched engine used to live: :class:`BatchedEngine` is in :mod:`engine.batched_engine`.

Kept so that ``from engine.pool import BatchedEngine`` goes on working until its importers move.
"""

from __future__ import annotations

from engine.batched_engine import BatchedEngine

__all__ = ["BatchedEngine"]
