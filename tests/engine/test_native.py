"""The RWKV-7 CPU step in C (``engine/native.py``, ``engine/csrc/rwkv7_cpu.c``): it computes what
the PyTorch path computes, the same bits for a sequence alone or in any batch, int8 weights close
to fp32; it is built once and cached, and without a compiler (or switched off, or failing its
self-check) the PyTorch path serves."""

from __future__ import annotations

import ctypes
import io
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine import batch_sampler, native
from engine.batch_sampler import sample_batch
from engine.kernels import Linear, quantize_inputs, quantize_rows, quantize_rows_in_chunks
from engine.models import rwkv7
from engine.native import ENV_SWITCH
from engine.runner import ModelRunner
from engine.sampling import SamplingParams
from tools.make_model import ModelShape, write_random_model

CPU = torch.device("cpu")
# the C step against PyTorch on the same fp32 weights: only the order of the sums differs
CLOSE = 1e-4


def has_openmp() -> bool:
    """Whether this torch has OpenMP (the C step links its runtime)."""
    return bool(torch.backends.openmp.is_available())  # type: ignore[no-untyped-call]


def c_step_expected() -> bool:
    """Whether this machine should have the C step: a C compiler and a torch with OpenMP."""
    return has_openmp() and shutil.which(os.environ.get("CC") or "cc") is not None


@pytest.fixture(autouse=True)
def switched_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The C step is on unless a test turns it off (whatever the environment of the run says)."""
    monkeypatch.delenv(ENV_SWITCH, raising=False)


@pytest.fixture(scope="module")
def c_step() -> native.Native:
    """The C step's library: built here, or the tests that need it are skipped where no compiler
    is (a compiler that is there and fails is a failure)."""
    if not c_step_expected():
        pytest.skip("no C compiler (or a torch without OpenMP): the C step is not built here")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(ENV_SWITCH, raising=False)
        loaded = native.load()
    assert loaded.lib is not None, loaded.why_not
    return loaded


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random RWKV-7 model: 3 layers, width 128 (2 heads), vocabulary 1024."""
    return write_random_model(
        tmp_path_factory.mktemp("native") / "m.pth", 7, ModelShape(3, 128, 1024), seed=5
    )


def load(path: Path, strategy: str, *, off: bool = False, max_slots: int = 6) -> ModelRunner:
    """A runner of ``path``, with the C step switched off if asked."""
    with pytest.MonkeyPatch.context() as patch:
        if off:
            patch.setenv(ENV_SWITCH, "off")
        else:
            patch.delenv(ENV_SWITCH, raising=False)
        return ModelRunner.load(path, strategy, max_slots=max_slots)


