"""Fast paths under the model math, each checked against the plain path before it is used.

- :class:`Linear`: ``x @ W`` for a weight stored ``[out, in]``; on the CPU in float32 the large
  ones use oneDNN with prepacked weights (plain ``x @ W`` repacks the weight on every call, which
  costs more than the product at batch 32), or, asked for (``'cpu int8'``), fbgemm's dynamic int8
  product: the weight in int8 with one scale per output row, the input quantized to 8 bits with
  one scale per call (over the whole batch, so a sequence's outputs depend slightly on the others
  in its batch), int32 accumulation, float32 out; each matrix is checked on loading against
  fp32 (random inputs, and inputs at the ends of their range, which saturate fbgemm's 16-bit sums
  of pairs where 8-bit inputs meet its AVX2 / AVX-512 kernels): one that fails with 8-bit inputs
  is retried with 7-bit ones, then left in fp32 (:func:`int8_report` sums that up in one line);
- :func:`load_fla`: ``fla-core``'s fused recurrent RWKV-7 kernel, when it can be imported and
  agrees with the model's plain recurrence on a self-check (run in place on the slots where
  fla-core 0.6's kernel can be called directly). The plain path is always the fallback.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_PACK_MIN_NUMEL = 1 << 19  # oneDNN-prepack CPU fp32 weights at least this large (the head always is)
# An int8 product's relative error (of the largest output of a probe) beyond which its self-check
# refuses it. Measured on Gaussian weights of the engine's shapes ([3072, 768], [768, 3072],
# [768, 768], [65536, 768]): 0.4% to 2.2% where nothing saturates (with 7-bit or 8-bit inputs,
# 3.9% for a cubed-Gaussian weight with 7-bit inputs); 13% to 21% on the saturation probe with
# 8-bit inputs under FBGEMM_ENABLE_INSTRUCTIONS=AVX2.
INT8_SELF_CHECK = 0.05

# The recurrence of RWKV-7 over a batch of states: (states, r=, log_w=, k=, v=, kk=, a=[, packed=])
# -> (outputs, final states).
Recurrence = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class Linear:
    """``x @ W`` for a weight stored ``[out, in]`` in the file (the package transposes it too);
    ``int8``: a large one on the CPU in float32 runs as an int8 product (``reduce_range``: 7-bit
    inputs, for CPUs without VNNI, whose 16-bit sums of pairs could saturate)."""

    def __init__(
        self,
        weight: torch.Tensor,
        device: torch.device,
        dtype: torch.dtype,
        batch_hint: int,
        *,
        int8: bool = False,
        reduce_range: bool = True,
        native: bool = False,
        vnni: bool = False,
        bf16: bool = False,
    ):
        self.packed: torch.Tensor | None = None
        self.weight_t: torch.Tensor | None = None
        self.int8: Any = None  # fbgemm's packed int8 weight
        self.int8_check: Int8Check | None = None  # how the int8 product asked for came out
        self.reduce_range = reduce_range
        # the C step's weight (engine.native): packed, float32 or int8 with its row scales;
        # ``vnni``: int8 in the layout of its products on 8-bit inputs (engine.native.pack_vnni);
        # ``bf16``: rounded to bf16, its products on bf16 inputs (engine.native.pack_bf16)
        self.native: torch.Tensor | None = None
        self.native_scale: torch.Tensor | None = None
        self.native_inputs = "float32"  # what the C step rounds this product's inputs to: int8, bf16
        self.rows, self.cols = int(weight.shape[0]), int(weight.shape[1])
        if native and device.type == "cpu" and dtype == torch.float32:
            from engine.native import pack, pack_bf16, pack_vnni

            # from the file's tensor, with no float32 copy of the whole matrix on the way (a
            # bf16 file's head is 0.5 GB in float32 at 1.5B)
            if int8:
                q, self.native_scale = quantize_rows_in_chunks(weight)
                self.native = pack_vnni(q) if vnni else pack(q)
                self.native_inputs = "int8" if vnni else "float32"
            elif bf16:
                self.native, self.native_inputs = pack_bf16(weight), "bf16"
            else:
                self.native = pack(weight, torch.float32)
            return
        w = weight.to(device=device, dtype=dtype)
        if device.type == "cpu" and dtype == torch.float32 and w.numel() >= _PACK_MIN_NUMEL:
            if int8:
                self.int8, self.int8_check = _int8_pack(w.contiguous(), reduce_range)
                self.reduce_range = self.int8_check.reduce_range
            if self.int8 is None:
                self.packed = _onednn_pack(w.contiguous(), batch_hint)
        if self.packed is None and self.int8 is None:
            self.weight_t = w.t().contiguous()  # [in, out]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:  # the C step's weights, in PyTorch (its self-check)
            return F.linear(self.round_inputs(x), self.plain_weight())
        if self.int8 is not None:
            out_q: torch.Tensor = torch.ops.quantized.linear_dynamic(x, self.int8, self.reduce_range)
            return out_q
        if self.packed is not None:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
            return out
        assert self.weight_t is not None
        return x @ self.weight_t

    def plain_weight(self, rows: int | None = None) -> torch.Tensor:
        """The C step's weight as a float32 ``[out, in]`` matrix (int8: times its scales); its
        first ``rows`` rows only, if given (only those are unpacked)."""
        from engine.native import PANEL, unpack, unpack_bf16, unpack_vnni

        assert self.native is not None
        n = self.rows if rows is None else min(rows, self.rows)
        panels = self.native[: -(-n // PANEL)]
        if self.native_inputs == "int8":
            w = unpack_vnni(panels, n, self.cols)
        elif self.native_inputs == "bf16":
            w = unpack_bf16(panels, n, self.cols).float()
        else:
            w = unpack(panels, n)
        return w.float() * self.native_scale[:n, None] if self.native_scale is not None else w

    def round_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the C step's product sees it: rounded to 8 bits (:func:`quantize_inputs`) or to
        bf16 where it rounds them, as it is elsewhere."""
        if self.native_inputs == "int8":
            return quantize_inputs(x)
        if self.native_inputs == "bf16":
            return x.to(torch.bfloat16).float()
        return x

    def native_mat(self) -> Any:
        """The C step's :class:`engine.native.Mat` of this weight."""
        from engine.native import mat

        assert self.native is not None
        cols = self.cols if self.native_inputs != "float32" else None
        return mat(self.native, self.rows, self.native_scale, cols)


