"""Strategy strings: their shape checked without torch, and what each engine accepts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from engine.errors import EngineError
from engine.strategy import check_reference_strategy, dtype, normalise_strategy, on_device


@pytest.mark.parametrize(
    ("text", "normal"),
    [("cpu fp32", "cpu fp32"), ("  cuda:1   fp16 ", "cuda:1 fp16"), ("cuda fp16 *10 -> cpu fp32", None)],
)
def test_a_strategy_names_a_device_and_a_precision(text: str, normal: str | None) -> None:
    """The settings' check: a device kind and a precision, spaces normalised."""
    assert normalise_strategy(text) == (normal or " ".join(text.split()))


@pytest.mark.parametrize("text", ["", "fp32", "tpu fp32", "gpu fp16"])
def test_what_is_no_strategy_is_refused(text: str) -> None:
    """A strategy without a known device kind and a precision is a ValueError."""
    with pytest.raises(ValueError, match="not a strategy"):
        normalise_strategy(text)


def test_precisions_name_torch_dtypes() -> None:
    """fp32, fp16 and bf16, and the dtype names a snapshot stores, map to torch's dtypes."""
    assert [dtype(p) for p in ("fp32", "fp16", "bf16")] == [torch.float32, torch.float16, torch.bfloat16]
    assert dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError):
        dtype("fp16i8")


def test_several_devices_take_the_precision_only() -> None:
    """With a devices list, the strategy gives the precision for each device."""
    assert on_device("cuda fp16", "cuda:1") == "cuda:1 fp16"
    with pytest.raises(EngineError, match="only the precision"):
        on_device("cuda fp16 -> cpu fp32", "cuda:0")


@pytest.mark.parametrize(
    ("text", "family", "problem"),
    [
        ("cpu fp32", 7, None),
        ("cpu bf16", 4, None),
        ("cpu fp16", 7, "on the CPU use fp32 or bf16"),
        ("cpu fp32 *1 -> cpu bf16", 5, None),
        ("cpu fp32 *1 -> cpu bf16", 7, "not supported for RWKV-7"),
        ("tpu fp32", 6, "must be 'cpu' or 'cuda'"),
    ],
)
def test_the_reference_strategies(text: str, family: int, problem: str | None) -> None:
    """What the rwkv package runs, by model family (CPU cases)."""
    if problem is None:
        assert check_reference_strategy(text, family) == text
    else:
        with pytest.raises(EngineError, match=problem):
            check_reference_strategy(text, family)


def test_the_strategy_module_imports_no_torch() -> None:
    """The settings may check a strategy in a process that has not loaded torch."""
    code = "import sys, engine.strategy; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
