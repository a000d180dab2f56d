"""Model sizes by name, without importing torch (the command line's ``--help`` lists them)."""

from __future__ import annotations

from dataclasses import dataclass

WORLD_VOCAB_SIZE = 65536  # the World tokenizer's vocabulary (RWKV-5 and later, G1)


@dataclass(frozen=True)
class ModelShape:
    """The size of a model: layers, width and vocabulary."""

    n_layer: int
    n_embd: int
    vocab_size: int = WORLD_VOCAB_SIZE


# Real RWKV-7 "Goose" G1 sizes (head size 64), for benchmarks at true shape.
NAMED_SHAPES: dict[str, ModelShape] = {
    "0.1B": ModelShape(12, 768),
    "0.4B": ModelShape(24, 1024),
    "1.5B": ModelShape(24, 2048),
    "2.9B": ModelShape(32, 2560),
    "7.2B": ModelShape(32, 4096),
}

SUPPORTED_VERSIONS = (4, 5, 6, 7)