INPUT_BLOCK = 64  # columns of an input sharing one scale in the C step's products on 8-bit inputs


def quantize_inputs(x: torch.Tensor) -> torch.Tensor:
    """``x`` [..., K] as the C step's int8 products on 8-bit inputs see it (AVX-512 VNNI): each
    row's blocks of 64 columns rounded to 8 bits with the block's own scale (its largest magnitude
    / 127), the same roundings as the C code's (half to even), back in float32."""
    K = x.shape[-1]
    blocks = -(-K // INPUT_BLOCK)
    padded = F.pad(x.float(), (0, blocks * INPUT_BLOCK - K)).reshape(*x.shape[:-1], blocks, INPUT_BLOCK)
    amax = padded.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(padded * inv).clamp(-127, 127)
    return (q * (amax / 127.0)).reshape(*x.shape[:-1], blocks * INPUT_BLOCK)[..., :K]


def quantize_rows_in_chunks(weight: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` of any float ``[out, in]`` weight, ``chunk`` rows at a time in
    float32 (the same values: each row is quantized on its own)."""
    rows = int(weight.shape[0])
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    for start in range(0, rows, chunk):
        q[start : start + chunk], scale[start : start + chunk] = quantize_rows(
            weight[start : start + chunk].float()
        )
    return q, scale


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An ``[out, in]`` float32 weight in int8, symmetric, one float32 scale per output row."""
    scale = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12)
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.float().contiguous()


@dataclass(frozen=True)
class Int8Check:
    """How one matrix's int8 product came out on loading."""

    used: bool  # False: it runs in fp32
    reduce_range: bool  # 7-bit inputs
    error: float  # the worst relative error of its self-check (nan: not run)
    problem: str | None = None  # why it runs in fp32, or why 7-bit inputs replaced 8-bit ones


def _int8_pack(weight: torch.Tensor, reduce_range: bool) -> tuple[Any, Int8Check]:
    """fbgemm's packed int8 copy of an ``[out, in]`` float32 weight (symmetric, one scale per
    output row), or None where the quantized ops are missing or fail their self-check; with 8-bit
    inputs (``reduce_range`` False) that fail it, 7-bit ones are tried before giving up. Logs
    nothing: the model sums its matrices up in one line (:func:`int8_report`)."""
    try:
        q, scale = quantize_rows(weight)
        zero = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # torch marks its quantized tensors as deprecated
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
            packed = torch.ops.quantized.linear_prepack(qweight, None)
        error = int8_self_check(weight, packed, reduce_range)
        if error <= INT8_SELF_CHECK:
            return packed, Int8Check(True, reduce_range, error)
        if not reduce_range:
            error7 = int8_self_check(weight, packed, True)
            if error7 <= INT8_SELF_CHECK:
                return packed, Int8Check(True, True, error, "8-bit inputs saturated")
            error = max(error, error7)
        return None, Int8Check(False, reduce_range, error, "self-check")
    except (RuntimeError, AttributeError) as exc:  # a build without fbgemm, or a later torch
        return None, Int8Check(False, reduce_range, math.nan, f"not available in this torch ({exc})")


def int8_self_check(weight: torch.Tensor, packed: Any, reduce_range: bool) -> float:
    """The worst relative error (of each probe's largest output) of an int8 product against fp32
    on two probes, each quantized on its own (the input's range is per call): random inputs, and
    inputs all at the top of their range but one at the bottom. The second makes every 8-bit input
    255, the worst case for the 16-bit sums of pairs of products in fbgemm's AVX2 and AVX-512
    kernels (255 * 127 * 2 > 32767): where they saturate it shows as 10% and more; 7-bit inputs
    and the AVX-512 VNNI kernels (32-bit sums) do not saturate."""
    n_in = weight.shape[1]
    random = torch.randn(4, n_in, generator=torch.Generator().manual_seed(0))
    ends = torch.ones(2, n_in)
    ends[0, 0] = ends[1, -1] = -1.0
    worst = 0.0
    for probe in (random, ends):
        got = torch.ops.quantized.linear_dynamic(probe, packed, reduce_range)
        want = probe @ weight.t()
        worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp_min(1e-30)))
    return worst


def int8_report(checks: Sequence[Int8Check]) -> tuple[str | None, str | None]:
    """A model's int8 matrices summed up: the part of the kernels line (None: no matrix was large
    enough to be asked), and the one warning to log (None: every matrix runs as asked)."""
    if not checks:
        return None, None
    total, used = len(checks), [c for c in checks if c.used]
    refused = [c for c in checks if not c.used]
    retried = [c for c in used if c.problem is not None]
    notes = []
    if refused:
        why = sorted({c.problem for c in refused if c.problem})
        errors = [c.error for c in refused if not math.isnan(c.error)]
        if errors:
            why.append(f"worst error {max(errors):.2f}, limit {INT8_SELF_CHECK}")
        notes.append(f"{len(refused)} of {total} matrices fell back to fp32 ({'; '.join(why)})")
    if retried:
        worst8 = max(c.error for c in retried)
        notes.append(
            f"{len(retried)} of {total} saturated with 8-bit inputs (worst error {worst8:.2f}) "
            "and run with 7-bit ones"
        )
    seven = sum(c.reduce_range for c in used)
    if not used:
        line = f"int8 asked for, but {notes[0]}"
    else:
        bits = ", 7-bit inputs" if seven == len(used) else f", {seven} with 7-bit inputs" if seven else ""
        line = f"int8 products (fbgemm, {len(used)} of {total} matrices{bits}"
        line += f"; {notes[0]})" if refused else ")"
    warning = "int8 self-check: " + "; ".join(notes) if notes else None
    return line, warning


def _onednn_pack(weight: torch.Tensor, batch_hint: int) -> torch.Tensor | None:
    """A oneDNN-prepacked copy of an ``[out, in]`` float32 weight, or None where that is missing."""
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return None
    try:
        packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        probe = torch.randn(2, weight.shape[1])
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
        if not torch.allclose(got, probe @ weight.t(), rtol=1e-4, atol=1e-4):
            return None
        return packed
    except (RuntimeError, AttributeError):  # an old or unusual build: plain matmul instead
        return None


def load_fla(
    device: torch.device, n_head: int, head_size: int, *, plain: Recurrence, log_decay_scale: float
) -> tuple[Recurrence, bool] | None:
    """fla-core's fused recurrent RWKV-7 kernel, if installed and in agreement with ``plain`` (the
    model's own recurrence; ``log_decay_scale`` bounds the log decays of its self-check).

    fla-core's function writes the final states to a new tensor, which then has to be copied
    into the slots: a second read and write of every state. Its Triton kernel reads a state tile
    once at the start and writes the same tile at the end, so with fla-core 0.6.0 (whose kernel
    this is known of) it is called directly with the slots as both the initial and the final
    state, and updates them in place. Autotuning runs a kernel several times, which in place
    would corrupt the states: the self-check below calls every variant on throwaway states
    first, so the tuned configurations are cached before any slot is touched (0.6.0 tunes per
    head size and dtypes, which the model never changes; the direct call is only made when that
    is the kernel's tuning key). Should the direct call fail its self-check, fla-core's own
    function is checked instead. Returns the recurrence and whether it works in place.
    """
    try:
        from fla.ops.rwkv7 import fused_mul_recurrent_rwkv7  # type: ignore[import-not-found]
    except Exception:  # not installed, or a broken Triton: the plain path serves
        return None
    in_place = _fla_in_place()
    for direct in [in_place, None] if in_place is not None else [None]:
        fused = _fla_recurrence(fused_mul_recurrent_rwkv7, direct)
        problem = _fla_self_check(
            fused, device, n_head, head_size, plain=plain, log_decay_scale=log_decay_scale
        )
        if problem is None:
            return fused, direct is not None
        how = "called in place" if direct is not None else "through fla-core's function"
        log.warning("fla-core's fused RWKV-7 kernel, %s, %s; not using it that way", how, problem)
    return None


def _fla_recurrence(function: Callable[..., Any], in_place: Callable[..., torch.Tensor] | None) -> Recurrence:
    """The recurrence through fla-core: its kernel in place on the states where ``in_place`` is
    given and the states are contiguous, else its function ``function``."""

    def fused(
        state: torch.Tensor,
        *,
        r: torch.Tensor,
        log_w: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kk: torch.Tensor,
        a: torch.Tensor,
        packed: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, H, N = r.shape
        inputs = {"r": r, "w": log_w, "k": k, "v": v, "kk": kk, "a": a}
        starts = None
        if packed:
            # Prompt chunks (any length, one token too): the slots as packed sequences of one
            # batch row. The kernel's batch size is a compile-time constant, so this compiles
            # once instead of once per group size.
            starts = torch.arange(0, (B + 1) * T, T, dtype=torch.long, device=r.device)
            inputs = {name: t.reshape(1, B * T, H, N) for name, t in inputs.items()}
        if in_place is not None and state.is_contiguous():
            out = in_place(state, cu_seqlens=starts, decode=T == 1, **inputs)
            final = state
        else:
            out, final = function(
                **inputs, scale=1.0, initial_state=state, output_final_state=True, cu_seqlens=starts
            )
        return out.reshape(B, T, H, N), final

    return fused


def _fla_self_check(
    fused: Recurrence,
    device: torch.device,
    n_head: int,
    head_size: int,
    *,
    plain: Recurrence,
    log_decay_scale: float,
) -> str | None:
    """None when ``fused`` agrees with the plain recurrence on decode steps and prompt chunks;
    else what went wrong. Each variant runs once on a throwaway state first (autotuning)."""
    try:
        gen = torch.Generator(device="cpu").manual_seed(7)
        for B, T, packed in ((2, 1, False), (3, 5, True), (2, 1, True)):  # decode; prompt chunks
            H, N = n_head, head_size

            def rnd(*shape: int) -> torch.Tensor:
                return torch.randn(*shape, generator=gen).to(device)

            r, k, v = rnd(B, T, H, N), rnd(B, T, H, N), rnd(B, T, H, N)
            log_w = log_decay_scale * torch.sigmoid(rnd(B, T, H, N))
            kk = F.normalize(rnd(B, T, H, N), dim=-1)
            a = torch.sigmoid(rnd(B, T, H, N))
            state = rnd(B, H, N, N) * 0.1
            inputs = {"r": r, "log_w": log_w, "k": k, "v": v, "kk": kk, "a": a}
            fused(state.clone(), packed=packed, **inputs)  # autotuning, on a throwaway state
            # float64 for the reference: TF32 (which importing the rwkv package turns on for
            # float32 matrix products) cannot touch it
            want_y, want_s = plain(state.double(), **{name: t.double() for name, t in inputs.items()})
            # the states as the slots are: a view into a larger tensor, between two other slots
            slots = torch.cat((rnd(1, H, N, N), state, rnd(1, H, N, N)))
            neighbours = (slots[0].clone(), slots[-1].clone())
            got_y, got_s = fused(slots.narrow(0, 1, B), packed=packed, **inputs)
            if not (torch.equal(slots[0], neighbours[0]) and torch.equal(slots[-1], neighbours[1])):
                return "wrote outside the states it was given"
            scale = float(want_y.abs().max())
            if (got_y.double() - want_y).abs().max() > 1e-3 * scale or (
                got_s.double() - want_s
            ).abs().max() > 1e-3:
                return "disagrees with the plain path"
    except Exception as exc:  # an API change in fla-core
        return f"failed its self-check ({exc})"
    return None


def _fla_in_place() -> Callable[..., torch.Tensor] | None:
    """fla-core 0.6.0's fused recurrent RWKV-7 Triton kernel, called with the states as both its
    initial and its final state (see :func:`load_fla`); None with another version."""
    try:
        import fla  # type: ignore[import-not-found]
        import triton  # type: ignore[import-not-found]
        from fla.ops.rwkv7.fused_recurrent import (  # type: ignore[import-not-found]
            fused_recurrent_rwkv7_fwd_kernel as kernel,
        )
    except Exception:
        return None
    tuner = getattr(kernel, "fn", None)  # the kernel is heuristics around an autotuner
    if getattr(fla, "__version__", None) != "0.6.0" or list(getattr(tuner, "keys", None) or []) != ["BK"]:
        return None

    def run(
        state: torch.Tensor,
        *,
        r: torch.Tensor,
        w: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kk: torch.Tensor,
        a: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        decode: bool,
    ) -> torch.Tensor:
        r, w, k, v, kk, a = (t.contiguous() for t in (r, w, k, v, kk, a))
        _, T, H, K = r.shape
        V = v.shape[-1]
        sequences = state.shape[0]
        out = torch.empty_like(v)

        def grid(meta: dict[str, int]) -> tuple[int]:
            return (triton.cdiv(V, meta["BV"]) * sequences * H,)

        # Triton launches on the current device, not on the tensors' (fla-core's own function
        # switches device first): a model on a second GPU is loaded before its worker binds it.
        where = torch.cuda.device(state.device) if state.is_cuda else contextlib.nullcontext()
        with where:
            kernel[grid](
                r,
                w,
                k,
                v,
                kk,
                a,
                out,
                state,
                state,
                cu_seqlens,
                1.0,
                T=T,
                B=1,  # unused by 0.6.0's kernel body; one value compiles once for every batch size
                H=H,
                K=K,
                V=V,
                BK=triton.next_power_of_2(K),
                REVERSE=False,
                IS_DECODE=decode,
            )
        return out

    return run
