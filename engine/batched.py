"""RWKV-7 for many sequences at once, in plain PyTorch: one decode step for a batch, chunked prompts.

The math is the ``rwkv`` package's ``RWKV_x070`` (same ``.pth`` keys, same folding of ``ln0`` into
the embedding, same transposes), rearranged for batches:

- every sequence owns a *slot* in preallocated state tensors on the device. A batch whose slots
  are a contiguous run is worked on in place; otherwise its slots are gathered by index and the
  new states scattered back. The scheduler hands out the lowest free slot, so a busy batch is
  usually the run 0..n-1, and the CUDA graph of a bucket has an in-place variant for that case
  (its padding rows use free slots), so a decode step reads and writes each state once;
- the state update ``S*w + (S @ -kk) outer (kk*a) + v outer k`` is computed as what it is, a
  decay and a rank-two update, not as a matrix product with a rank-one matrix;
- on the CPU in float32 the large matrix products use oneDNN with prepacked weights (plain
  ``x @ W`` repacks the weight on every call, which costs more than the product at batch 32);
- on CUDA: fp16/bf16 weights, an optional CUDA graph of the decode step per batch bucket
  (1, 2, 4, 8, ...), and ``fla-core``'s fused recurrent RWKV-7 kernel when it can be imported and
  agrees with the plain path on a self-check (run in place on the slots where fla-core 0.6's
  kernel can be called directly); the plain path is always the fallback.

Converting a slot to and from :class:`engine.state.Snapshot` tensors is exact, so snapshots are
interchangeable with the reference engine's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine.errors import EngineError, ModelFileError, StateMismatchError
from engine.formats import ModelSpec, inspect_weights, load_weights
from engine.gpu import no_gpu_reason

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DECAY_SCALE = -0.606531  # -exp(-0.5): the log decay is _DECAY_SCALE * sigmoid(w0 + lora(x))
_PACK_MIN_NUMEL = 1 << 19  # oneDNN-prepack CPU fp32 weights at least this large (the head always is)

Recurrence = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def parse_strategy(strategy: str) -> tuple[torch.device, torch.dtype]:
    """The device and weight dtype of a strategy string such as ``'cpu fp32'`` or ``'cuda fp16'``."""
    parts = strategy.split()
    if len(parts) != 2 or parts[1] not in _DTYPES or parts[0].split(":")[0] not in ("cpu", "cuda"):
        raise EngineError(
            f"strategy {strategy!r} is not supported by the batched engine: use 'cpu fp32', "
            "'cpu bf16', 'cuda fp16', 'cuda bf16' or 'cuda fp32'"
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
    if device.type == "cpu" and parts[1] == "fp16":
        raise EngineError(f"strategy {strategy!r}: on the CPU use fp32 or bf16")
    return device, _DTYPES[parts[1]]


class _Linear:
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


class _Layer:
    """The weights of one block, in the shapes the step uses."""

    def __init__(self, get: Callable[[str], torch.Tensor], lin: Callable[[str], _Linear], i: int) -> None:
        att, ffn, blk = f"blocks.{i}.att.", f"blocks.{i}.ffn.", f"blocks.{i}."
        self.ln1_w, self.ln1_b = get(blk + "ln1.weight"), get(blk + "ln1.bias")
        self.ln2_w, self.ln2_b = get(blk + "ln2.weight"), get(blk + "ln2.bias")
        # the six token-shift mixes x_r, x_w, x_k, x_v, x_a, x_g as one [6, 1, C] tensor
        self.mix = torch.stack([get(att + f"x_{n}") for n in "rwkvag"]).unsqueeze(1)
        self.w0, self.w1, self.w2 = get(att + "w0"), get(att + "w1"), get(att + "w2")
        self.a0, self.a1, self.a2 = get(att + "a0"), get(att + "a1"), get(att + "a2")
        self.g1, self.g2 = get(att + "g1"), get(att + "g2")
        # The first layer's value is the "v_first" that later layers mix in; it has no v0/v1/v2.
        self.has_v_mix = i > 0
        if self.has_v_mix:
            self.v0, self.v1, self.v2 = get(att + "v0"), get(att + "v1"), get(att + "v2")
        self.k_k, self.k_a, self.r_k = get(att + "k_k"), get(att + "k_a"), get(att + "r_k").flatten()
        self.ln_x_w, self.ln_x_b = get(att + "ln_x.weight"), get(att + "ln_x.bias")
        self.receptance, self.key = lin(att + "receptance.weight"), lin(att + "key.weight")
        self.value, self.output = lin(att + "value.weight"), lin(att + "output.weight")
        self.ffn_x_k = get(ffn + "x_k")
        self.ffn_key, self.ffn_value = lin(ffn + "key.weight"), lin(ffn + "value.weight")


class _DecodeGraph:
    """A CUDA graph of one decode step for a fixed batch bucket, with its static buffers.

    ``in_place``: the step of the slot run ``0..bucket-1`` in place (the caller makes sure that
    the slots past its batch are free: the padding rows write them); otherwise the batch's slots
    are gathered by index, and the padding rows read and write the scratch slot only.
    """

    def __init__(self, model: BatchedRWKV7, bucket: int, pool: Any, *, in_place: bool) -> None:
        device = model.device
        self.bucket = bucket
        self.in_place = in_place
        self.slots = torch.full((bucket,), model.scratch_slot, dtype=torch.long, device=device)
        self.tokens = torch.zeros(bucket, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: lazy init and Triton autotuning happen outside
            for _ in range(2):  # capture; the same kernels on the scratch slot, never a live state
                model._decode_indexed(self.slots, self.tokens)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the event loop's thread may move conversation states between host and
        # device memory (chat.states) while this worker thread captures.
        # stream=side: the default capture stream is one for the whole process, made on the
        # device current at the first capture; with several GPUs the others' would record nothing.
        with torch.cuda.graph(self.graph, pool=pool, stream=side, capture_error_mode="thread_local"):
            if in_place:
                self.logits = model._decode_run(self.tokens)
            else:
                self.logits = model._decode_indexed(self.slots, self.tokens)

    def run(self, slots: torch.Tensor | None, tokens: torch.Tensor, scratch: int) -> torch.Tensor:
        n = tokens.numel()
        if slots is not None:
            self.slots[:n].copy_(slots, non_blocking=True)
            self.slots[n:].fill_(scratch)
        self.tokens[:n].copy_(tokens, non_blocking=True)
        self.tokens[n:].zero_()
        self.graph.replay()
        return self.logits[:n].clone()  # the static buffer is overwritten by the next replay


class BatchedRWKV7:
    """An RWKV-7 model with ``max_slots`` resident sequence states on one device."""

    def __init__(
        self,
        weights: Mapping[str, torch.Tensor],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_slots: int = 32,
        cuda_graphs: bool = True,
        use_fla: bool | None = None,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # set_device needs an index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype
        if max_slots < 1:
            raise ValueError("max_slots must be at least 1")
        self.max_slots = max_slots
        self.scratch_slot = max_slots  # one extra slot that padding rows of a CUDA graph write to
        if any(".s_emb" in k or ".s1" in k for k in weights):
            raise EngineError("DeepEmbed RWKV-7 checkpoints are not supported by the batched engine")
        r_k = weights["blocks.0.att.r_k"]
        self.n_head, self.head_size = int(r_k.shape[0]), int(r_k.shape[1])
        self.vocab_size, self.n_embd = (int(d) for d in weights["emb.weight"].shape)
        self.n_layer = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks."))
        hint = max(1, min(max_slots, 256))

        def get(key: str) -> torch.Tensor:
            return weights[key].squeeze().to(device=self.device, dtype=dtype).contiguous()

        def lin(key: str) -> _Linear:
            return _Linear(weights[key], self.device, dtype, hint)

        with torch.no_grad():
            emb = weights["emb.weight"].to(device=self.device, dtype=dtype)
            self.emb = F.layer_norm(
                emb, (self.n_embd,), weight=get("blocks.0.ln0.weight"), bias=get("blocks.0.ln0.bias")
            ).contiguous()
            self.layers = [_Layer(get, lin, i) for i in range(self.n_layer)]
            self.ln_out_w, self.ln_out_b = get("ln_out.weight"), get("ln_out.bias")
            self.head = lin("head.weight")

        # Resident states: one slot per sequence, plus the scratch slot, for every layer.
        #   att_x [L, slots, C]        model dtype  time-mix token shift     = snapshot tensor 3*l+0
        #   att_kv[L, slots, H, K, V]  float32      wkv state, [key, value]  = snapshot tensor 3*l+1
        #                                           transposed (the rwkv package keeps [value, key])
        #   ffn_x [L, slots, C]        model dtype  channel-mix token shift  = snapshot tensor 3*l+2
        L, S, C, H, N = self.n_layer, max_slots + 1, self.n_embd, self.n_head, self.head_size
        per_slot = L * (2 * C * dtype.itemsize + H * N * N * 4)
        free = _free_memory(self.device)
        if free is not None and S * per_slot > 0.9 * free:  # refuse plainly rather than fail midway
            fit = max(0, int(0.9 * free) // per_slot - 1)
            raise EngineError(
                f"{max_slots} resident sequence states need {S * per_slot / 2**30:.1f} GiB and "
                f"{free / 2**30:.1f} GiB of {self.device.type} memory is free after the weights: "
                f"lower max_resident (or max_batch) to at most {fit}"
            )
        self.att_x = torch.zeros(L, S, C, dtype=dtype, device=self.device)
        # which slots hold a sequence (set by load_slot/zero_slot, cleared by release_slot): the
        # in-place CUDA graphs pad a batch with the slots after it only when those are free
        self._live = [False] * max_slots
        self.att_kv = torch.zeros(L, S, H, N, N, dtype=torch.float32, device=self.device)
        self.ffn_x = torch.zeros(L, S, C, dtype=dtype, device=self.device)

        self._fla: Recurrence | None = None
        self._fla_in_place = False  # whether fla-core's kernel updates the slots in place
        if self.device.type == "cuda" and use_fla is not False:
            loaded = _load_fla(self.device, self.n_head, self.head_size)
            if loaded is not None:
                self._fla, self._fla_in_place = loaded
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[tuple[int, bool], _DecodeGraph] = {}
        self._graph_pool: Any = None

    @classmethod
    def load(
        cls, path: Path, strategy: str = "cpu fp32", max_slots: int = 32, **options: Any
    ) -> BatchedRWKV7:
        """Load a ``.pth`` file under a strategy (``'cpu fp32'``, ``'cuda fp16'``, ...)."""
        device, dtype = parse_strategy(strategy)
        weights = load_weights(path)
        spec = inspect_weights(path, weights)
        if spec.family != 7:
            raise EngineError(
                f"the batched engine runs RWKV-7 models only, and {path.name} is {spec.describe()}"
            )
        try:
            return cls(weights, device=device, dtype=dtype, max_slots=max_slots, **options)
        except torch.cuda.OutOfMemoryError as exc:
            raise EngineError(f"not enough GPU memory to load {path.name} as {strategy!r}") from exc
        except KeyError as exc:
            raise ModelFileError(f"{path} has no {exc}: it is not a complete RWKV-7 checkpoint") from exc

    def matches(self, spec: ModelSpec) -> bool:
        """True when this model has the shape that ``spec`` describes."""
        return (spec.n_layer, spec.n_embd, spec.vocab_size, spec.n_head) == (
            self.n_layer,
            self.n_embd,
            self.vocab_size,
            self.n_head,
        )

    @property
    def fused_recurrence(self) -> bool:
        """Whether fla-core's kernel runs the recurrence (else the plain, token by token, path)."""
        return self._fla is not None

    def describe_kernels(self) -> str:
        """Which optional fast paths are on, for logs."""
        parts = []
        if self.head.packed is not None:
            parts.append("oneDNN prepacked")
        if self._fla is not None:
            parts.append("fla fused recurrent" + (" in place" if self._fla_in_place else ""))
        if self.cuda_graphs:
            parts.append("CUDA graphs")
        return ", ".join(parts) or "plain PyTorch"

    # ----------------------------------------------------------------------------------- slots

    def zero_slot(self, slot: int) -> None:
        """Reset a slot to the blank state (the slot now holds a sequence)."""
        self.att_x[:, slot].zero_()
        self.att_kv[:, slot].zero_()
        self.ffn_x[:, slot].zero_()
        self._live[slot] = True

    @property
    def live_slots(self) -> list[int]:
        """The slots that hold a sequence."""
        return [slot for slot, live in enumerate(self._live) if live]

    def release_slot(self, slot: int) -> None:
        """Mark a slot free: its state may be overwritten (by the padding rows of a batch)."""
        self._live[slot] = False

    def load_slot(self, slot: int, tensors: Sequence[torch.Tensor]) -> None:
        """Write snapshot tensors (the reference layout, any device or dtype) into a slot."""
        if len(tensors) != 3 * self.n_layer:
            raise StateMismatchError(
                f"a state of {len(tensors)} tensors does not fit this model ({3 * self.n_layer})"
            )
        C, H, N = self.n_embd, self.n_head, self.head_size
        for layer in range(self.n_layer):
            shift, kv, ffn = tensors[3 * layer : 3 * layer + 3]
            if tuple(shift.shape) != (C,) or tuple(ffn.shape) != (C,) or tuple(kv.shape) != (H, N, N):
                raise StateMismatchError("a stored state has the wrong shape for this model")
            self.att_x[layer, slot].copy_(shift)
            self.att_kv[layer, slot].copy_(kv.transpose(-1, -2))  # [value, key] -> [key, value]
            self.ffn_x[layer, slot].copy_(ffn)
        self._live[slot] = True

    def export_slot(self, slot: int) -> list[torch.Tensor]:
        """Fresh snapshot tensors of a slot, in the reference layout, dtypes and device."""
        out: list[torch.Tensor] = []
        for layer in range(self.n_layer):
            out.append(self.att_x[layer, slot].clone())
            out.append(self.att_kv[layer, slot].transpose(-1, -2).contiguous())  # [value, key]
            out.append(self.ffn_x[layer, slot].clone())
        return out

    # ----------------------------------------------------------------------------------- steps

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """Feed one token to each slot; returns float32 logits ``[len(slots), vocab]`` (a new tensor)."""
        if len(slots) != len(tokens) or not slots:
            raise ValueError("decode needs one token per slot, and at least one slot")
        with torch.no_grad():
            tok = to_device(torch.tensor(list(tokens), dtype=torch.long), self.device)
            if self.cuda_graphs:
                bucket, in_place = self.graph_plan(slots)
                graph = self._graph(bucket, in_place)
                if graph is not None:
                    idx = None if in_place else self._indices(slots)
                    return graph.run(idx, tok, self.scratch_slot)
            x = F.embedding(tok, self.emb).unsqueeze(1)  # [B, 1, C]
            span = _span(slots)
            if span is not None:
                return self._logits(self._blocks(x, None, span))
            return self._logits(self._blocks(x, self._indices(slots), None))

    def prefill(
        self, slots: Sequence[int], tokens: Sequence[Sequence[int]], logits: bool
    ) -> torch.Tensor | None:
        """Feed equally long token runs to slots; returns the logits after the last tokens if asked."""
        if len(slots) != len(tokens) or not slots or len({len(t) for t in tokens}) != 1 or not tokens[0]:
            raise ValueError("prefill needs one non-empty token run per slot, all of one length")
        with torch.no_grad():
            tok = to_device(torch.tensor([list(t) for t in tokens], dtype=torch.long), self.device)
            x = F.embedding(tok, self.emb)  # [B, T, C]
            span = _span(slots)
            idx = None if span is not None else self._indices(slots)
            hidden = self._blocks(x, idx, span, prompt=True)
            return self._logits(hidden) if logits else None

    def graph_plan(self, slots: Sequence[int]) -> tuple[int, bool]:
        """(bucket, in place) for a decode batch: in place when its slots are ``0..n-1`` and the
        padding up to the bucket falls on free slots; else gathered by index."""
        n = len(slots)
        bucket = min(_bucket(n), self.max_slots)
        in_place = _span(slots) == (0, n) and not any(self._live[n:bucket])
        return bucket, in_place

    def _indices(self, slots: Sequence[int]) -> torch.Tensor:
        return to_device(torch.tensor(list(slots), dtype=torch.long), self.device)

    def capture_graphs(self, max_batch: int) -> None:
        """Capture the decode step of every bucket a batch of up to ``max_batch`` uses, both
        variants, the largest first (they share one memory pool); a no-op without CUDA graphs."""
        with torch.no_grad():
            for bucket in graph_buckets(max_batch, self.max_slots):
                for in_place in (True, False):
                    if not self.cuda_graphs:
                        return
                    self._graph(bucket, in_place)

    def _graph(self, bucket: int, in_place: bool) -> _DecodeGraph | None:
        """The captured decode step of a bucket (captured on first use); None: run eagerly."""
        graph = self._graphs.get((bucket, in_place))
        if graph is None:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            try:
                graph = _DecodeGraph(self, bucket, self._graph_pool, in_place=in_place)
            except RuntimeError as exc:  # e.g. an op that syncs with the host: stay eager
                log.warning("CUDA graph capture failed (%s); decoding without graphs", exc)
                self.cuda_graphs = False
                torch.cuda.synchronize(self.device)
                return None
            self._graphs[bucket, in_place] = graph
        return graph

    def _decode_indexed(self, idx: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The decode step with device-side slot indices only: what a CUDA graph captures."""
        x = F.embedding(tokens, self.emb).unsqueeze(1)
        return self._logits(self._blocks(x, idx, None))

    def _decode_run(self, tokens: torch.Tensor) -> torch.Tensor:
        """The decode step of the slots ``0..len(tokens)-1`` in place: what an in-place CUDA
        graph captures (its padding rows write the free slots after the batch)."""
        x = F.embedding(tokens, self.emb).unsqueeze(1)
        return self._logits(self._blocks(x, None, (0, tokens.numel())))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(hidden, (self.n_embd,), weight=self.ln_out_w, bias=self.ln_out_b)
        return self.head(h).float()

    def _blocks(
        self,
        x: torch.Tensor,
        idx: torch.Tensor | None,
        span: tuple[int, int] | None,
        *,
        prompt: bool = False,
    ) -> torch.Tensor:
        """Run all layers on ``x`` [B, T, C], updating the slots; returns the last position [B, C].

        ``span`` (first slot, count) works in place on a contiguous run of slots; otherwise the
        slots ``idx`` are gathered and scattered back, one read and one write per layer.
        ``prompt``: a prompt chunk (the fused kernel packs those, whatever their length).
        """
        C = x.shape[-1]
        v_first: torch.Tensor | None = None
        for i, p in enumerate(self.layers):
            if span is not None:
                first, count = span
                shift = self.att_x[i].narrow(0, first, count)
                kv = self.att_kv[i].narrow(0, first, count)
                ffn_shift = self.ffn_x[i].narrow(0, first, count)
            else:
                assert idx is not None
                shift = self.att_x[i].index_select(0, idx)
                kv = self.att_kv[i].index_select(0, idx)
                ffn_shift = self.ffn_x[i].index_select(0, idx)

            h = F.layer_norm(x, (C,), weight=p.ln1_w, bias=p.ln1_b)
            out, v_first = self._time_mix(i, p, h, shift=shift, kv=kv, v_first=v_first, prompt=prompt)
            new_shift = h[:, -1]
            x = x + out
            h = F.layer_norm(x, (C,), weight=p.ln2_w, bias=p.ln2_b)
            x = x + self._channel_mix(p, h, ffn_shift)
            new_ffn_shift = h[:, -1]

            if span is not None:
                shift.copy_(new_shift)
                ffn_shift.copy_(new_ffn_shift)
            else:
                assert idx is not None
                self.att_x[i].index_copy_(0, idx, new_shift)
                self.att_kv[i].index_copy_(0, idx, kv)
                self.ffn_x[i].index_copy_(0, idx, new_ffn_shift)
        return x[:, -1]

    def _time_mix(
        self,
        layer: int,
        p: _Layer,
        x: torch.Tensor,
        *,
        shift: torch.Tensor,
        kv: torch.Tensor,
        v_first: torch.Tensor | None,
        prompt: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        H, N, M = self.n_head, self.head_size, B * T
        x = x.reshape(1, M, C)
        xx = _shifted(shift, x.view(B, T, C)).reshape(1, M, C) - x
        # x + xx * x_r, ... : [6, M, C] (not addcmul: its fused multiply-add rounds differently)
        xr, xw, xk, xv, xa, xg = x + xx * p.mix

        r = p.receptance(xr)
        w = torch.tanh(xw @ p.w1) @ p.w2
        k = p.key(xk)
        v = p.value(xv)
        a = torch.sigmoid(p.a0 + (xa @ p.a1) @ p.a2)
        g = torch.sigmoid(xg @ p.g1) @ p.g2

        kk = F.normalize((k * p.k_k).view(M, H, N), dim=-1, p=2.0).view(M, C)
        k = k * (1 + (a - 1) * p.k_a)
        if layer == 0 or v_first is None:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(p.v0 + (xv @ p.v1) @ p.v2)
        log_w = _DECAY_SCALE * torch.sigmoid((p.w0 + w).float())

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.float().reshape(B, T, H, N)

        inputs = {"r": r, "log_w": log_w, "k": k, "v": v, "kk": kk, "a": a}
        inputs = {name: heads(t) for name, t in inputs.items()}
        if self._fla is not None:
            y, kv_new = self._fla(kv, packed=prompt, **inputs)
        else:
            y, kv_new = _recurrent_plain(kv, **inputs)
        if kv_new is not kv:
            kv.copy_(kv_new)
        y = y.reshape(M, C).to(self.dtype)

        y = F.group_norm(y, num_groups=H, weight=p.ln_x_w, bias=p.ln_x_b, eps=64e-5)
        y = y + ((r * k * p.r_k).view(M, H, N).sum(dim=-1, keepdim=True) * v.view(M, H, N)).view(M, C)
        return p.output(y * g).view(B, T, C), v_first

    def _channel_mix(self, p: _Layer, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        k = x + (_shifted(shift, x) - x) * p.ffn_x_k
        k = torch.relu(p.ffn_key(k.reshape(B * T, C))) ** 2
        return p.ffn_value(k).view(B, T, C)


def _shifted(shift: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The previous token's input at every position: the state first, then ``x`` moved by one."""
    if x.shape[1] == 1:
        return shift.unsqueeze(1)
    return torch.cat((shift.unsqueeze(1), x[:, :-1]), dim=1)


def _recurrent_plain(
    state: torch.Tensor,
    *,
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kk: torch.Tensor,
    a: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The RWKV-7 recurrence over T, in place on ``state`` [B, H, K, V] float32; inputs [B, T, H, N].

    Per token, with S in the [key, value] layout (S[k, v]):
        S = diag(w) S + (kk*a) outer (-kk^T S) + k outer v,    y = r^T S
    which is the package's ``S*w + S @ ((-kk) outer (kk*a)) + v outer k`` in [value, key].
    """
    B, T, H, N = r.shape
    S = state.view(B * H, N, N)
    w = torch.exp(log_w)
    b = kk * a
    out = torch.empty(B, T, H, N, dtype=r.dtype, device=r.device)
    for t in range(T):
        sa = torch.bmm((-kk[:, t]).reshape(B * H, 1, N), S)  # [BH, 1, V], from the state before decay
        S.mul_(w[:, t].reshape(B * H, N, 1))
        left = torch.stack((b[:, t], k[:, t]), dim=-1).reshape(B * H, N, 2)
        right = torch.cat((sa, v[:, t].reshape(B * H, 1, N)), dim=1)  # [BH, 2, V]
        S.baddbmm_(left, right)
        out[:, t] = torch.bmm(r[:, t].reshape(B * H, 1, N), S).view(B, H, N)
    return out, state


def _load_fla(device: torch.device, n_head: int, head_size: int) -> tuple[Recurrence, bool] | None:
    """fla-core's fused recurrent RWKV-7 kernel, if installed and in agreement with the plain path.

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
        problem = _fla_self_check(fused, device, n_head, head_size)
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


def _fla_self_check(fused: Recurrence, device: torch.device, n_head: int, head_size: int) -> str | None:
    """None when ``fused`` agrees with the plain recurrence on decode steps and prompt chunks;
    else what went wrong. Each variant runs once on a throwaway state first (autotuning)."""
    try:
        gen = torch.Generator(device="cpu").manual_seed(7)
        for B, T, packed in ((2, 1, False), (3, 5, True), (2, 1, True)):  # decode; prompt chunks
            H, N = n_head, head_size

            def rnd(*shape: int) -> torch.Tensor:
                return torch.randn(*shape, generator=gen).to(device)

            r, k, v = rnd(B, T, H, N), rnd(B, T, H, N), rnd(B, T, H, N)
            log_w = _DECAY_SCALE * torch.sigmoid(rnd(B, T, H, N))
            kk = F.normalize(rnd(B, T, H, N), dim=-1)
            a = torch.sigmoid(rnd(B, T, H, N))
            state = rnd(B, H, N, N) * 0.1
            inputs = {"r": r, "log_w": log_w, "k": k, "v": v, "kk": kk, "a": a}
            fused(state.clone(), packed=packed, **inputs)  # autotuning, on a throwaway state
            # float64 for the reference: TF32 (which importing the rwkv package turns on for
            # float32 matrix products) cannot touch it
            want_y, want_s = _recurrent_plain(
                state.double(), **{name: t.double() for name, t in inputs.items()}
            )
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
    initial and its final state (see :func:`_load_fla`); None with another version."""
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


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without waiting for the device: from pinned memory,
    asynchronously (a plain copy from pageable memory synchronises the stream first)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _free_memory(device: torch.device) -> int | None:
    """Bytes of memory free on a device (GPU memory, or available RAM for the CPU); None: unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def graph_buckets(max_batch: int, max_slots: int) -> list[int]:
    """The CUDA-graph buckets that batches of 1 to ``max_batch`` sequences use, largest first."""
    top = min(max_batch, max_slots)
    return sorted({min(_bucket(n), max_slots) for n in range(1, top + 1)}, reverse=True)


def _bucket(n: int) -> int:
    """The CUDA-graph batch bucket for ``n`` sequences: the next power of two."""
    bucket = 1
    while bucket < n:
        bucket *= 2
    return bucket


def _span(slots: Sequence[int]) -> tuple[int, int] | None:
    """(first, count) when the slots are consecutive and ascending, else None."""
    first = slots[0]
    for offset, slot in enumerate(slots):
        if slot != first + offset:
            return None
    return first, len(slots)
