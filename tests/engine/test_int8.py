"""``'cpu int8'`` on the PyTorch path (where the C step is not: no compiler, or
``RWKV_DISCORD_NATIVE=off``): the large matrix products in int8 through fbgemm, close to fp32 within
a stated tolerance. The C step's int8 is tested in test_native.py."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import kernels
from engine.kernels import INT8_SELF_CHECK, Linear
from engine.native import ENV_SWITCH
from engine.runner import ModelRunner
from tools.make_model import ModelShape, write_random_model

# int8 against fp32 on a 2-layer random model of width 768 (every block matrix large enough to be
# quantized), teacher-forced: measured about 5% (largest) and 4% (mean) relative logit error
MAX_REL = 0.15
MEAN_REL = 0.08


@pytest.fixture(autouse=True)
def pytorch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every model of these tests runs PyTorch (fbgemm's int8), not the C step."""
    monkeypatch.setenv(ENV_SWITCH, "off")


@pytest.fixture(scope="module")
def runners(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelRunner, ModelRunner]:
    """The same random model in fp32 and in int8."""
    path = write_random_model(tmp_path_factory.mktemp("int8") / "m.pth", 7, ModelShape(2, 768, 1024), seed=3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_SWITCH, "off")
        return ModelRunner.load(path, "cpu fp32", max_slots=3), ModelRunner.load(
            path, "cpu int8", max_slots=3
        )


def errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """Largest and mean difference, relative to the largest and mean value."""
    diff = (got - want).abs()
    return float(diff.max() / want.abs().max()), float(diff.mean() / want.abs().mean())


