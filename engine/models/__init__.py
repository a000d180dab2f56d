"""The model families the batched engine runs, by RWKV major version.

A new RWKV version is one new file here (a :class:`engine.models.base.BatchedModel` with the
math of that version) and one line in :data:`FAMILIES`. A family's module is imported when a
model of it is loaded; everything else (slots, CUDA graphs, scheduling, sampling, the stop rules)
is shared.
"""

from __future__ import annotations

import importlib

from engine.models.base import BatchedModel

# family -> (module in engine.models, class)
FAMILIES: dict[int, tuple[str, str]] = {
    7: ("rwkv7", "RWKV7"),
}


def has_family(family: int) -> bool:
    """Whether the batched engine runs models of this RWKV major version."""
    return family in FAMILIES


def describe_families() -> str:
    """The families the batched engine runs, for messages: ``RWKV-7``."""
    return " and ".join(f"RWKV-{family}" for family in sorted(FAMILIES))


def model_class(family: int) -> type[BatchedModel]:
    """The model class of a family (KeyError for one that is not registered)."""
    module, name = FAMILIES[family]
    found: type[BatchedModel] = getattr(importlib.import_module(f"engine.models.{module}"), name)
    return found
