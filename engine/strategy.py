"""Strategy strings (``'cpu fp32'``, ``'cuda:1 fp16'``) and precisions: parsed here, and only here.

A strategy names a device and a precision, as the ``rwkv`` package's strategies do; the package's
may say more (``'cuda fp16 *10 -> cpu fp32'``, ``'cuda fp16i8'``), which only the reference engine
runs. This module imports no torch when it is loaded, so that the settings can check a strategy
without it (``--help`` and ``health`` start in a fraction of a second); the functions that need a
device or a dtype import torch when they are called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.errors import EngineError

if TYPE_CHECKING:
    import torch

DEVICE_KINDS = ("cpu", "cuda")
# The precisions the batched engine and random models use, and the torch dtype each names.
DTYPE_NAMES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
PRECISIONS = tuple(DTYPE_NAMES)
# What the reference (the rwkv package) accepts on each device.
REFERENCE_CPU_PRECISIONS = ("fp32", "bf16")
_RWKV7_STRATEGIES = "'cpu fp32', 'cpu bf16', 'cuda fp16', 'cuda bf16' or 'cuda fp32'"


def normalise_strategy(strategy: str) -> str:
    """The strategy with single spaces; ValueError when it names no device and precision."""
    parts = strategy.split()
    if len(parts) < 2 or _kind(parts[0]) not in DEVICE_KINDS:
        raise ValueError(f"{strategy!r} is not a strategy")
    return " ".join(parts)


def dtype(precision: str) -> torch.dtype:
    """The torch dtype of a precision (``fp16``) or of a dtype's own name (``float16``)."""
    import torch

    name = DTYPE_NAMES.get(precision, precision)
    if name not in DTYPE_NAMES.values():
        raise ValueError(f"{precision!r} is not a precision")
    found: torch.dtype = getattr(torch, name)
    return found


def parse_strategy(strategy: str) -> tuple[torch.device, torch.dtype]:
    """The device and weight dtype of a batched-engine strategy such as ``'cuda fp16'``; an
    :class:`EngineError` that says what to use otherwise, or why the device is not there."""
    import torch

    from engine.gpu import no_gpu_reason

    parts = strategy.split()
    if len(parts) != 2 or parts[1] not in DTYPE_NAMES or _kind(parts[0]) not in DEVICE_KINDS:
        raise EngineError(
            f"strategy {strategy!r} is not supported by the batched engine: use {_RWKV7_STRATEGIES}"
        )
    try:
        device = torch.device(parts[0])
    except RuntimeError as exc:
        raise EngineError(f"strategy {strategy!r}: {parts[0]!r} is not a device") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"strategy {strategy!r} needs a CUDA GPU, and {no_gpu_reason()}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise EngineError(f"strategy {strategy!r}: there is no {device}, only {count} GPUs")
    if device.type == "cpu" and parts[1] not in REFERENCE_CPU_PRECISIONS:
        raise EngineError(f"strategy {strategy!r}: on the CPU use fp32 or bf16")
    return device, dtype(parts[1])


def check_reference_strategy(strategy: str, family: int) -> str:
    """Check a strategy against what the reference supports for a model family (4 to 7)."""
    import torch

    from engine.gpu import no_gpu_reason

    parts = strategy.split()
    if len(parts) != 2 and family >= 7:
        raise EngineError(f"strategy {strategy!r} is not supported for RWKV-7: use {_RWKV7_STRATEGIES}")
    device = _kind(parts[0]) if parts else ""
    precision = parts[1] if len(parts) > 1 else ""
    if device == "cpu" and precision not in REFERENCE_CPU_PRECISIONS and "->" not in strategy:
        raise EngineError(f"strategy {strategy!r}: on the CPU use fp32 or bf16")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise EngineError(f"strategy {strategy!r} needs a CUDA GPU, and {no_gpu_reason()}")
        if family >= 7 and precision not in DTYPE_NAMES:
            raise EngineError(
                f"strategy {strategy!r}: RWKV-7 in the rwkv package runs fp16, bf16 or fp32 only"
            )
    elif device != "cpu":
        raise EngineError(f"strategy {strategy!r}: the device must be 'cpu' or 'cuda'")
    return strategy


def on_device(strategy: str, device: str) -> str:
    """The strategy of one of several devices: ``device`` with the precision of ``strategy``."""
    words = strategy.split()
    if len(words) != 2:
        raise EngineError(
            f"with several devices the strategy gives only the precision, as in 'cuda fp16', "
            f"and {strategy!r} is more than that"
        )
    return f"{device} {words[1]}"


def precision_of(strategy: str) -> str:
    """The precision word of a strategy (its last word: ``fp16`` of ``'cuda fp16'``)."""
    return strategy.rsplit(maxsplit=1)[-1]


def device_of(strategy: str) -> str:
    """The device word of a strategy (``cuda:1`` of ``'cuda:1 fp16'``)."""
    return strategy.split(maxsplit=1)[0]


def _kind(device: str) -> str:
    """``cuda`` of ``cuda:1``."""
    return device.split(":", maxsplit=1)[0]
