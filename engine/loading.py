"""Loading a model file as the right engine: the one place that chooses between them.

``engine="auto"`` runs a family the batched engine knows (:mod:`engine.models`) on it, many
sequences per forward pass, and older families on the ``rwkv`` package, one sequence at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from engine.batched_engine import BatchedEngine
from engine.devices import DeviceEngines
from engine.errors import EngineError
from engine.formats import inspect_model
from engine.inprocess import ReferenceEngine
from engine.interface import Engine
from engine.models import describe_families, has_family
from engine.strategy import resolve_strategy

EngineChoice = Literal["auto", "batched", "reference"]


def load_engine(
    path: Path,
    strategy: str,
    tokenizer: str = "auto",
    *,
    engine: EngineChoice = "auto",
    devices: Sequence[str] | None = None,
    max_batch: int = 32,
    max_resident: int | None = None,
) -> Engine:
    """Load ``path`` (seconds to minutes: call it off the event loop). ``devices``: GPUs for the
    batched engine, a model copy and a worker on each; the reference engine uses one device.
    ``strategy`` may be ``auto`` (:func:`engine.strategy.resolve_strategy`)."""
    choice = engine
    if choice == "auto":
        choice = "batched" if has_family(inspect_model(path).family) else "reference"
    if choice == "reference":
        if devices:
            raise EngineError(
                f"{path.name} runs on the reference engine, which uses one device: leave the device "
                f"list unset (the strategy names the device), or use a {describe_families()} model"
            )
        return ReferenceEngine.load(path, strategy, tokenizer)
    if devices:  # each device's strategy takes the resolved precision; the reason goes along
        resolved = resolve_strategy(strategy)
        return DeviceEngines.load(
            path,
            resolved.strategy,
            list(devices),
            tokenizer,
            reason=resolved.reason,
            max_batch=max_batch,
            max_resident=max_resident,
        )
    return BatchedEngine.load(path, strategy, tokenizer, max_batch=max_batch, max_resident=max_resident)
