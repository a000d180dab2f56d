"""Snapshots of a sequence: recurrent state tensors, the logits after the last token, that token.

A snapshot is what the reference chat saves per channel (``chat``, ``chat_pre``, ``gen_0``...).
It is serialised without pickle: a JSON header of dtypes and shapes, then the raw bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from engine.checksums import checksum
from engine.errors import StateMismatchError
from engine.strategy import DTYPE_NAMES, dtype

__all__ = ["Snapshot", "checksum", "move_snapshot"]

_MAGIC = b"RWKVSNAP"
_FORMAT = 1
_DTYPES = {name: dtype(name) for name in DTYPE_NAMES.values()}  # by the names a snapshot stores


@dataclass
class Snapshot:
    """The state of one sequence after some tokens were fed.

    ``tensors`` follow the reference's layout per layer (RWKV-7: 0=att_x_prev 1=att_kv
    2=ffn_x_prev; RWKV-4: 0=att_xx 1=aa 2=bb 3=pp 4=ffn_xx). ``logits`` are the raw float32
    logits after ``last_token``, before any penalty or shaping. ``meta`` holds small facts
    about how the snapshot was made (for example the generation mode that ``++`` repeats).
    """

    tensors: list[torch.Tensor]
    logits: torch.Tensor
    last_token: int | None
    fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes held by the tensors and logits."""
        return sum(t.numel() * t.element_size() for t in self.tensors) + (
            self.logits.numel() * self.logits.element_size()
        )

    def to_bytes(self) -> bytes:
        """Serialise (tensors are copied to the CPU)."""
        tensors = [t.detach().to("cpu").contiguous() for t in self.tensors]
        logits = self.logits.detach().to("cpu", torch.float32).contiguous()
        header = {
            "format": _FORMAT,
            "fingerprint": self.fingerprint,
            "last_token": self.last_token,
            "meta": self.meta,
            "tensors": [[str(t.dtype).removeprefix("torch."), list(t.shape)] for t in tensors],
            "logits": list(logits.shape),
        }
        head = json.dumps(header, separators=(",", ":")).encode()
        parts = [_MAGIC, struct.pack("<I", len(head)), head]
        parts += [_raw(t) for t in tensors]
        parts.append(_raw(logits))
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes, expect_fingerprint: str | None = None) -> Snapshot:
        """Deserialise; raises :class:`StateMismatchError` for foreign or damaged data."""
        if not data.startswith(_MAGIC):
            raise StateMismatchError("stored state is not a snapshot")
        try:
            (head_len,) = struct.unpack_from("<I", data, len(_MAGIC))
            offset = len(_MAGIC) + 4
            header = json.loads(data[offset : offset + head_len])
            offset += head_len
            if header.get("format") != _FORMAT:
                raise StateMismatchError(f"unknown snapshot format {header.get('format')}")
            tensors = []
            for dtype_name, shape in header["tensors"]:
                tensor, offset = _read(data, offset, _DTYPES[dtype_name], shape)
                tensors.append(tensor)
            logits, offset = _read(data, offset, torch.float32, header["logits"])
        except (KeyError, ValueError, struct.error, RuntimeError) as exc:
            raise StateMismatchError(f"stored state is damaged: {exc}") from exc
        if offset != len(data):
            raise StateMismatchError("stored state has trailing bytes")
        fingerprint = str(header["fingerprint"])
        if expect_fingerprint is not None and fingerprint != expect_fingerprint:
            raise StateMismatchError(
                f"stored state belongs to model {fingerprint}, not to the loaded {expect_fingerprint}"
            )
        return cls(tensors, logits, header["last_token"], fingerprint, dict(header["meta"]))


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


def _read(data: bytes, offset: int, dtype: torch.dtype, shape: list[int]) -> tuple[torch.Tensor, int]:
    count = 1
    for dim in shape:
        count *= int(dim)
    size = count * torch.empty((), dtype=dtype).element_size()
    if offset + size > len(data):
        raise ValueError("truncated tensor data")
    raw = torch.frombuffer(bytearray(data[offset : offset + size]), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape).clone(), offset + size


def move_snapshot(snapshot: Snapshot, devices: Sequence[torch.device]) -> Snapshot:
    """The snapshot with its tensors (then its logits) on ``devices``; pinned host memory when
    moving off a GPU, so that the way back is fast."""
    pin = torch.cuda.is_available()

    def to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
        if t.device == device:
            return t
        if pin and device.type == "cpu":
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
        return t.to(device)

    tensors = [to(t, d) for t, d in zip(snapshot.tensors, devices, strict=False)]
    return replace(snapshot, tensors=tensors, logits=to(snapshot.logits, devices[-1]))
