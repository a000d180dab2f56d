"""Reading RWKV ``.pth`` files: the model version from the keys, the shape, and a fingerprint.

The version rules follow the ``rwkv`` pip package (the reference implementation):
RWKV-4 has ``att.time_first``; 5.x adds ``ln_x`` (5.1 a gate, 5.2 a per-head decay matrix);
6 adds ``time_maa_*``; 7 ("Goose") has ``att.r_k``, ``x_r``..``x_g`` and low-rank ``w/a/v/g``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import ModelFileError, process_user
from engine.shapes import WORLD_VOCAB_SIZE

# Keys every block of each family must carry; a file without them is refused before the
# reference implementation sees it (it would fail with a bare KeyError).
_BLOCK_KEYS: dict[int, tuple[str, ...]] = {
    4: (
        "ln1.weight",
        "ln2.weight",
        "att.time_decay",
        "att.time_first",
        "att.time_mix_k",
        "att.key.weight",
        "att.value.weight",
        "att.receptance.weight",
        "att.output.weight",
        "ffn.time_mix_k",
        "ffn.key.weight",
        "ffn.value.weight",
        "ffn.receptance.weight",
    ),
    5: (
        "ln1.weight",
        "ln2.weight",
        "att.time_decay",
        "att.ln_x.weight",
        "att.key.weight",
        "att.value.weight",
        "att.receptance.weight",
        "att.output.weight",
        "ffn.key.weight",
        "ffn.value.weight",
        "ffn.receptance.weight",
    ),
    6: (
        "ln1.weight",
        "ln2.weight",
        "att.time_maa_x",
        "att.time_maa_w1",
        "att.time_maa_w2",
        "att.time_decay",
        "att.time_decay_w1",
        "att.time_decay_w2",
        "att.time_faaaa",
        "att.key.weight",
        "att.value.weight",
        "att.receptance.weight",
        "att.gate.weight",
        "att.output.weight",
        "att.ln_x.weight",
        "ffn.time_maa_k",
        "ffn.key.weight",
        "ffn.value.weight",
        "ffn.receptance.weight",
    ),
    7: (
        "ln1.weight",
        "ln2.weight",
        "att.x_r",
        "att.x_w",
        "att.x_k",
        "att.x_v",
        "att.x_a",
        "att.x_g",
        "att.w0",
        "att.w1",
        "att.w2",
        "att.a0",
        "att.a1",
        "att.a2",
        "att.g1",
        "att.g2",
        "att.k_k",
        "att.k_a",
        "att.r_k",
        "att.key.weight",
        "att.value.weight",
        "att.receptance.weight",
        "att.output.weight",
        "att.ln_x.weight",
        "ffn.x_k",
        "ffn.key.weight",
        "ffn.value.weight",
    ),
}
_TOP_KEYS = ("emb.weight", "head.weight", "ln_out.weight", "ln_out.bias", "blocks.0.ln0.weight")


@dataclass(frozen=True)
class ModelSpec:
    """What a model file is: its RWKV version, shape and identity."""

    path: Path
    version: float  # 4.0, 5.0, 5.1, 5.2, 6.0 or 7.0, as the reference names them
    n_layer: int
    n_embd: int
    vocab_size: int
    n_head: int
    head_size: int
    stored_dtype: str
    fingerprint: str  # stable across copies and fp32/fp16/bf16 conversions of the same weights

    @property
    def family(self) -> int:
        """The major version: 4, 5, 6 or 7."""
        return int(self.version)

    @property
    def is_world(self) -> bool:
        """True when the vocabulary size is that of the World tokenizer."""
        return self.vocab_size == WORLD_VOCAB_SIZE

    def describe(self) -> str:
        """A one-line human description, e.g. ``RWKV-7 L24 D2048 vocab 65536``."""
        version = f"{self.version:.1f}".removesuffix(".0")
        return f"RWKV-{version} L{self.n_layer} D{self.n_embd} vocab {self.vocab_size}"


def detect_version(weights: Mapping[str, torch.Tensor]) -> float:
    """Return the RWKV version of a state dict, by the same key rules as the reference."""
    keys = list(weights)
    if any(k.endswith("att.r_k") or k.endswith("att.x_r") for k in keys):
        return 7.0
    version = 4.0
    for key in keys:
        if "ln_x" in key:
            version = max(5.0, version)
        if "gate.weight" in key:
            version = max(5.1, version)
        if int(version) == 5 and "att.time_decay" in key:
            shape = weights[key].shape
            if len(shape) > 1 and shape[1] > 1:
                version = max(5.2, version)
        if "time_maa" in key:
            version = max(6.0, version)
    return version


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Open a ``.pth`` file memory-mapped, refusing anything that is not a tensor dict."""
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"model path is not a file: {path}")
    if path.suffix != ".pth":
        raise ModelFileError(f"model file must be a PyTorch .pth file (the name must end in .pth): {path}")
    if not os.access(path, os.R_OK) or not os.access(path.parent, os.X_OK):
        raise ModelFileError(
            f"the model file {path} is not readable by {process_user()}: give that user read access "
            f"(for example `chmod a+r {path}`; in Docker, the container runs as uid {os.getuid()})"
        )
    try:
        try:
            loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            # A file in PyTorch's older (pre-zip) format: valid, just not mappable.
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as exc:
        raise ModelFileError(
            f"the model file {path} is not readable by {process_user()}: {exc.strerror}"
        ) from exc
    except Exception as exc:  # junk makes torch.load fail in many ways; all mean "unreadable"
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelFileError(
            f"{path} is not a readable PyTorch .pth file (is it truncated or corrupt?): {reason}"
        ) from exc
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise ModelFileError(f"{path} does not hold a state dict of tensors, so it is no RWKV model")
    return loaded


