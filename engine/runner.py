"""The model runner: a model of any registered family with resident sequence states on one device.

- every sequence owns a *slot* in preallocated state tensors on the device (the model's
  :meth:`~engine.models.base.BatchedModel.state_layout`, for every layer and slot). A batch whose
  slots are a contiguous run is worked on in place; otherwise its slots are gathered by index and
  the new states scattered back. The scheduler hands out the lowest free slot, so a busy batch is
  usually the run 0..n-1, and the CUDA graph of a bucket has an in-place variant for that case
  (its padding rows use free slots), so a decode step reads and writes each state once;
- on CUDA, an optional CUDA graph of the decode step per batch bucket (:mod:`engine.cuda_graphs`).

Converting a slot to and from :class:`engine.state.Snapshot` tensors is exact, so snapshots are
interchangeable with the reference engine's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from engine.cpu_features import this_cpu
from engine.cuda_graphs import DecodeGraph, IndexedStep, RunStep, StepGraph, bucket_of, graph_buckets
from engine.errors import EngineError, ModelFileError, StateMismatchError
from engine.formats import ModelSpec, inspect_weights, load_weights
from engine.gpu import to_device
from engine.heap import release_free_heap
from engine.models import describe_families, has_family, model_class
from engine.models.base import BatchedModel, StateTensor
from engine.strategy import int8_products, parse_strategy

log = logging.getLogger(__name__)

# Captures the decode step of a bucket: (steps, bucket, in place) -> a graph to replay. The default
# captures a CUDA graph; tests pass one that runs on the CPU (engine.selftest checks either).
GraphFactory = Callable[[tuple[IndexedStep, RunStep], int, bool], StepGraph]


class _InPlace:
    """The states of a contiguous run of slots, as views: updated where they are."""

    def __init__(self, states: list[torch.Tensor], first: int, count: int) -> None:
        self.states, self.first, self.count = states, first, count
        self.views: list[torch.Tensor] = []

    def read(self, layer: int) -> list[torch.Tensor]:
        self.views = [t[layer].narrow(0, self.first, self.count) for t in self.states]
        return list(self.views)

    def write(self, layer: int, values: list[torch.Tensor]) -> None:
        for view, value in zip(self.views, values, strict=True):
            if value is not view:
                view.copy_(value)


class _Gathered:
    """The states of any slots, gathered by index and scattered back: one read and one write."""

    def __init__(self, states: list[torch.Tensor], idx: torch.Tensor) -> None:
        self.states, self.idx = states, idx

    def read(self, layer: int) -> list[torch.Tensor]:
        return [t[layer].index_select(0, self.idx) for t in self.states]

    def write(self, layer: int, values: list[torch.Tensor]) -> None:
        for t, value in zip(self.states, values, strict=True):
            t[layer].index_copy_(0, self.idx, value)


class ModelRunner:
    """A model with ``max_slots`` resident sequence states on its device, and CUDA graphs."""

    def __init__(
        self,
        model: BatchedModel,
        *,
        max_slots: int = 32,
        cuda_graphs: bool = True,
        graph_factory: GraphFactory | None = None,
    ) -> None:
        if max_slots < 1:
            raise ValueError("max_slots must be at least 1")
        self.model = model
        self.device, self.dtype = model.device, model.dtype
        self.max_slots = max_slots
        self.scratch_slot = max_slots  # one extra slot that padding rows of a CUDA graph write to
        layout = model.state_layout()
        self._transposed = [t.transposed for t in layout]
        # Resident states: per state tensor of the layout, [layers, slots + scratch, *shape].
        L, S = model.n_layer, max_slots + 1
        per_slot = L * sum(math.prod(t.shape) * t.dtype.itemsize for t in layout)
        free = _free_memory(self.device)
        if free is not None and S * per_slot > 0.9 * free:  # refuse plainly rather than fail midway
            fit = max(0, int(0.9 * free) // per_slot - 1)
            raise EngineError(
                f"{max_slots} resident sequence states need {S * per_slot / 2**30:.1f} GiB and "
                f"{free / 2**30:.1f} GiB of {self.device.type} memory is free after the weights: "
                f"lower max_resident (or max_batch) to at most {fit}"
            )
        self.states = [torch.zeros(L, S, *_slot_shape(t), dtype=t.dtype, device=self.device) for t in layout]
        self._shapes = [t.shape for t in layout]
        # which slots hold a sequence (set by load_slot/zero_slot, cleared by release_slot): the
        # in-place CUDA graphs pad a batch with the slots after it only when those are free
        self._live = [False] * max_slots
        self._factory = graph_factory
        # whether graphs may be used at all (CUDA, or a factory given), and whether they are now
        self.graphs_wanted = cuda_graphs and (self.device.type == "cuda" or graph_factory is not None)
        self.cuda_graphs = self.graphs_wanted
        self.graph_failure: str | None = None  # why a capture failed, when one did
        self._graphs: dict[tuple[int, bool], StepGraph] = {}
        self._graph_pool: Any = None

    @classmethod
    def load(
        cls,
        path: Path,
        strategy: str = "cpu fp32",
        max_slots: int = 32,
        *,
        cuda_graphs: bool = True,
        use_fla: bool | None = None,
    ) -> ModelRunner:
        """Load a ``.pth`` file under a strategy (``'cpu fp32'``, ``'cpu int8'``, ``'cuda fp16'``,
        ...; ``auto`` resolved first, :func:`engine.strategy.resolve_strategy`)."""
        device, dtype = parse_strategy(strategy)
        if device.type == "cuda" and device.index is None:  # set_device needs an index
            device = torch.device("cuda", torch.cuda.current_device())
        weights = load_weights(path)
        spec = inspect_weights(path, weights)
        if not has_family(spec.family):
            raise EngineError(
                f"the batched engine runs {describe_families()} models only, and {path.name} is "
                f"{spec.describe()}"
            )
        try:
            model = model_class(spec.family)(
                weights,
                device=device,
                dtype=dtype,
                batch_hint=max(1, min(max_slots, 256)),
                use_fla=use_fla,
                int8=int8_products(strategy),
            )
            runner = cls(model, max_slots=max_slots, cuda_graphs=cuda_graphs)
        except torch.cuda.OutOfMemoryError as exc:
            raise EngineError(f"not enough GPU memory to load {path.name} as {strategy!r}") from exc
        except KeyError as exc:
            raise ModelFileError(
                f"{path} has no {exc}: it is not a complete RWKV-{spec.family} checkpoint"
            ) from exc
        del weights
        release_free_heap()  # the holes the loading's temporaries left (engine.heap)
        return runner

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary size."""
        return self.model.vocab_size

    def matches(self, spec: ModelSpec) -> bool:
        """True when this model has the shape that ``spec`` describes."""
        m = self.model
        return (spec.n_layer, spec.n_embd, spec.vocab_size, spec.n_head) == (
            m.n_layer,
            m.n_embd,
            m.vocab_size,
            m.n_head,
        )

    @property
    def fused_recurrence(self) -> bool:
        """Whether a fused kernel runs the recurrence (else the plain, token by token, path)."""
        return self.model.fused_recurrence

    def describe_kernels(self) -> str:
        """Which optional fast paths are on, for logs."""
        parts = self.model.kernels()
        if self.cuda_graphs:
            parts.append("CUDA graphs")
        if self.device.type == "cpu":
            parts.append(f"CPU {this_cpu().describe()}")
        return ", ".join(parts) or "plain PyTorch"

    # ----------------------------------------------------------------------------------- slots

    def zero_slot(self, slot: int) -> None:
        """Reset a slot to the blank state (the slot now holds a sequence)."""
        for t in self.states:
            t[:, slot].zero_()
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
        kinds, layers = len(self.states), self.model.n_layer
        if len(tensors) != kinds * layers:
            raise StateMismatchError(
                f"a state of {len(tensors)} tensors does not fit this model ({kinds * layers})"
            )
        for layer in range(layers):
            group = tensors[kinds * layer : kinds * layer + kinds]
            if any(tuple(t.shape) != shape for t, shape in zip(group, self._shapes, strict=True)):
                raise StateMismatchError("a stored state has the wrong shape for this model")
            for states, t, transposed in zip(self.states, group, self._transposed, strict=True):
                states[layer, slot].copy_(t.transpose(-1, -2) if transposed else t)
        self._live[slot] = True

    def export_slot(self, slot: int) -> list[torch.Tensor]:
        """Fresh snapshot tensors of a slot, in the reference layout, dtypes and device."""
        out: list[torch.Tensor] = []
        for layer in range(self.model.n_layer):
            for states, transposed in zip(self.states, self._transposed, strict=True):
                t = states[layer, slot]
                out.append(t.transpose(-1, -2).contiguous() if transposed else t.clone())
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
            x = self.model.embed(tok).unsqueeze(1)  # [B, 1, C]
            return self.model.logits(self.model.forward(x, self._access(slots)))

    def prefill(
        self, slots: Sequence[int], tokens: Sequence[Sequence[int]], logits: bool
    ) -> torch.Tensor | None:
        """Feed equally long token runs to slots; returns the logits after the last tokens if asked."""
        if len(slots) != len(tokens) or not slots or len({len(t) for t in tokens}) != 1 or not tokens[0]:
            raise ValueError("prefill needs one non-empty token run per slot, all of one length")
        with torch.no_grad():
            tok = to_device(torch.tensor([list(t) for t in tokens], dtype=torch.long), self.device)
            x = self.model.embed(tok)  # [B, T, C]
            hidden = self.model.forward(x, self._access(slots), prompt=True)
            return self.model.logits(hidden) if logits else None

    def graph_plan(self, slots: Sequence[int]) -> tuple[int, bool]:
        """(bucket, in place) for a decode batch: in place when its slots are ``0..n-1`` and the
        padding up to the bucket falls on free slots; else gathered by index."""
        n = len(slots)
        bucket = min(bucket_of(n), self.max_slots)
        in_place = _span(slots) == (0, n) and not any(self._live[n:bucket])
        return bucket, in_place

    def _access(self, slots: Sequence[int]) -> _InPlace | _Gathered:
        """The batch's states: in place on consecutive ascending slots, else gathered."""
        span = _span(slots)
        if span is not None:
            return _InPlace(self.states, *span)
        return _Gathered(self.states, self._indices(slots))

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

    def _graph(self, bucket: int, in_place: bool) -> StepGraph | None:
        """The captured decode step of a bucket (captured on first use); None: run eagerly."""
        graph = self._graphs.get((bucket, in_place))
        if graph is None:
            try:
                graph = self._capture(bucket, in_place)
            except Exception as exc:  # e.g. an op that syncs with the host: stay eager
                log.warning("CUDA graph capture failed (%s); decoding without graphs", exc)
                self.cuda_graphs = False
                self.graph_failure = f"capture failed ({type(exc).__name__}: {exc})"
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                return None
            self._graphs[bucket, in_place] = graph
        return graph

    def _capture(self, bucket: int, in_place: bool) -> StepGraph:
        steps = (self._decode_indexed, self._decode_run)
        if self._factory is not None:
            return self._factory(steps, bucket, in_place)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        return DecodeGraph(self.device, self.scratch_slot, steps, bucket, self._graph_pool, in_place=in_place)

    def configure(self, *, graphs: bool, fused: bool) -> None:
        """Serve with or without CUDA graphs (where wanted) and the fused kernel (where loaded);
        graphs captured under another configuration are dropped (capture again after this)."""
        graphs = graphs and self.graphs_wanted
        if (graphs, fused) == (self.cuda_graphs, self.model.fused_recurrence) and self.graph_failure is None:
            return
        self.model.set_fused(fused)
        self._graphs.clear()
        self._graph_pool = None
        self.cuda_graphs, self.graph_failure = graphs, None

    @contextmanager
    def plain(self) -> Iterator[None]:
        """Within: decode and read prompts eagerly in plain PyTorch (no graphs, no fused kernel);
        the configuration, and the captured graphs, come back after."""
        graphs, fused = self.cuda_graphs, self.model.fused_recurrence
        self.cuda_graphs = False
        self.model.set_fused(False)
        try:
            yield
        finally:
            self.cuda_graphs = graphs
            self.model.set_fused(fused)

    def _decode_indexed(self, idx: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The decode step with device-side slot indices only: what a CUDA graph captures."""
        x = self.model.embed(tokens).unsqueeze(1)
        return self.model.logits(self.model.forward(x, _Gathered(self.states, idx)))

    def _decode_run(self, tokens: torch.Tensor) -> torch.Tensor:
        """The decode step of the slots ``0..len(tokens)-1`` in place: what an in-place CUDA
        graph captures (its padding rows write the free slots after the batch)."""
        x = self.model.embed(tokens).unsqueeze(1)
        return self.model.logits(self.model.forward(x, _InPlace(self.states, 0, tokens.numel())))


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


def _slot_shape(tensor: StateTensor) -> tuple[int, ...]:
    """The shape of a state tensor in the slots (its last two dimensions swapped if transposed)."""
    shape = tensor.shape
    return (*shape[:-2], shape[-1], shape[-2]) if tensor.transposed else shape


def _span(slots: Sequence[int]) -> tuple[int, int] | None:
    """(first, count) when the slots are consecutive and ascending, else None."""
    first = slots[0]
    for offset, slot in enumerate(slots):
        if slot != first + offset:
            return None
    return first, len(slots)
