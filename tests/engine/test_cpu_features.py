"""The CPU's features, read from its flags, and the precision the ``auto`` strategy picks by them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.batched_engine import BatchedEngine
from engine.cpu_features import CpuFeatures, choose_cpu_precision, cpuinfo_flags, this_cpu
from engine.inprocess import ReferenceEngine
from engine.strategy import Resolved, resolve_strategy
from engine.tokenizer import world_tokenizer
from tools.make_model import ModelShape, write_random_model

SAPPHIRE_RAPIDS = "fpu avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"
ICE_LAKE = "fpu avx2 avx512f avx512bw avx512_vnni"
ZEN4 = "fpu avx2 avx512f avx512_vnni avx512_bf16"
OLD = "fpu sse2 avx avx2 fma"
ALDER_LAKE = "fpu avx2 fma avx_vnni"  # AVX-VNNI without AVX-512: fbgemm has no kernel for it


@pytest.fixture(autouse=True)
def _fbgemm_unrestricted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flags alone decide, whatever FBGEMM_ENABLE_INSTRUCTIONS the tests run under."""
    monkeypatch.delenv("FBGEMM_ENABLE_INSTRUCTIONS", raising=False)


def cpuinfo(flags: str) -> str:
    """A /proc/cpuinfo text of two CPUs with these flags."""
    cpu = f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\nbugs\t\t: spectre_v1\n\n"
    return cpu + cpu.replace(": 0", ": 1")


@pytest.mark.parametrize(
    ("flags", "amx_usable", "c_step_bf16", "precision", "vnni"),
    [
        (SAPPHIRE_RAPIDS, True, False, "bf16", True),
        (SAPPHIRE_RAPIDS, False, False, "fp32", True),  # the kernel does not let the process use AMX
        (SAPPHIRE_RAPIDS, False, True, "bf16", True),  # ... but the C step has AVX-512 BF16
        (ICE_LAKE, None, False, "fp32", True),
        (ZEN4, None, True, "bf16", True),
        (ZEN4, None, False, "fp32", True),  # no C step (no compiler): PyTorch's bf16 is slow
        (OLD, None, False, "fp32", False),
        (ALDER_LAKE, None, False, "fp32", False),
    ],
    ids=[
        "amx",
        "amx-not-permitted",
        "amx-not-permitted-c-step",
        "avx512-vnni",
        "avx512-bf16-c-step",
        "avx512-bf16-no-c-step",
        "avx2",
        "avx-vnni",
    ],
)
def test_auto_picks_bf16_where_amx_or_the_c_step_runs_it(
    flags: str, amx_usable: bool | None, c_step_bf16: bool, precision: str, vnni: bool
) -> None:
    """bf16 with usable AMX tiles or with the C step built with AVX-512 BF16, fp32 everywhere
    else; int8 is never picked by itself. VNNI: AVX-512 VNNI only, the one fbgemm has kernels
    for."""
    features = CpuFeatures.from_flags(cpuinfo_flags(cpuinfo(flags)), "AVX512", amx_usable=amx_usable)
    assert features.vnni is vnni
    chosen, why = choose_cpu_precision(features, c_step_bf16)
    assert chosen == precision
    resolved = resolve_strategy("cpu auto", features, c_step_bf16)
    assert resolved.strategy == f"cpu {precision}"
    assert resolved.reason is not None and features.describe() in resolved.reason
    assert resolved.describe() == f"cpu {precision}, auto: this CPU has {features.describe()}; {why}"


def test_the_description_names_what_decides() -> None:
    """The start-up line says the vector level and the bf16 hardware, or that there is none."""
    amx = CpuFeatures.from_flags(SAPPHIRE_RAPIDS.split(), "AVX512", amx_usable=True)
    assert amx.describe() == "AVX512, AMX, AVX-512 BF16, AVX-512 VNNI"
    assert CpuFeatures.from_flags(OLD.split(), "AVX2").describe() == "AVX2, no bf16 hardware"
    assert CpuFeatures.from_flags(ALDER_LAKE.split(), "AVX2").describe() == "AVX2, no bf16 hardware"


@pytest.mark.parametrize(
    ("setting", "vnni"),
    [
        (None, True),
        ("AVX2", False),
        ("avx512", False),
        ("AVX512_256", False),
        ("AVX512_E1", True),
        ("?", True),
    ],
)
def test_fbgemm_held_below_vnni_counts_as_no_vnni(
    setting: str | None, vnni: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FBGEMM_ENABLE_INSTRUCTIONS below AVX512_E1 keeps fbgemm off its VNNI kernels (their 32-bit
    sums), so int8 products must take 7-bit inputs there; values fbgemm ignores change nothing."""
    if setting is None:
        monkeypatch.delenv("FBGEMM_ENABLE_INSTRUCTIONS", raising=False)
    else:
        monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", setting)
    assert CpuFeatures.from_flags(ICE_LAKE.split(), "AVX512").vnni is vnni


def test_cpuinfo_without_flags_has_none() -> None:
    """A text without a flags line (another OS's, or none) yields no flags."""
    assert cpuinfo_flags("processor\t: 0\nmodel name\t: x\n") == set()
    assert cpuinfo_flags("") == set()


def test_other_strategies_pass_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only ``auto`` is resolved: what the owner named is what runs."""
    amx = CpuFeatures.from_flags(SAPPHIRE_RAPIDS.split(), "AVX512", amx_usable=True)
    for strategy in ("cpu fp32", "cpu int8", "cuda:1 fp16", "cuda fp16 *10 -> cpu fp32"):
        assert resolve_strategy(strategy, amx) == Resolved(strategy)
    assert resolve_strategy("cuda:1 auto", amx).strategy == "cuda:1 fp16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_strategy("auto", amx).strategy == "cpu bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_strategy("auto", amx) == Resolved("cuda fp16", "a CUDA GPU is there")


def test_the_start_up_line_says_which_path_serves_and_why(tmp_path: Path) -> None:
    """A batched engine loaded with ``cpu auto`` runs the resolved strategy and says why."""
    path = write_random_model(tmp_path / "m.pth", 7, ModelShape(1, 64, 300), seed=2)
    engine = BatchedEngine.load(path, "cpu auto", world_tokenizer(), max_batch=2)
    try:
        want = resolve_strategy("cpu auto", this_cpu())
        assert engine.strategy == want.strategy
        assert f"({want.describe()}, batched engine" in engine.describe()
        assert want.strategy in ("cpu fp32", "cpu bf16")
    finally:
        engine.shutdown()


async def test_the_reference_engine_resolves_auto_too(tmp_path: Path) -> None:
    """The rwkv package's engine takes ``cpu auto`` as well, and says what it chose."""
    path = write_random_model(tmp_path / "m.pth", 7, ModelShape(1, 64, 300), seed=2)
    engine = ReferenceEngine.load(path, "cpu auto", world_tokenizer())
    try:
        want = resolve_strategy("cpu auto", this_cpu())
        assert engine.strategy == want.strategy
        assert engine.describe().endswith(f"({want.describe()}, reference engine)")
    finally:
        await engine.close()