@pytest.mark.parametrize("reduce_range", [True, False])
def test_an_int8_product_is_close_to_fp32(reduce_range: bool) -> None:
    """One product, 8-bit or 7-bit inputs: within 3% of fp32, and not fp32 itself."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(1024, 768, generator=gen) * 0.02
    x = torch.randn(8, 768, generator=gen)
    linear = Linear(weight, torch.device("cpu"), torch.float32, 8, int8=True, reduce_range=reduce_range)
    assert linear.int8 is not None and linear.packed is None
    largest, mean = errors(linear(x), x @ weight.t())
    assert 1e-4 < largest < min(0.03, INT8_SELF_CHECK)
    assert mean < 0.03


def test_small_and_non_fp32_weights_stay_as_they_are() -> None:
    """The small (LoRA-sized) matrices are not quantized, nor is a bf16 model."""
    small = Linear(torch.randn(64, 768), torch.device("cpu"), torch.float32, 8, int8=True)
    assert small.int8 is None and small.weight_t is not None
    bf16 = Linear(torch.randn(1024, 768), torch.device("cpu"), torch.bfloat16, 8, int8=True)
    assert bf16.int8 is None


def test_int8_logits_stay_within_the_tolerance(runners: tuple[ModelRunner, ModelRunner]) -> None:
    """Prompt, then decode steps fed the fp32 model's greedy token: the int8 logits stay within
    MAX_REL / MEAN_REL of fp32's, and mostly pick the same token."""
    fp32, int8 = runners
    assert "int8 products (fbgemm, 13 of 13 matrices" in int8.describe_kernels()
    assert "int8" not in fp32.describe_kernels()
    slots, prompts = [0, 1, 2], [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    for runner in runners:
        for slot in slots:
            runner.zero_slot(slot)
    want, got = fp32.prefill(slots, prompts, logits=True), int8.prefill(slots, prompts, logits=True)
    agree = 0
    for _ in range(6):
        assert want is not None and got is not None
        largest, mean = errors(got, want)
        assert 1e-4 < largest < MAX_REL
        assert mean < MEAN_REL
        tokens = want.argmax(-1)
        agree += int((got.argmax(-1) == tokens).sum())
        want, got = fp32.decode(slots, tokens.tolist()), int8.decode(slots, tokens.tolist())
    assert agree >= 14  # of 18; measured 16


def test_int8_states_are_fp32_snapshots(runners: tuple[ModelRunner, ModelRunner]) -> None:
    """An int8 model keeps fp32 states, so snapshots move between the two."""
    fp32, int8 = runners
    fp32.zero_slot(0)
    fp32.prefill([0], [[7, 8, 9]], logits=False)
    snapshot = fp32.export_slot(0)
    int8.load_slot(1, snapshot)
    assert all(torch.equal(a, b) for a, b in zip(int8.export_slot(1), snapshot, strict=True))
    assert {t.dtype for t in snapshot} == {torch.float32}


def test_a_model_without_large_matrices_runs_no_int8_product(tmp_path: Path) -> None:
    """A model too small for int8 products says it runs none (only large matrices are quantized)."""
    path = write_random_model(tmp_path / "s.pth", 7, ModelShape(1, 64, 300), seed=1)
    runner = ModelRunner.load(path, "cpu int8", max_slots=1)
    assert "int8" not in runner.describe_kernels()


def test_self_check_failures_make_one_summary_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Matrices that fail their self-check run in fp32, and the model says so once: one warning
    for all of them (how many of how many, the worst error), and in its kernels line."""
    path = write_random_model(tmp_path / "m.pth", 7, ModelShape(1, 768, 1024), seed=4)
    monkeypatch.setattr(kernels, "INT8_SELF_CHECK", 1e-9)  # nothing passes
    with caplog.at_level(logging.WARNING):
        runner = ModelRunner.load(path, "cpu int8", max_slots=1)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1, warned
    assert warned[0].startswith(
        "int8 self-check: 7 of 7 matrices fell back to fp32 (self-check; worst error "
    )
    assert "int8 asked for, but 7 of 7 matrices fell back to fp32" in runner.describe_kernels()
    assert "oneDNN prepacked" in runner.describe_kernels()


def test_the_int8_report_counts_each_outcome() -> None:
    """Some fell back, some took 7-bit inputs after saturating, the rest as asked."""
    checks = [
        kernels.Int8Check(True, False, 0.01),
        kernels.Int8Check(True, True, 0.2, "8-bit inputs saturated"),
        kernels.Int8Check(False, True, 0.3, "self-check"),
    ]
    line, warning = kernels.int8_report(checks)
    assert line == (
        "int8 products (fbgemm, 2 of 3 matrices, 1 with 7-bit inputs; 1 of 3 matrices fell back to "
        f"fp32 (self-check; worst error 0.30, limit {kernels.INT8_SELF_CHECK}))"
    )
    assert warning is not None and warning.count("int8 self-check") == 1
    assert "1 of 3 saturated with 8-bit inputs (worst error 0.20) and run with 7-bit ones" in warning
    assert kernels.int8_report(checks[:1]) == ("int8 products (fbgemm, 1 of 1 matrices)", None)
    assert kernels.int8_report([]) == (None, None)


# Run under FBGEMM_ENABLE_INSTRUCTIONS=AVX2: fbgemm's AVX2 kernels, whose 16-bit sums of pairs
# saturate on 8-bit inputs, as on a CPU without AVX-512 VNNI (AVX-VNNI ones included).
_AVX2_SCRIPT = """
import json, logging, pathlib, sys
import torch
from engine import kernels
from engine.cpu_features import this_cpu
from engine.kernels import Linear, int8_self_check
from engine.runner import ModelRunner
import engine.models.rwkv7 as rwkv7

records = []
logging.basicConfig(level=logging.WARNING, handlers=[logging.StreamHandler(sys.stderr)])
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger().addHandler(Keep())

gen = torch.Generator().manual_seed(0)
weight = torch.randn(3072, 768, generator=gen) * 0.02
x = torch.randn(8, 768, generator=gen)
x[:, :8] = -40.0  # outlier input channels: most 8-bit inputs near 255
want = x @ weight.t()
def rel(got):
    return float((got - want).abs().max() / want.abs().max())
asked8 = Linear(weight, torch.device("cpu"), torch.float32, 8, int8=True, reduce_range=False)
out = {
    "vnni": this_cpu().vnni,
    "saturated_8bit": int8_self_check(weight, asked8.int8, False),
    "raw_8bit_outliers": rel(torch.ops.quantized.linear_dynamic(x, asked8.int8, False)),
    "asked8_reduce_range": asked8.reduce_range,
    "asked8_problem": asked8.int8_check.problem,
    "asked8_outliers": rel(asked8(x)),
}
path, slots, prompts = pathlib.Path(sys.argv[1]), [0, 1, 2], [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
fp32 = ModelRunner.load(path, "cpu fp32", max_slots=3)
records.clear()
int8 = ModelRunner.load(path, "cpu int8", max_slots=3)  # this_cpu(): no VNNI path, 7-bit inputs
out["warnings_detected"] = list(records)
out["kernels_detected"] = int8.describe_kernels()
for r in (fp32, int8):
    for s in slots:
        r.zero_slot(s)
w, g = fp32.prefill(slots, prompts, logits=True), int8.prefill(slots, prompts, logits=True)
out["model_rel"] = float((g - w).abs().max() / w.abs().max())
# the old mistake: treat this CPU as VNNI (AVX-VNNI was counted), 8-bit inputs on the AVX2 path
rwkv7.this_cpu = lambda: type(this_cpu())(this_cpu().capability, False, False, True)
records.clear()
wrong = ModelRunner.load(path, "cpu int8", max_slots=3)
out["warnings_claimed_vnni"] = list(records)
out["kernels_claimed_vnni"] = wrong.describe_kernels()
for s in slots:
    wrong.zero_slot(s)
g = wrong.prefill(slots, prompts, logits=True)
out["model_rel_claimed_vnni"] = float((g - w).abs().max() / w.abs().max())
print(json.dumps(out))
"""


def test_int8_on_fbgemm_s_avx2_path_is_right_or_says_it_is_not(tmp_path: Path) -> None:
    """Under FBGEMM_ENABLE_INSTRUCTIONS=AVX2 (checked to take effect: 8-bit inputs saturate on the
    self-check's probe), int8 takes 7-bit inputs and stays within the tolerance; a CPU wrongly
    taken for VNNI is caught by the self-check, which moves its matrices to 7-bit inputs with one
    summary warning."""
    path = write_random_model(tmp_path / "m.pth", 7, ModelShape(2, 768, 1024), seed=3)
    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", ENV_SWITCH: "off"}
    run = subprocess.run(
        [sys.executable, "-c", _AVX2_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.splitlines()[-1])
    assert out["vnni"] is False
    assert out["saturated_8bit"] > 0.1  # fbgemm really runs its AVX2 kernels (measured 0.15)
    assert out["raw_8bit_outliers"] > 0.2  # what the review saw (46%); measured 0.51 here
    assert out["asked8_reduce_range"] is True and out["asked8_problem"] == "8-bit inputs saturated"
    assert out["asked8_outliers"] < INT8_SELF_CHECK
    assert out["warnings_detected"] == []
    assert "13 of 13 matrices, 7-bit inputs)" in out["kernels_detected"]
    assert out["model_rel"] < MAX_REL
    assert len(out["warnings_claimed_vnni"]) == 1, out["warnings_claimed_vnni"]
    assert out["warnings_claimed_vnni"][0].startswith("int8 self-check: ")
    assert "saturated with 8-bit inputs" in out["warnings_claimed_vnni"][0]
    assert "7-bit inputs" in out["kernels_claimed_vnni"]
    assert out["model_rel_claimed_vnni"] < MAX_REL
