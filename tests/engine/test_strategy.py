"""Strategy strings: their shape checked without torch, and what each engine accepts."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.devices import DeviceEngines
from engine.errors import EngineError
from engine.loading import load_engine
from engine.strategy import (
    check_reference_strategy,
    dtype,
    int8_products,
    normalise_strategy,
    on_device,
    parse_strategy,
    resolve_strategy,
)
from tools.make_model import ModelShape, write_random_model


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


def test_int8_and_auto_are_the_batched_engines_own() -> None:
    """'cpu int8' loads as fp32 with int8 products, on the CPU only; ``auto`` must be resolved
    first; the rwkv package refuses int8 with what it runs instead."""
    assert normalise_strategy(" auto ") == "auto"
    assert normalise_strategy("cpu  auto") == "cpu auto"
    assert parse_strategy("cpu int8") == (torch.device("cpu"), torch.float32)
    assert int8_products("cpu int8") and not int8_products("cpu fp32") and not int8_products("auto")
    with pytest.raises(EngineError, match="int8 runs on the CPU only"):
        parse_strategy("cuda int8")
    with pytest.raises(EngineError, match="must be resolved first"):
        parse_strategy("cpu auto")
    with pytest.raises(EngineError, match="on the CPU use fp32, bf16 or int8"):
        parse_strategy("cpu fp16")
    with pytest.raises(EngineError, match="the rwkv package runs 'cpu fp32' or 'cpu bf16'"):
        check_reference_strategy("cpu int8", 7)


@pytest.mark.parametrize(
    ("text", "family", "instead"),
    [
        ("cuda int8", 5, "'cuda fp16i8'"),
        ("cuda:1 int8", 4, "'cuda fp16i8'"),
        ("cuda int8", 7, r"use 'cuda fp16' \(the rwkv package's 'cuda fp16i8' is for RWKV-4 to 6\)"),
    ],
)
def test_the_reference_points_gpus_at_its_own_int8(text: str, family: int, instead: str) -> None:
    """On a GPU the rwkv package's int8 is 'cuda fp16i8' (RWKV-4 to 6), not a CPU strategy."""
    with pytest.raises(EngineError, match=instead) as refused:
        check_reference_strategy(text, family)
    assert "'cpu fp32'" not in str(refused.value)


async def test_several_devices_keep_why_auto_chose_their_precision(tmp_path: Path) -> None:
    """With a devices list, ``auto`` is resolved before the per-device engines are made, and the
    start-up line still says why."""
    path = write_random_model(tmp_path / "m.pth", 7, ModelShape(1, 64, 65536), seed=2)  # World vocabulary
    want = resolve_strategy("cpu auto")
    engine = await asyncio.to_thread(load_engine, path, "cpu auto", "world", devices=["cpu"], max_batch=2)
    try:
        assert isinstance(engine, DeviceEngines)
        assert want.reason is not None
        precision = want.strategy.split()[1]
        assert f"({precision}, auto: {want.reason}, batched engine on 1 devices" in engine.describe()
    finally:
        await engine.close()
