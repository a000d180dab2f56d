"""Random-weight RWKV models in the real key layout, for tests and benchmarks.

The files are ordinary ``.pth`` state dicts with the key names and shapes of the official
checkpoints, so the real loading code reads them; only the values are random (seeded).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from engine.shapes import NAMED_SHAPES, SUPPORTED_VERSIONS, ModelShape

__all__ = ["HEAD_SIZE", "NAMED_SHAPES", "SUPPORTED_VERSIONS", "ModelShape", "write_random_model"]


HEAD_SIZE = 64


def _lora_dim(n_embd: int, factor: float, power: float) -> int:
    """Low-rank sizes of RWKV-7, by the rule of the official training code (multiples of 32)."""
    return max(32, round(float(factor * n_embd**power) / 32) * 32)


def rwkv7_lora_dims(n_embd: int) -> tuple[int, int, int, int]:
    """(decay, a, v, gate) low-rank sizes for a width, e.g. 96/96/64/256 for 2048."""
    return (
        _lora_dim(n_embd, 1.8, 0.5),
        _lora_dim(n_embd, 1.8, 0.5),
        _lora_dim(n_embd, 1.3, 0.5),
        _lora_dim(n_embd, 0.6, 0.8),
    )


def head_count(n_embd: int) -> int:
    """Heads for a width: head size 64 where the width allows, else smaller heads of size 8+."""
    head_size = HEAD_SIZE if n_embd % HEAD_SIZE == 0 else math.gcd(n_embd, HEAD_SIZE)
    return max(1, n_embd // head_size)


class _Init:
    """Seeded random tensors scaled so that a forward pass stays well inside fp16 range."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * std

    def uniform(self, *shape: int, low: float, high: float) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen) * (high - low) + low

    def linear(self, out_dim: int, in_dim: int) -> torch.Tensor:
        return self.normal(out_dim, in_dim, std=1.0 / math.sqrt(in_dim))

    def mix(self, n_embd: int) -> torch.Tensor:
        return self.uniform(1, 1, n_embd, low=0.0, high=1.0)


def _common(init: _Init, shape: ModelShape) -> dict[str, torch.Tensor]:
    c, v = shape.n_embd, shape.vocab_size
    return {
        "emb.weight": init.normal(v, c, std=1.0),
        "blocks.0.ln0.weight": torch.ones(c),
        "blocks.0.ln0.bias": torch.zeros(c),
        "ln_out.weight": torch.ones(c),
        "ln_out.bias": torch.zeros(c),
        "head.weight": init.normal(v, c, std=3.0 / math.sqrt(c)),
    }