def inspect_weights(path: Path, weights: Mapping[str, torch.Tensor]) -> ModelSpec:
    """Check that a state dict is a complete RWKV model and describe it."""
    missing = [k for k in _TOP_KEYS if k not in weights]
    if missing:
        raise ModelFileError(f"{path} does not look like an RWKV model: it has no {', '.join(missing)}")
    version = detect_version(weights)
    layer_ids = {int(k.split(".")[1]) for k in weights if k.startswith("blocks.")}
    n_layer = max(layer_ids) + 1
    if layer_ids != set(range(n_layer)):
        raise ModelFileError(f"{path} is incomplete: some of its {n_layer} layers are missing")
    for layer in range(n_layer):
        for suffix in _BLOCK_KEYS[int(version)]:
            key = f"blocks.{layer}.{suffix}"
            if key not in weights:
                raise ModelFileError(
                    f"{path} looks like RWKV-{int(version)} but has no {key}: "
                    "the file is incomplete or not an RWKV checkpoint"
                )
    emb = weights["emb.weight"]
    head = weights["head.weight"]
    if emb.dim() != 2 or head.shape != emb.shape:
        raise ModelFileError(
            f"{path} has inconsistent shapes: emb.weight {tuple(emb.shape)}, head.weight {tuple(head.shape)}"
        )
    vocab_size, n_embd = emb.shape
    if version >= 7:
        n_head, head_size = weights["blocks.0.att.r_k"].shape
    elif version >= 6:
        n_head = int(weights["blocks.0.att.time_faaaa"].shape[0])
        head_size = n_embd // n_head
    elif version >= 5:
        n_head = int(weights["blocks.0.att.time_decay"].shape[0])
        head_size = n_embd // n_head
    else:
        n_head, head_size = 1, n_embd
    return ModelSpec(
        path=path,
        version=version,
        n_layer=n_layer,
        n_embd=int(n_embd),
        vocab_size=int(vocab_size),
        n_head=int(n_head),
        head_size=int(head_size),
        stored_dtype=str(emb.dtype).removeprefix("torch."),
        fingerprint=fingerprint(weights),
    )


def inspect_model(path: Path) -> ModelSpec:
    """Open and check a model file; raises :class:`ModelFileError` with a clear message."""
    weights = load_weights(path)
    try:
        return inspect_weights(path, weights)
    except (ValueError, IndexError, TypeError, RuntimeError) as exc:
        raise ModelFileError(
            f"{path} is not a well-formed RWKV model ({type(exc).__name__}: {exc})".splitlines()[0]
        ) from exc
    finally:
        del weights


def fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """A short identity of the weights, cheap even for a 7B file (it reads a few values per tensor).

    Names, shapes and a sample of every tensor are hashed; values are rounded to bfloat16 first so
    that fp32 and bf16 copies of the same checkpoint share a fingerprint. An fp16 conversion
    rounds differently and counts as another model (its states would differ slightly anyway).
    """
    digest = hashlib.sha256()
    for key in sorted(weights):
        tensor = weights[key]
        digest.update(key.encode())
        digest.update(repr(tuple(tensor.shape)).encode())
        flat = tensor.reshape(-1)
        sample = torch.cat([flat[:32], flat[-32:], flat[:: max(1, flat.numel() // 64)][:64]])
        digest.update(sample.to(torch.float32).to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]
