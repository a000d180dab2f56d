"""Strategy strings (``'cpu fp32'``, ``'cuda:1 fp16'``) and precisions: parsed here, and only here.

A strategy names a device and a precision, as the ``rwkv`` package's strategies do; the package's
may say more (``'cuda fp16 *10 -> cpu fp32'``, ``'cuda fp16i8'``), which only the reference engine
runs. Two are the batched engine's own:

- ``'cpu int8'``: fp32 activations and sums with the large weights in int8, one scale per
  output row, in the C step (:mod:`engine.native`; decode measured 2.1x fp32 at one sequence on
  an AVX2 CPU, the logits 7% off fp32 on average on the random 0.1B shape: ``python -m
  tools.accuracy``); where the C step is built with AVX-512 VNNI, the products' inputs are
  rounded to 8 bits too (one scale per 64 columns) and summed in integers, as llama.cpp's q8_0
  does (8.6% off fp32 there); without the C step, fbgemm's dynamic int8 products through PyTorch
  (see :mod:`engine.cpu_features` and tools/parity.py);
- the precision ``auto`` (``'cpu auto'``, ``'cuda auto'``, or ``'auto'`` alone: a GPU when there
  is one): :func:`resolve_strategy` turns it into an accepted precision for the device at hand
  (one the rwkv package runs too, never int8): fp16 on a GPU, bf16 on a CPU with AMX (chosen on a
  single-product measurement, not measured on the engine) or where the C step is built with
  AVX-512 BF16 (its bf16 products, measured 1.9x to 2.1x fp32 a decode step), fp32 on other CPUs.

This module imports no torch when it is loaded, so that the settings can check a strategy
without it (``--help`` and ``health`` start in a fraction of a second); the functions that need a
device or a dtype import torch when they are called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.errors import EngineError

if TYPE_CHECKING:
    import torch

    from engine.cpu_features import CpuFeatures

DEVICE_KINDS = ("cpu", "cuda")
# The precisions the batched engine and random models use, and the torch dtype each names.
DTYPE_NAMES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
PRECISIONS = tuple(DTYPE_NAMES)
# What the reference (the rwkv package) accepts on each device.
REFERENCE_CPU_PRECISIONS = ("fp32", "bf16")
INT8 = "int8"  # the batched engine on the CPU: fp32 with int8 matrix products
AUTO = "auto"  # an accepted precision for the device (resolve_strategy)
GPU_AUTO_PRECISION = "fp16"
_RWKV7_STRATEGIES = "'cpu fp32', 'cpu bf16', 'cpu int8', 'cuda fp16', 'cuda bf16', 'cuda fp32' or 'auto'"


@dataclass(frozen=True)
class Resolved:
    """A strategy as it runs, and why it was chosen (None: as the settings gave it)."""

    strategy: str
    reason: str | None = None

    def describe(self) -> str:
        """``cpu fp32``, or ``cpu fp32, auto: this CPU has ...`` for a resolved one."""
        return self.strategy if self.reason is None else f"{self.strategy}, auto: {self.reason}"


def normalise_strategy(strategy: str) -> str:
    """The strategy with single spaces; ValueError when it names no device and precision (or
    is not ``auto``)."""
    parts = strategy.split()
    if parts == [AUTO]:
        return AUTO
    if len(parts) < 2 or _kind(parts[0]) not in DEVICE_KINDS:
        raise ValueError(f"{strategy!r} is not a strategy")
    return " ".join(parts)


def resolve_strategy(
    strategy: str, features: CpuFeatures | None = None, c_step_bf16: bool | None = None
) -> Resolved:
    """The strategy to load: ``auto`` becomes an accepted precision for the device (fp16 on a GPU;
    on the CPU by its features, :func:`engine.cpu_features.choose_cpu_precision`; ``features``:
    this CPU's when None; ``c_step_bf16``: whether the C step has AVX-512 BF16 products, asked of
    it (built on first use) when None and the CPU has them), with the reason; any other strategy
    is returned as it is."""
    parts = strategy.split()
    if parts == [AUTO]:
        import torch

        if torch.cuda.is_available():
            return Resolved(f"cuda {GPU_AUTO_PRECISION}", "a CUDA GPU is there")
        parts = ["cpu", AUTO]
    if len(parts) != 2 or parts[1] != AUTO:
        return Resolved(strategy)
    if _kind(parts[0]) == "cuda":
        return Resolved(f"{parts[0]} {GPU_AUTO_PRECISION}", "fp16 on a GPU")
    if parts[0] != "cpu":
        raise EngineError(f"strategy {strategy!r}: the device must be 'cpu' or 'cuda'")
    from engine.cpu_features import choose_cpu_precision, this_cpu

    cpu = features or this_cpu()
    if c_step_bf16 is None:
        from engine import native

        c_step_bf16 = cpu.avx512_bf16 and native.load().bf16
    precision, why = choose_cpu_precision(cpu, c_step_bf16)
    return Resolved(f"cpu {precision}", f"this CPU has {cpu.describe()}; {why}")


def int8_products(strategy: str) -> bool:
    """Whether a batched-engine strategy runs its large matrix products in int8 (``'cpu int8'``)."""
    return strategy.split()[1:] == [INT8]


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
    if parts[-1:] == [AUTO]:
        raise EngineError(f"strategy {strategy!r} must be resolved first (resolve_strategy)")
    known = (*DTYPE_NAMES, INT8)
    if len(parts) != 2 or parts[1] not in known or _kind(parts[0]) not in DEVICE_KINDS:
        raise EngineError(
            f"strategy {strategy!r} is not supported by the batched engine: use {_RWKV7_STRATEGIES}"
        )
    try:
        device = torch.device(parts[0])
    except RuntimeError as exc:
        raise EngineError(f"strategy {strategy!r}: {parts[0]!r} is not a device") from exc
    if parts[1] == INT8 and device.type != "cpu":
        raise EngineError(f"strategy {strategy!r}: int8 runs on the CPU only; on a GPU use fp16")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"strategy {strategy!r} needs a CUDA GPU, and {no_gpu_reason()}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise EngineError(f"strategy {strategy!r}: there is no {device}, only {count} GPUs")
    if parts[1] == INT8:
        return device, dtype("fp32")
    if device.type == "cpu" and parts[1] not in REFERENCE_CPU_PRECISIONS:
        raise EngineError(f"strategy {strategy!r}: on the CPU use fp32, bf16 or int8")
    return device, dtype(parts[1])


def check_reference_strategy(strategy: str, family: int) -> str:
    """Check a strategy against what the reference supports for a model family (4 to 7)."""
    import torch

    from engine.gpu import no_gpu_reason

    parts = strategy.split()
    if parts[-1:] == [INT8]:
        if _kind(parts[0]) != "cuda":
            instead = "the rwkv package runs 'cpu fp32' or 'cpu bf16'"
        elif family >= 7:
            instead = "on a GPU use 'cuda fp16' (the rwkv package's 'cuda fp16i8' is for RWKV-4 to 6)"
        else:
            instead = "on a GPU the rwkv package has int8 weights as 'cuda fp16i8'"
        raise EngineError(
            f"strategy {strategy!r}: int8 products are the batched engine's (RWKV-7 only); {instead}"
        )
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