@pytest.fixture(scope="module")
def runners(c_step: native.Native, small_model: Path) -> dict[str, ModelRunner]:
    """The small model on the C step in fp32 and in int8, and on PyTorch in fp32."""
    return {
        "cpu fp32": load(small_model, "cpu fp32"),
        "cpu int8": load(small_model, "cpu int8"),
        "torch fp32": load(small_model, "cpu fp32", off=True),
    }


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference relative to the largest value."""
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def prompts(count: int, length: int, first: int = 1) -> list[list[int]]:
    """``count`` different prompts of ``length`` tokens."""
    return [[(first + 37 * i + 11 * t) % 1000 + 1 for t in range(length)] for i in range(count)]


# ------------------------------------------------------------------------ the C step vs PyTorch


def test_the_c_step_computes_what_pytorch_computes(runners: dict[str, ModelRunner]) -> None:
    """The same model on the C step and on PyTorch (``RWKV_DISCORD_NATIVE=off``): 3 prompts of 5
    tokens, then 4 greedy decode steps; the logits and the exported states within 1e-4 (relative
    to the largest value), and the same greedy token every step."""
    c, pt = runners["cpu fp32"], runners["torch fp32"]
    assert "C step" in c.describe_kernels()
    assert "C step" not in pt.describe_kernels()
    slots = [0, 1, 2]
    for runner in (c, pt):
        for slot in slots:
            runner.zero_slot(slot)
    got, want = c.prefill(slots, prompts(3, 5), logits=True), pt.prefill(slots, prompts(3, 5), logits=True)
    for _ in range(4):
        assert got is not None and want is not None
        assert relative(got, want) < CLOSE
        tokens = got.argmax(-1)
        assert torch.equal(tokens, want.argmax(-1))
        for slot in slots:
            for a, b in zip(c.export_slot(slot), pt.export_slot(slot), strict=True):
                assert a.shape == b.shape and a.dtype == b.dtype
                assert relative(a, b) < CLOSE
        got, want = c.decode(slots, tokens.tolist()), pt.decode(slots, tokens.tolist())


def test_a_model_of_one_layer_runs_the_c_step(c_step: native.Native, tmp_path: Path) -> None:
    """One layer (no layer mixes in the first layer's value): the C step still agrees with PyTorch."""
    path = write_random_model(tmp_path / "one.pth", 7, ModelShape(1, 64, 300), seed=8)
    c, pt = load(path, "cpu fp32", max_slots=2), load(path, "cpu fp32", off=True, max_slots=2)
    assert "C step" in c.describe_kernels()
    for runner in (c, pt):
        runner.zero_slot(0)
        runner.zero_slot(1)
    got, want = c.prefill([0, 1], prompts(2, 3), logits=True), pt.prefill([0, 1], prompts(2, 3), logits=True)
    assert got is not None and want is not None
    assert relative(got, want) < CLOSE
    assert relative(c.decode([1, 0], [5, 6]), pt.decode([1, 0], [5, 6])) < CLOSE


@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu int8", "cpu bf16"])
def test_part_filled_last_panels_compute_what_pytorch_computes(
    c_step: native.Native, tmp_path: Path, strategy: str
) -> None:
    """Every product's last panel of 16 rows only part filled (a channel mix 520 wide, decay and
    gate LoRA ranks of 24 and 40, a vocabulary of 1,001), so that each epilogue (ReLU squared,
    tanh, sigmoid, the residual's add, the head's set) writes a short row: in fp32 the C step's
    logits are PyTorch's over a prefill and three decode steps; in int8 and bf16 the C step passes
    its own check against PyTorch at load time and serves."""
    if strategy == "cpu bf16" and not c_step.bf16:
        pytest.skip("this CPU has no AVX-512 BF16: cpu bf16 runs PyTorch")
    path = write_random_model(tmp_path / "tails.pth", 7, ModelShape(2, 64, 1001), seed=13)
    weights = torch.load(path, map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(3)
    C, F = 64, 520
    for layer in range(2):
        for name, shape in {
            "att.w1": (C, 24), "att.w2": (24, C), "att.g1": (C, 40), "att.g2": (40, C),
            "ffn.key.weight": (F, C), "ffn.value.weight": (C, F),
        }.items():  # fmt: skip
            weights[f"blocks.{layer}.{name}"] = torch.randn(*shape, generator=gen) * 0.1
    torch.save(weights, path)
    runner = load(path, strategy, max_slots=3)
    assert "C step" in runner.describe_kernels()
    first = runner.model._native_layers[0]  # type: ignore[attr-defined]
    assert (first.ffn_key.rows, first.w1.rows, first.g1.rows, runner.vocab_size) == (F, 24, 40, 1001)
    if strategy != "cpu fp32":
        return
    off = load(path, strategy, off=True, max_slots=3)
    for r in (runner, off):
        for slot in range(3):
            r.zero_slot(slot)
    got, want = (
        runner.prefill([0, 1, 2], prompts(3, 4), logits=True),
        off.prefill([0, 1, 2], prompts(3, 4), logits=True),
    )
    for _ in range(3):
        assert got is not None and want is not None
        assert relative(got, want) < CLOSE
        tokens = want.argmax(-1).tolist()
        got, want = runner.decode([0, 1, 2], tokens), off.decode([0, 1, 2], tokens)


# ------------------------------------------------------------------- independence of the batch


@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu int8"])
def test_a_sequence_gets_the_same_bits_alone_or_in_a_batch(
    runners: dict[str, ModelRunner], strategy: str
) -> None:
    """A sequence's logits and state are bit for bit the same whether its prompt is read alone
    or with 4 other prompts of its length, and whether it is decoded alone or in a batch of 5 with
    other tokens (its slot in the middle; the batch in slot order, then gathered out of order)."""
    runner = runners[strategy]
    assert "C step" in runner.describe_kernels()
    mine, others = prompts(1, 6, first=3)[0], prompts(4, 6, first=500)
    runner.zero_slot(0)
    alone = runner.prefill([0], [mine], logits=True)
    batch = [1, 2, 3, 4, 5]  # mine in slot 3
    for slot in batch:
        runner.zero_slot(slot)
    together = runner.prefill(batch, [*others[:2], mine, *others[2:]], logits=True)
    assert alone is not None and together is not None
    assert torch.equal(alone[0], together[2])
    assert not torch.equal(together[0], together[2])  # the others did read other prompts
    for a, b in zip(runner.export_slot(0), runner.export_slot(3), strict=True):
        assert torch.equal(a, b)

    for step, order in enumerate(([1, 2, 3, 4, 5], [5, 3, 1, 4, 2])):
        token = 40 + step
        alone = runner.decode([0], [token])
        tokens = [token if slot == 3 else 900 + slot for slot in order]
        together = runner.decode(order, tokens)
        assert torch.equal(alone[0], together[order.index(3)])
        for a, b in zip(runner.export_slot(0), runner.export_slot(3), strict=True):
            assert torch.equal(a, b)


def test_wide_int8_panels_that_stay_int8_give_the_same_bits(c_step: native.Native, tmp_path: Path) -> None:
    """'cpu int8' at width 1088 (channel-mix panels of 4352 columns, too wide to be widened to
    float32 for a batch): a sequence's logits are the same bits alone or in a batch of 6 (every
    kind of tile: widened and not, one to six inputs)."""
    path = write_random_model(tmp_path / "wide.pth", 7, ModelShape(1, 1088, 512), seed=13)
    runner = load(path, "cpu int8", max_slots=7)
    slots = [1, 2, 3, 4, 5, 6]
    for slot in [0, *slots]:
        runner.zero_slot(slot)
    alone = runner.decode([0], [7])
    together = runner.decode(slots, [9, 8, 7, 6, 5, 4])
    assert torch.equal(alone[0], together[2])
    assert not torch.equal(together[0], together[2])


def test_the_c_step_gets_the_same_bits_on_any_number_of_threads(runners: dict[str, ModelRunner]) -> None:
    """One thread or three: the same logits and states, bit for bit (each sum in a fixed order)."""
    runner = runners["cpu fp32"]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            runner.zero_slot(0)
            runner.zero_slot(1)
            first = runner.prefill([0, 1], prompts(2, 4), logits=True)
            assert first is not None
            results.append([first, runner.decode([0, 1], [7, 8]), *runner.export_slot(1)])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------- int8 weights


@pytest.mark.parametrize("strategy", ["cpu int8", "cpu bf16"])
def test_reduced_weights_are_close_to_fp32_and_not_equal(
    c_step: native.Native, tmp_path: Path, strategy: str
) -> None:
    """'cpu int8' on the C step (int8 weights, one scale per row) and 'cpu bf16' on it (bf16
    weights, where it is built with AVX-512 BF16; its state in float32) against 'cpu fp32', width
    256, teacher-forced on fp32's greedy tokens: the logits within 5% and not fp32's (above 1e-5),
    most greedy tokens the same."""
    if strategy == "cpu bf16" and not c_step.bf16:
        pytest.skip("this CPU has no AVX-512 BF16: 'cpu bf16' runs PyTorch")
    path = write_random_model(tmp_path / "w.pth", 7, ModelShape(2, 256, 1024), seed=6)
    fp32, int8 = load(path, "cpu fp32", max_slots=3), load(path, strategy, max_slots=3)
    kind = "int8 weights" if strategy == "cpu int8" else "bf16 weights"
    assert kind in int8.describe_kernels() and "C step" in int8.describe_kernels()
    assert "int8" not in fp32.describe_kernels() and "bf16" not in fp32.describe_kernels()
    assert all(t.dtype == torch.float32 for t in int8.export_slot(0))
    slots = [0, 1, 2]
    for runner in (fp32, int8):
        for slot in slots:
            runner.zero_slot(slot)
    want, got = (
        fp32.prefill(slots, prompts(3, 4), logits=True),
        int8.prefill(slots, prompts(3, 4), logits=True),
    )
    agree = 0
    for _ in range(6):
        assert want is not None and got is not None
        assert 1e-5 < relative(got, want) < 0.05
        tokens = want.argmax(-1)
        agree += int((got.argmax(-1) == tokens).sum())
        want, got = fp32.decode(slots, tokens.tolist()), int8.decode(slots, tokens.tolist())
    assert agree >= 14  # of 18


def test_quantize_rows_scales_each_row_by_its_largest_value() -> None:
    """One scale per row, its largest magnitude / 127; every weight back within half a scale; a
    row of zeros stays zeros (its scale clamped above 0)."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(37, 24, generator=gen) * torch.logspace(-3, 1, 37)[:, None]
    weight[5] = 0.0
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and q.shape == weight.shape and scale.dtype == torch.float32
    assert scale.shape == (37,)
    amax = weight.abs().amax(dim=1)
    nonzero = amax > 0
    assert torch.allclose(scale[nonzero], amax[nonzero] / 127, rtol=1e-6, atol=0)
    assert scale[5] > 0 and not q[5].any()
    back = q.float() * scale[:, None]
    assert ((back - weight).abs().amax(dim=1) <= scale / 2 * (1 + 1e-5)).all()
    assert int(q.abs().max()) == 127


def test_the_c_steps_linear_keeps_its_weight_packed() -> None:
    """A Linear for the C step keeps its weight packed (fp32 as it is, int8 with its row scales):
    plain_weight() gives back the fp32 weight exactly, or the int8 one times its scales."""
    weight = torch.randn(40, 24, generator=torch.Generator().manual_seed(2))
    fp32 = Linear(weight, CPU, torch.float32, 4, native=True)
    assert fp32.native is not None and fp32.native.shape == (3, 24, 16) and fp32.native_scale is None
    assert torch.equal(fp32.plain_weight(), weight)
    int8 = Linear(weight, CPU, torch.float32, 4, int8=True, native=True)
    assert int8.native is not None and int8.native.dtype == torch.int8 and int8.native_scale is not None
    q, scale = quantize_rows(weight)
    assert torch.equal(int8.plain_weight(), q.float() * scale[:, None])
    x = torch.randn(3, 24)
    assert torch.allclose(int8(x), x @ (q.float() * scale[:, None]).t())


# -------------------------------------------------------------------------------- packed weights


@pytest.mark.parametrize("shape", [(37, 24), (16, 5), (1, 7), (48, 3)])
def test_pack_and_unpack_round_trip(shape: tuple[int, int]) -> None:
    """pack() gives panels of 16 rows, column by column, the last one padded with zeros; unpack()
    gives the weight back (rows that are not a multiple of 16 included)."""
    rows, cols = shape
    weight = torch.randn(rows, cols)
    packed = native.pack(weight)
    panels = -(-rows // 16)
    assert packed.shape == (panels, cols, 16) and packed.is_contiguous()
    assert torch.equal(packed[0, :, 0], weight[0])  # panel 0, row 0: the first row
    assert torch.equal(packed[(rows - 1) // 16, :, (rows - 1) % 16], weight[-1])
    assert not packed.transpose(1, 2).reshape(panels * 16, cols)[rows:].any()  # the padding: zeros
    assert torch.equal(native.unpack(packed, rows), weight)
    q = quantize_rows(weight)[0]
    assert torch.equal(native.unpack(native.pack(q), rows), q)


def test_the_c_step_packs_from_the_files_tensor_without_changing_a_bit() -> None:
    """A bf16 weight packed straight into float32 is the float32 weight packed; int8 rows
    quantized a few at a time are those quantized all at once (each row is on its own)."""
    weight = torch.randn(53, 40).bfloat16()
    assert torch.equal(native.pack(weight, torch.float32), native.pack(weight.float()))
    q, scale = quantize_rows(weight.float())
    q2, scale2 = quantize_rows_in_chunks(weight, chunk=7)
    assert torch.equal(q, q2) and torch.equal(scale, scale2)


def test_mat_refuses_what_the_c_step_cannot_read() -> None:
    """native.mat() takes pack()'s layout in float32, or in int8 with float32 scales; anything else
    is a ValueError, not a pointer to the wrong bytes."""
    weight = torch.randn(37, 24)
    packed = native.pack(weight)
    m = native.mat(packed, 37, None)
    assert (m.rows, m.cols, m.scale) == (37, 24, None)
    q, scale = quantize_rows(weight)
    qpacked = native.pack(q)
    assert native.mat(qpacked, 37, scale).scale == scale.data_ptr()
    with pytest.raises(ValueError):
        native.mat(weight, 37, None)  # not packed
    with pytest.raises(ValueError):
        native.mat(qpacked, 37, None)  # int8 without its scales
    with pytest.raises(ValueError):
        native.mat(qpacked, 37, scale.double())  # scales of another type
    with pytest.raises(ValueError):
        native.mat(packed, 37, scale)  # float32 weight with scales
    with pytest.raises(ValueError):
        native.mat(packed, 49, None)  # more rows than its panels hold
    with pytest.raises(ValueError):
        native.mat(packed.double(), 37, None)
    with pytest.raises(ValueError):
        native.mat(packed.transpose(0, 1), 37, None)  # not contiguous / not the layout


@pytest.mark.parametrize("shape", [(37, 24), (16, 5), (1, 7), (48, 131)])
def test_pack_bf16_and_unpack_round_trip(shape: tuple[int, int]) -> None:
    """pack_bf16() gives panels of 16 rows with two columns of a row together, rounded to bf16,
    the padding zeros; unpack_bf16() gives the rounded weight back; native.mat() marks it bf16 and
    refuses it with scales or without its columns."""
    rows, cols = shape
    weight = torch.randn(rows, cols)
    packed = native.pack_bf16(weight)
    panels, pairs = -(-rows // 16), -(-cols // 2)
    assert packed.shape == (panels, pairs, 16, 2) and packed.dtype == torch.bfloat16
    assert torch.equal(packed[0, 0, 0, : min(cols, 2)], weight[0, :2].bfloat16())
    wide = packed.transpose(1, 2).reshape(panels * 16, pairs * 2)
    assert not wide[rows:].any() and not wide[:, cols:].any()
    assert torch.equal(native.unpack_bf16(packed, rows, cols), weight.bfloat16())
    assert native.mat(packed, rows, None, cols).layout == native.LAYOUT_BF16
    with pytest.raises(ValueError):
        native.mat(packed, rows, torch.ones(rows), cols)
    with pytest.raises(ValueError):
        native.mat(packed, rows, None)


@pytest.mark.parametrize("shape", [(37, 24), (16, 5), (1, 7), (48, 130)])
def test_pack_vnni_and_unpack_round_trip(shape: tuple[int, int]) -> None:
    """pack_vnni() gives panels of 16 rows with four columns of a row together, each int8 weight
    plus 128 as a byte, the padding (rows and columns) 128, a weight of 0; unpack_vnni() gives the
    weight back."""
    rows, cols = shape
    q = quantize_rows(torch.randn(rows, cols))[0]
    packed = native.pack_vnni(q)
    panels, groups = -(-rows // 16), -(-cols // 4)
    assert packed.shape == (panels, groups, 16, 4) and packed.dtype == torch.uint8 and packed.is_contiguous()
    first = min(cols, 4)
    assert torch.equal(packed[0, 0, 0, :first].to(torch.int16) - 128, q[0, :first].to(torch.int16))
    last = (rows - 1) % 16
    assert int(packed[(rows - 1) // 16, (cols - 1) // 4, last, (cols - 1) % 4]) == int(q[-1, -1]) + 128
    wide = packed.transpose(1, 2).reshape(panels * 16, groups * 4)
    assert bool((wide[rows:] == 128).all()) and bool((wide[:, cols:] == 128).all())
    assert torch.equal(native.unpack_vnni(packed, rows, cols), q)


def test_mat_takes_the_vnni_layout_only_with_its_scales_and_columns() -> None:
    """native.mat() of a pack_vnni() weight: marked vnni, its real column count; without scales or
    columns, or with columns the panels do not hold, a ValueError."""
    q, scale = quantize_rows(torch.randn(37, 30))
    packed = native.pack_vnni(q)
    m = native.mat(packed, 37, scale, 30)
    assert (m.rows, m.cols, m.layout, m.scale) == (37, 30, native.LAYOUT_VNNI, scale.data_ptr())
    assert native.mat(native.pack(q), 37, scale).layout == native.LAYOUT_PANELS
    for bad in ((None, 30), (scale, None), (scale, 34), (scale.double(), 30)):
        with pytest.raises(ValueError):
            native.mat(packed, 37, *bad)
    with pytest.raises(ValueError):
        native.mat(packed, 49, scale, 30)  # more rows than its panels hold


def test_quantize_inputs_rounds_each_block_of_64_columns_on_its_own() -> None:
    """Each row's blocks of 64 columns get their own scale (largest magnitude / 127): every value
    within half a step of it, a block's largest kept exactly; a block of zeros stays zeros; a row
    whose width is not a multiple of 64 keeps its width."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 150, generator=gen)
    x[1, 64:128] = 0.0
    x[2, :64] *= 1000.0  # a block a thousand times larger leaves the others' steps alone
    got = quantize_inputs(x)
    assert got.shape == x.shape and got.dtype == torch.float32
    for row in range(3):
        for start in range(0, 150, 64):
            block, back = x[row, start : start + 64], got[row, start : start + 64]
            step = float(block.abs().max()) / 127
            assert float((back - block).abs().max()) <= step / 2 * (1 + 1e-5)
            if step:
                k = int(block.abs().argmax())
                assert abs(float(back[k] - block[k])) <= abs(float(block[k])) * 1e-6
    assert not got[1, 64:128].any()
    assert float((got[2, 64:] - x[2, 64:]).abs().max()) < 0.05


@pytest.mark.parametrize("inputs", ["int8", "bf16"])
def test_the_products_on_rounded_inputs_are_those_of_round_inputs(c_step: native.Native, inputs: str) -> None:
    """On a CPU with AVX-512 VNNI, the head's int8 product on 8-bit inputs, and with AVX-512 BF16
    its bf16 product (rows and columns not multiples of 16, 4, 2 or 64; one to seven inputs: each
    kind of tile), is PyTorch's product of the inputs rounded the same way (quantize_inputs(), or
    to bf16) and the weight it holds (int8 times its scales, or bf16), to float32 rounding."""
    if not (c_step.vnni if inputs == "int8" else c_step.bf16):
        pytest.skip(f"this CPU has no AVX-512 {'VNNI' if inputs == 'int8' else 'BF16'}")
    assert c_step.lib is not None
    gen = torch.Generator().manual_seed(4)
    for rows, cols in ((37, 30), (80, 131), (300, 256)):
        weight = torch.randn(rows, cols, generator=gen)
        lin = Linear(
            weight,
            CPU,
            torch.float32,
            4,
            int8=inputs == "int8",
            native=True,
            vnni=True,
            bf16=inputs == "bf16",
        )
        assert lin.native is not None and lin.native_inputs == inputs
        if inputs == "bf16":
            assert torch.equal(lin.plain_weight(), weight.bfloat16().float())
        m = lin.native_mat()
        ones, zeros = torch.ones(cols), torch.zeros(cols)
        for batch in (1, 2, 5, 7):
            x = torch.randn(batch, cols, generator=gen)
            out = torch.empty(batch, rows)
            work = torch.empty(int(c_step.lib.rwkv7_workspace(batch, cols, 0, 0)))
            c_step.lib.rwkv7_head(
                ctypes.addressof(m), native.ptr(ones), native.ptr(zeros), batch, cols,
                native.ptr(x), native.ptr(out), native.ptr(work), 2,
            )  # fmt: skip
            h = torch.nn.functional.layer_norm(x, (cols,), ones, zeros)
            want = torch.nn.functional.linear(lin.round_inputs(h), lin.plain_weight())
            assert relative(out, want) < 1e-5
            assert relative(out, torch.nn.functional.linear(h, lin.plain_weight())) > 1e-4  # rounded inputs


# ---------------------------------------------------------------------------- the sampler's top-k


def test_topk_is_torchs_in_one_pass(c_step: native.Native) -> None:
    """native.topk gives torch.topk's values, highest first, and its ids where the values differ
    (random logits and their probabilities, 1 to 64 of 65,536 and all of 9); equal values rank by
    the lower id first, so k = 1 is torch.argmax even on ties; infinities are values like others."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(5, 65536, generator=gen) * 3
    for x in (logits, torch.softmax(logits, -1), torch.randn(3, 9, generator=gen)):
        for k in (1, 2, 64) if x.shape[1] > 64 else (1, 2, x.shape[1]):
            got, want = native.topk(x, k), torch.topk(x, k, dim=-1)
            assert got is not None
            assert torch.equal(got[0], want.values)
            assert torch.equal(got[1], want.indices)
            assert got[1].dtype == torch.long
    ties = torch.tensor(
        [[1.0, 3.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0], [-math.inf] * 4, [5, math.inf, 1, math.inf]]
    )
    got = native.topk(ties, 2)
    assert got is not None
    assert got[1].tolist() == [[1, 2], [0, 1], [0, 1], [1, 3]]
    assert torch.equal(got[1][:, 0], ties.argmax(-1))


def test_topk_leaves_a_nan_and_what_it_cannot_take_to_torch(c_step: native.Native) -> None:
    """A row with a NaN (torch ranks it highest), another dtype, a k beyond the row: None, and
    the sampler's own helpers then give torch's answer."""
    x = torch.randn(3, 300)
    x[1, 17] = math.nan
    assert native.topk(x, 4) is None
    assert native.topk(x.double(), 4) is None
    assert native.topk(x[:, :3], 4) is None
    assert torch.equal(batch_sampler._argmax(x), x.argmax(-1))
    assert batch_sampler._argmax(x)[1] == 17
    _, ids = batch_sampler._topk(x, 4)
    assert torch.equal(ids, torch.topk(x, 4, dim=-1).indices)


def test_the_sampler_picks_the_same_tokens_with_and_without_the_library(
    c_step: native.Native, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sample_batch with the library's top-k and argmax, and with torch's (RWKV_DISCORD_NATIVE=off):
    the same tokens for greedy and drawn rows, one of them flat enough to need the 1,024 stage."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 65536, generator=gen) * 4
    logits[5] = torch.randn(65536, generator=gen) * 0.01  # flat: its cut lies beyond the top 64
    sampling = [
        SamplingParams(top_p=0.0),
        SamplingParams(temperature=1.0, top_p=0.3),
        SamplingParams(temperature=0.7, top_p=0.9, top_k=40),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, top_p=0.5),
        SamplingParams(temperature=1.0, top_p=0.02),
    ]
    keys = [(7, i) for i in range(6)]

    def draw() -> list[int]:
        generators = [torch.Generator().manual_seed(i) for i in range(6)]
        return sample_batch(logits, sampling, generators, keys)

    served: list[int] = []  # the k of each top-k the library answered
    real = native.topk

    def counted(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        got = real(x, k)
        if got is not None:
            served.append(k)
        return got

    monkeypatch.setattr(native, "topk", counted)
    with_library = draw()
    assert sorted(set(served)) == [1, 64, 1024]  # greedy rows, drawn rows, the flat row's second stage
    served.clear()
    monkeypatch.setenv(ENV_SWITCH, "off")
    assert draw() == with_library
    assert not served
    assert with_library[0] == int(logits[0].argmax()) and with_library[3] == int(logits[3].argmax())


# ------------------------------------------------------------------------- without the C step


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No library loaded in this process yet, and an empty cache folder (both restored after)."""
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    yield tmp_path / "cache" / "rwkv-discord" / "native"


def test_without_a_compiler_pytorch_runs_the_model(
    fresh: Path, monkeypatch: pytest.MonkeyPatch, small_model: Path
) -> None:
    """No compiler: load() says so, naming it; a model loaded then runs PyTorch, and decodes."""
    monkeypatch.setenv("CC", "/nonexistent/cc")
    loaded = native.load()
    assert loaded.lib is None
    assert loaded.why_not is not None and "no C compiler" in loaded.why_not
    assert "/nonexistent/cc" in loaded.why_not
    assert loaded.describe().startswith("no C step (")
    runner = load(small_model, "cpu fp32", max_slots=1)
    assert "C step" not in runner.describe_kernels()
    runner.zero_slot(0)
    logits = runner.decode([0], [5])
    assert logits.shape == (1, 1024) and bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("value", ["off", "OFF", " Off ", "0", "no", "false"])
def test_the_switch_turns_the_c_step_off_at_every_load(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """RWKV_DISCORD_NATIVE=off (0, no, false; any case) gives no library, saying why; it is read at
    every load(), so unsetting it brings the C step back."""
    monkeypatch.setenv(ENV_SWITCH, value)
    loaded = native.load()
    assert loaded.lib is None
    assert loaded.why_not is not None and ENV_SWITCH in loaded.why_not
    monkeypatch.setenv(ENV_SWITCH, "on")
    assert ENV_SWITCH not in (native.load().why_not or "")
    monkeypatch.delenv(ENV_SWITCH)
    if c_step_expected():
        assert native.load().lib is not None


def test_a_compiler_that_fails_leaves_pytorch_and_no_partial_files(
    fresh: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A compiler that exits 1: no library, 'could not build it (...)' with its message, and
    nothing half-built left in the cache folder."""
    cc = tmp_path / "broken-cc"
    cc.write_text("#!/bin/sh\necho 'broken-cc: internal error' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    loaded = native.load()
    assert loaded.lib is None
    assert loaded.why_not is not None and loaded.why_not.startswith("could not build it")
    assert "broken-cc: internal error" in loaded.why_not
    assert fresh.is_dir() and list(fresh.iterdir()) == []


# ---------------------------------------------------------------------------------- self-check


def fallback_and_off(
    path: Path, strategy: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> tuple[ModelRunner, ModelRunner]:
    """``path`` loaded with a C-step self-check nothing passes (checking the one warning), and
    loaded with RWKV_DISCORD_NATIVE=off; both with 2 prompts of 5 tokens read."""
    monkeypatch.setattr(rwkv7, "NATIVE_SELF_CHECK", -1.0)
    monkeypatch.setattr(rwkv7, "NATIVE_SELF_CHECK_ROUNDED", -1.0)
    with caplog.at_level(logging.WARNING):
        runner = load(path, strategy, max_slots=2)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1, warned
    assert warned[0].startswith("the C step disagrees with PyTorch")
    assert "PyTorch runs this model" in warned[0]
    off = load(path, strategy, off=True, max_slots=2)
    return runner, off


def logits_of_both(runner: ModelRunner, off: ModelRunner) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(runner's, off's) logits of the same 2 prompts, then of one decode step."""
    for r in (runner, off):
        r.zero_slot(0)
        r.zero_slot(1)
    got, want = (
        runner.prefill([0, 1], prompts(2, 5), logits=True),
        off.prefill([0, 1], prompts(2, 5), logits=True),
    )
    assert got is not None and want is not None
    return [(got, want), (runner.decode([0, 1], [3, 4]), off.decode([0, 1], [3, 4]))]


@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu int8"])
def test_a_c_step_that_fails_its_self_check_gives_way_to_pytorch(
    c_step: native.Native,
    small_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    strategy: str,
) -> None:
    """With a self-check nothing passes, loading warns once and the model runs PyTorch: no C step
    in its kernels; in fp32 the logits of a model loaded with RWKV_DISCORD_NATIVE=off (within 1e-4),
    in int8 within int8's error of them."""
    runner, off = fallback_and_off(small_model, strategy, monkeypatch, caplog)
    assert "C step" not in runner.describe_kernels()
    assert "int8 weights" not in runner.describe_kernels()
    for got, want in logits_of_both(runner, off):
        assert relative(got, want) < (CLOSE if strategy == "cpu fp32" else 0.05)


def test_a_small_int8_model_that_fails_the_self_check_matches_one_switched_off(
    c_step: native.Native,
    small_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """'cpu int8' on a model too small for fbgemm, after the C step fails its self-check: the
    logits of the same model loaded with RWKV_DISCORD_NATIVE=off (fp32 matrices), within 1e-4."""
    runner, off = fallback_and_off(small_model, "cpu int8", monkeypatch, caplog)
    for got, want in logits_of_both(runner, off):
        assert relative(got, want) < CLOSE


def test_an_int8_model_that_fails_the_self_check_runs_fbgemm(
    c_step: native.Native, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """'cpu int8' at width 768 (every matrix large enough for fbgemm) whose C step fails its
    self-check runs the PyTorch path's int8 products (not fp32): the logits of the same model
    loaded with RWKV_DISCORD_NATIVE=off (measured: the same bits)."""
    path = write_random_model(tmp_path / "w.pth", 7, ModelShape(1, 768, 1024), seed=9)
    runner, off = fallback_and_off(path, "cpu int8", monkeypatch, caplog)
    kernels = runner.describe_kernels()
    assert "C step" not in kernels and "int8 products (fbgemm, 7 of 7 matrices" in kernels
    for got, want in logits_of_both(runner, off):
        assert relative(got, want) < CLOSE


# ------------------------------------------------------------------------------------ the cache


def test_the_build_is_cached_and_whole(fresh: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The first load() builds rwkv7_cpu-<key>.so in $XDG_CACHE_HOME/rwkv-discord/native; a second
    process-fresh load() finds it and does not compile again; no *.part file is left behind."""
    real = shutil.which(os.environ.get("CC") or "cc")
    if real is None or not has_openmp():
        pytest.skip("no C compiler (or a torch without OpenMP)")
    calls = tmp_path / "calls"
    cc = tmp_path / "cc"
    cc.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\nexec "{real}" "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))

    first = native.load()
    assert first.lib is not None, first.why_not
    built = sorted(p.name for p in fresh.iterdir())
    assert len(built) == 1 and re.fullmatch(r"rwkv7_cpu-[0-9a-f]{16}\.so", built[0]), built
    compiles = [line for line in calls.read_text().splitlines() if "--version" not in line]
    assert len(compiles) == 1
    stamp = (fresh / built[0]).stat().st_mtime_ns

    monkeypatch.setattr(native, "_loaded", {})
    second = native.load()
    assert second.lib is not None and second is not first
    assert sorted(p.name for p in fresh.iterdir()) == built  # no *.part, no second build
    assert (fresh / built[0]).stat().st_mtime_ns == stamp
    assert [line for line in calls.read_text().splitlines() if "--version" not in line] == compiles
    assert native.load() is second  # cached in the process too


def test_cpus_of_one_name_and_other_instructions_get_builds_of_their_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The build's key tells CPUs apart by their instruction sets, not only by their name (a
    virtual machine says 'AMD EPYC' on every generation; an AVX-512 build would crash on a CPU
    without it)."""
    keys = []
    for flags in ("fpu sse2 avx2 fma", "fpu sse2 avx2 fma avx512f avx512bw"):
        text = f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n"
        monkeypatch.setattr(native, "open", lambda *a, text=text, **k: io.StringIO(text), raising=False)
        keys.append(native._cpu_key())
    assert keys[0] != keys[1]


def test_large_packed_weights_start_on_huge_page_boundaries() -> None:
    """A packed weight of 1 MB or more starts on a 2 MB boundary (its pages asked to be huge ones),
    holds the weight exactly, and a small one is an ordinary tensor."""
    big = torch.randn(1024, 768)  # 3 MB
    packed = native.pack(big)
    assert packed.data_ptr() % (2 << 20) == 0
    assert torch.equal(native.unpack(packed, 1024), big)
    weight = torch.randn(64, 64)  # 16 KB
    small = native.pack(weight)
    assert small.is_contiguous() and small.untyped_storage().nbytes() == weight.numel() * 4
    assert torch.equal(native.unpack(small, 64), weight)


def test_layers_of_other_widths_get_scratch_space_of_their_own(c_step: native.Native, tmp_path: Path) -> None:
    """A model whose second layer has a larger decay LoRA rank and a wider channel mix than its
    first (PyTorch runs such files) runs the C step with room for every layer: the same logits as
    PyTorch's, and a scratch space as large as its widest layer needs."""
    path = write_random_model(tmp_path / "mixed.pth", 7, ModelShape(2, 64, 256), seed=21)
    weights = torch.load(path, map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(2)
    C = 64
    weights["blocks.1.att.w1"] = torch.randn(C, 160, generator=gen) * 0.1
    weights["blocks.1.att.w2"] = torch.randn(160, C, generator=gen) * 0.1
    weights["blocks.1.ffn.key.weight"] = torch.randn(8 * C, C, generator=gen) * 0.1
    weights["blocks.1.ffn.value.weight"] = torch.randn(C, 8 * C, generator=gen) * 0.1
    torch.save(weights, path)
    runner, off = load(path, "cpu fp32"), load(path, "cpu fp32", off=True)
    assert "C step" in runner.describe_kernels()
    for r in (runner, off):
        r.zero_slot(0)
        r.zero_slot(1)
    chunks = prompts(2, 5)
    got, want = runner.prefill([0, 1], chunks, logits=True), off.prefill([0, 1], chunks, logits=True)
    assert got is not None and want is not None and relative(got, want) < CLOSE
    lib = c_step.lib
    assert lib is not None
    first, second = runner.model._native_layers  # type: ignore[attr-defined]
    assert second.w1.rows == 160 and second.ffn_key.rows == 8 * C

    def needs(s: native.LayerStruct, lora_v: int) -> int:
        return int(lib.rwkv7_workspace(10, C, s.ffn_key.rows, s.w1.rows + s.a1.rows + s.g1.rows + lora_v))

    assert needs(first, 0) < needs(second, second.v1.rows)  # sized by the first layer, it overflowed
    assert runner.model._work.numel() >= needs(second, second.v1.rows)  # type: ignore[attr-defined]


def test_only_the_dtypes_the_c_step_reads_reach_it() -> None:
    """native.ptr refuses other dtypes (the C step reads float32, int8, uint8 (int8 plus 128) or
    bf16 memory)."""
    for dtype in (torch.float64, torch.float16, torch.int32):
        with pytest.raises(ValueError, match="float32 or int8"):
            native.ptr(torch.zeros(4, dtype=dtype))
    for dtype in (torch.float32, torch.int8, torch.uint8, torch.bfloat16):
        assert native.ptr(torch.zeros(4, dtype=dtype))


def test_another_default_dtype_changes_nothing(c_step: native.Native, small_model: Path) -> None:
    """A process whose torch default dtype is float64 loads and runs the C step as usual: its own
    buffers are float32 whatever the default."""
    normal = load(small_model, "cpu fp32")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        other = load(small_model, "cpu fp32")
        assert "C step" in other.describe_kernels()
        results = []
        for r in (normal, other):
            r.zero_slot(0)
            results.append(r.prefill([0], prompts(1, 4), logits=True))
    finally:
        torch.set_default_dtype(previous)
    assert results[0] is not None and results[1] is not None
    assert torch.equal(results[0], results[1])


def test_the_c_step_shares_torchs_openmp_runtime_or_stays_out(
    fresh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built here, the library brings no OpenMP runtime of its own (torch's libgomp serves both);
    one that would (a compiler with another OpenMP) is not used, and load() says why."""
    if not c_step_expected():
        pytest.skip("no C compiler (or a torch without OpenMP)")
    before = native._openmp_runtimes()
    assert native.load().lib is not None
    assert native._openmp_runtimes() == before and any(n.startswith("libgomp") for n in before)
    monkeypatch.setattr(native, "_loaded", {})
    calls = iter([set(), {"libomp.so.5"}])
    monkeypatch.setattr(native, "_openmp_runtimes", lambda: next(calls))
    refused = native.load()
    assert refused.lib is None and refused.why_not == "it would run a second OpenMP runtime (libomp.so.5)"


def test_a_compiler_given_with_words_of_its_own_is_used(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CC may hold a command with arguments (CC="ccache gcc"): here "env cc"."""
    if not c_step_expected() or shutil.which("env") is None:
        pytest.skip("no C compiler (or a torch without OpenMP)")
    monkeypatch.setenv("CC", f"env {shutil.which('cc')}")
    assert native.load().lib is not None


def cpu_flags() -> set[str]:
    """The first CPU's feature flags (Linux; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# C step builds on an AVX2 CPU: the compiler's extra words, and the AVX-512 flags the build needs
BUILDS = {
    "avx2": ("-mno-avx512f", set()),
    "vnni": ("-mno-avx512bf16", {"avx512f", "avx512bw", "avx512_vnni"}),
    "bf16": ("-mno-avx512vnni", {"avx512f", "avx512bw", "avx512_bf16"}),
    "both": ("", {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}),
}


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_products_take_rounded_inputs_only_where_built_for_them(
    fresh: Path, monkeypatch: pytest.MonkeyPatch, small_model: Path, build: str
) -> None:
    """Built without AVX-512 (CC="cc -mno-avx512f", on any AVX2 CPU), 'cpu int8' keeps float32
    inputs and 'cpu bf16' runs PyTorch; built with AVX-512 VNNI, 'cpu int8''s products take 8-bit
    inputs; with AVX-512 BF16, 'cpu bf16' runs the C step on bf16 weights. Their kernels say which,
    the self-check passes, and a sequence gets the same bits alone or in a batch."""
    flags = cpu_flags()
    words, needs = BUILDS[build]
    if not c_step_expected() or "avx2" not in flags or shutil.which("cc") is None:
        pytest.skip("no C compiler, or not an AVX2 CPU")
    if not needs <= flags:
        pytest.skip(f"this CPU lacks {sorted(needs - flags)}")
    monkeypatch.setenv("CC", f"{shutil.which('cc')} {words}".strip())
    loaded = native.load()
    assert loaded.lib is not None, loaded.why_not
    vnni, bf16 = "avx512_vnni" in needs, "avx512_bf16" in needs
    assert (loaded.vnni, loaded.bf16) == (vnni, bf16)
    assert loaded.simd == ", ".join(
        ["AVX2", *(["AVX-512 VNNI"] if vnni else []), *(["AVX-512 BF16"] if bf16 else [])]
    )
    for strategy in ("cpu int8", "cpu bf16"):
        runner = load(small_model, strategy, max_slots=4)
        kernels = runner.describe_kernels()
        if strategy == "cpu int8":
            assert "C step" in kernels and "int8 weights" in kernels
            assert ("8-bit inputs" in kernels) is vnni
        else:
            assert ("C step" in kernels) is bf16, kernels
            assert ("bf16 weights" in kernels) is bf16
            if not bf16:
                continue  # PyTorch in bf16, as before
        for slot in range(4):
            runner.zero_slot(slot)
        alone = runner.prefill([0], prompts(1, 5), logits=True)
        together = runner.prefill([1, 2, 3], [*prompts(2, 5, first=300), *prompts(1, 5)], logits=True)
        assert alone is not None and together is not None
        assert torch.equal(alone[0], together[2])
        assert torch.equal(runner.decode([0], [9])[0], runner.decode([3, 1, 2], [9, 4, 5])[0])