def _layer_norms(init: _Init, prefix: str, c: int, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in names:
        out[f"{prefix}{name}.weight"] = 1.0 + init.normal(c, std=0.1)
        out[f"{prefix}{name}.bias"] = init.normal(c, std=0.1)
    return out


def _block_v4(init: _Init, i: int, c: int) -> dict[str, torch.Tensor]:
    a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
    ffn_dim = 4 * c
    return {
        a + "time_decay": init.uniform(c, low=-2.0, high=1.0),
        a + "time_first": init.uniform(c, low=-1.0, high=1.0),
        a + "time_mix_k": init.mix(c),
        a + "time_mix_v": init.mix(c),
        a + "time_mix_r": init.mix(c),
        a + "key.weight": init.linear(c, c),
        a + "value.weight": init.linear(c, c),
        a + "receptance.weight": init.linear(c, c),
        a + "output.weight": init.linear(c, c),
        f + "time_mix_k": init.mix(c),
        f + "time_mix_r": init.mix(c),
        f + "key.weight": init.linear(ffn_dim, c),
        f + "receptance.weight": init.linear(c, c),
        f + "value.weight": init.linear(c, ffn_dim),
    }


def _block_v5(init: _Init, i: int, c: int) -> dict[str, torch.Tensor]:
    a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
    h = head_count(c)
    n = c // h
    ffn_dim = int(3.5 * c) // 32 * 32 or 4 * c
    return {
        a + "time_mix_k": init.mix(c),
        a + "time_mix_v": init.mix(c),
        a + "time_mix_r": init.mix(c),
        a + "time_mix_g": init.mix(c),
        a + "time_decay": init.uniform(h, n, low=-3.0, high=0.0),
        a + "time_faaaa": init.uniform(h, n, low=-0.5, high=0.5),
        a + "receptance.weight": init.linear(c, c),
        a + "key.weight": init.linear(c, c),
        a + "value.weight": init.linear(c, c),
        a + "gate.weight": init.linear(c, c),
        a + "output.weight": init.linear(c, c),
        a + "ln_x.weight": 1.0 + init.normal(c, std=0.1),
        a + "ln_x.bias": init.normal(c, std=0.1),
        f + "time_mix_k": init.mix(c),
        f + "time_mix_r": init.mix(c),
        f + "key.weight": init.linear(ffn_dim, c),
        f + "receptance.weight": init.linear(c, c),
        f + "value.weight": init.linear(c, ffn_dim),
    }


def _block_v6(init: _Init, i: int, c: int) -> dict[str, torch.Tensor]:
    a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
    h = head_count(c)
    n = c // h
    mix_dim, decay_dim = 32, 64
    ffn_dim = int(3.5 * c) // 32 * 32 or 4 * c
    return {
        a + "time_maa_x": init.mix(c),
        a + "time_maa_w": init.mix(c),
        a + "time_maa_k": init.mix(c),
        a + "time_maa_v": init.mix(c),
        a + "time_maa_r": init.mix(c),
        a + "time_maa_g": init.mix(c),
        a + "time_maa_w1": init.normal(c, 5 * mix_dim, std=0.01),
        a + "time_maa_w2": init.normal(5, mix_dim, c, std=0.01),
        a + "time_decay": init.uniform(1, 1, c, low=-3.0, high=0.0),
        a + "time_decay_w1": init.normal(c, decay_dim, std=0.01),
        a + "time_decay_w2": init.normal(decay_dim, c, std=0.01),
        a + "time_faaaa": init.uniform(h, n, low=-0.5, high=0.5),
        a + "receptance.weight": init.linear(c, c),
        a + "key.weight": init.linear(c, c),
        a + "value.weight": init.linear(c, c),
        a + "gate.weight": init.linear(c, c),
        a + "output.weight": init.linear(c, c),
        a + "ln_x.weight": 1.0 + init.normal(c, std=0.1),
        a + "ln_x.bias": init.normal(c, std=0.1),
        f + "time_maa_k": init.mix(c),
        f + "time_maa_r": init.mix(c),
        f + "key.weight": init.linear(ffn_dim, c),
        f + "receptance.weight": init.linear(c, c),
        f + "value.weight": init.linear(c, ffn_dim),
    }


def _block_v7(init: _Init, i: int, c: int) -> dict[str, torch.Tensor]:
    a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
    h = head_count(c)
    n = c // h
    d_decay, d_a, d_v, d_gate = rwkv7_lora_dims(c)
    block = {
        a + "x_r": init.mix(c),
        a + "x_w": init.mix(c),
        a + "x_k": init.mix(c),
        a + "x_v": init.mix(c),
        a + "x_a": init.mix(c),
        a + "x_g": init.mix(c),
        a + "w0": init.uniform(1, 1, c, low=-2.0, high=1.0),
        a + "w1": init.normal(c, d_decay, std=0.1),
        a + "w2": init.normal(d_decay, c, std=0.1),
        a + "a0": init.normal(1, 1, c, std=0.5),
        a + "a1": init.normal(c, d_a, std=0.1),
        a + "a2": init.normal(d_a, c, std=0.1),
        a + "g1": init.normal(c, d_gate, std=0.1),
        a + "g2": init.normal(d_gate, c, std=0.1),
        a + "k_k": init.uniform(1, 1, c, low=0.5, high=1.0),
        a + "k_a": init.uniform(1, 1, c, low=0.5, high=1.0),
        a + "r_k": init.normal(h, n, std=0.1),
        a + "receptance.weight": init.linear(c, c),
        a + "key.weight": init.linear(c, c),
        a + "value.weight": init.linear(c, c),
        a + "output.weight": init.linear(c, c),
        a + "ln_x.weight": 1.0 + init.normal(c, std=0.1),
        a + "ln_x.bias": init.normal(c, std=0.1),
        f + "x_k": init.mix(c),
        f + "key.weight": init.linear(4 * c, c),
        f + "value.weight": init.linear(c, 4 * c),
    }
    if i > 0:  # the first layer has no value residual in the official checkpoints
        block[a + "v0"] = init.normal(1, 1, c, std=0.5)
        block[a + "v1"] = init.normal(c, d_v, std=0.1)
        block[a + "v2"] = init.normal(d_v, c, std=0.1)
    return block


_BLOCKS = {4: _block_v4, 5: _block_v5, 6: _block_v6, 7: _block_v7}


def random_weights(version: int, shape: ModelShape, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 weights of an RWKV model of the given version (4, 5, 6 or 7) and shape."""
    if version not in _BLOCKS:
        raise ValueError(f"unsupported RWKV version {version}: choose one of {SUPPORTED_VERSIONS}")
    if shape.n_layer < 1 or shape.n_embd < 8 or shape.vocab_size < 2:
        raise ValueError("a model needs at least 1 layer, width 8 and 2 vocabulary entries")
    if version >= 5 and shape.n_embd % 8:
        raise ValueError(f"RWKV-{version} needs a width that is a multiple of 8, not {shape.n_embd}")
    init = _Init(seed)
    weights = _common(init, shape)
    for layer in range(shape.n_layer):
        weights.update(_layer_norms(init, f"blocks.{layer}.", shape.n_embd, ("ln1", "ln2")))
        weights.update(_BLOCKS[version](init, layer, shape.n_embd))
    return weights


def write_random_model(
    path: Path,
    version: int,
    shape: ModelShape,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random model to ``path`` (atomically: a partly written file never has the name)."""
    weights = {k: v.to(dtype).contiguous() for k, v in random_weights(version, shape, seed).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(weights, tmp)
    tmp.replace(path)
    return path
