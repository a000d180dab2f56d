"""Fast paths under the model math, each checked against the plain path before it is used.

- :class:`Linear`: ``x @ W`` for a weight stored ``[out, in]``; on the CPU in float32 the large
  ones use oneDNN with prepacked weights (plain ``x @ W`` repacks the weight on every call, which
  costs more than the product at batch 32);
- :func:`load_fla`: ``fla-core``'s fused recurrent RWKV-7 kernel, when it can be imported and
  agrees with the model's plain recurrence on a self-check (run in place on the slots where
  fla-core 0.6's kernel can be called directly). The plain path is always the fallback.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_PACK_MIN_NUMEL = 1 << 19  # oneDNN-prepack CPU fp32 weights at least this large (the head always is)

# The recurrence of RWKV-7 over a batch of states: (states, r=, log_w=, k=, v=, kk=, a=[, packed=])
# -> (outputs, final states).
Recurrence = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class Linear:
    """``x @ W`` for a weight stored ``[out, in]`` in the file (the package transposes it too)."""

    def __init__(self, weight: torch.Tensor, device: torch.device, dtype: torch.dtype, batch_hint: int):
        w = weight.to(device=device, dtype=dtype)
        self.packed: torch.Tensor | None = None
        self.weight_t: torch.Tensor | None = None
        if device.type == "cpu" and dtype == torch.float32 and w.numel() >= _PACK_MIN_NUMEL:
            self.packed = _onednn_pack(w.contiguous(), batch_hint)
        if self.packed is None:
            self.weight_t = w.t().contiguous()  # [in, out]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
            return out
        assert self.weight_t is not None
        return x @ self.weight_t


def cpu_features() -> str:
    """What this CPU offers the matrix products, for the start-up line: torch's vector level and
    whether bf16 runs in hardware (AMX tiles, AVX-512 BF16); without either, bf16 weights only
    pay at batch 1 (half the bytes to read) and cost several times fp32 at batch 32."""
    parts = [torch.backends.cpu.get_cpu_capability()]
    for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX-512 BF16", "_is_avx512_bf16_supported")):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            parts.append(name)
    if len(parts) == 1:
        parts.append("no bf16 hardware")
    return " ".join(parts[:1]) + (", " + ", ".join(parts[1:]) if len(parts) > 1 else "")


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
