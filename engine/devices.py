"""One batched engine per device, behind one :class:`Engine`: the worker pool of a multi-GPU box.

Each device gets its own copy of the model, its own resident states and its own scheduler
thread (:class:`engine.batched_engine.BatchedEngine`). A request goes to the device that holds its start
state, so a channel sticks to one GPU while its state is there (a state in host memory or the
database has no home: the request goes to the least busy device, and stays there from then on,
since the states it produces live on that device). Shared states (a preset's opening, which
every new channel starts from, see :meth:`Engine.shared`) are kept in host memory, so that they
tie no channel to the device that read them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import torch

from engine.batched_engine import BatchedEngine
from engine.device_names import parse_devices
from engine.errors import EngineError
from engine.interface import Engine, GenerationEvent, GenerationRequest
from engine.state import Snapshot, move_snapshot
from engine.strategy import Resolved, on_device, parse_strategy, precision_of
from engine.tokenizer import Tokenizer

__all__ = ["DeviceEngines", "parse_devices"]


class DeviceEngines(Engine):
    """Several batched engines of one model, one per device; requests follow their states."""

    def __init__(self, engines: Sequence[BatchedEngine]) -> None:
        if not engines:
            raise ValueError("DeviceEngines needs at least one engine")
        fingerprints = {e.spec.fingerprint for e in engines}
        if len(fingerprints) != 1:
            raise ValueError("the engines of a DeviceEngines must run the same model")
        self.engines = list(engines)
        self.spec = engines[0].spec
        self.tokenizer: Tokenizer = engines[0].tokenizer
        self.devices = [_canonical(e.runner.device) for e in self.engines]
        self.reason: str | None = None  # why an ``auto`` strategy resolved to this precision

    @classmethod
    def load(
        cls,
        path: Path,
        strategy: str,
        devices: Sequence[str],
        tokenizer: str = "auto",
        *,
        reason: str | None = None,
        **options: Any,
    ) -> DeviceEngines:
        """Load the model once per device, with the precision of ``strategy`` (slow: use a thread);
        ``reason``: why ``auto`` resolved to it, for the start-up line."""
        strategies = [on_device(strategy, device) for device in devices]
        for device, each in zip(devices, strategies, strict=True):  # refuse a missing device first
            try:
                parse_strategy(each)
            except EngineError as exc:
                raise EngineError(f"device {device} of the devices setting: {exc}") from None
        loaded: list[BatchedEngine] = []
        try:
            for each in strategies:
                loaded.append(BatchedEngine.load(path, each, tokenizer, **options))
        except BaseException:
            for engine in loaded:  # no event loop needed: this runs in a loading thread
                engine.shutdown()
            raise
        engines = cls(loaded)
        engines.reason = reason
        return engines

    def pick(self, start: Snapshot | None) -> BatchedEngine:
        """The engine for a request: where its start state is, else the least loaded one."""
        if start is not None and start.tensors:
            where = _canonical(start.tensors[0].device)
            if where.type != "cpu":  # host memory is every device's: no reason to stick
                for device, engine in zip(self.devices, self.engines, strict=True):
                    if device == where and engine.alive:
                        return engine
        alive = [engine for engine in self.engines if engine.alive] or self.engines
        return min(alive, key=lambda e: e.busy())  # (all dead: the request hears why)

    async def read(self, start: Snapshot | None, tokens: list[int]) -> Snapshot:
        return await self.pick(start).read(start, tokens)

    async def shared(self, snapshot: Snapshot) -> Snapshot:
        if len(self.engines) == 1:
            return snapshot
        return await asyncio.to_thread(_to_host, snapshot)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        return self.pick(request.start).generate(request)

    async def close(self) -> None:
        await asyncio.gather(*(engine.close() for engine in self.engines))

    def describe(self) -> str:
        first = self.engines[0]
        where = ", ".join(str(d) for d in self.devices)
        return (
            f"{self.spec.describe()} ({Resolved(precision_of(first.strategy), self.reason).describe()}, "
            f"batched engine on {len(self.engines)} "
            f"devices: {where}; per device max batch {first.max_batch}, {first.max_resident} resident, "
            f"{first.runner.describe_kernels()}{self._paths()})"
        )

    def _paths(self) -> str:
        """What the start-up self-tests chose: once when every device agrees, else per device."""
        paths = [engine.path.describe() for engine in self.engines if engine.path.checked is not None]
        if not paths:
            return ""
        if len(set(paths)) == 1 and len(paths) == len(self.engines):
            return f", {paths[0]}"
        return "; " + "; ".join(f"{e.runner.device} {e.path.describe()}" for e in self.engines)

    def metrics(self) -> dict[str, float]:
        """The devices' numbers together: sums of counts and rates, the slowest device's times."""
        each = [engine.metrics() for engine in self.engines]
        total = {key: float(sum(m[key] for m in each)) for key in each[0]}
        for key in ("ttft_p50_s", "step_p50_ms", "step_p99_ms", "path_level", "path_fallback"):
            total[key] = max(m[key] for m in each)
        total["devices"] = float(len(self.engines))
        return total

    def device_metrics(self) -> dict[str, dict[str, float]]:
        if len(self.engines) == 1:  # the totals say it all
            return {}
        names = [str(device) for device in self.devices]
        if len(set(names)) < len(names):  # two workers on one device (tests): number them
            names = [f"{name}#{i}" for i, name in enumerate(names)]
        return {name: engine.metrics() for name, engine in zip(names, self.engines, strict=True)}


def _to_host(snapshot: Snapshot) -> Snapshot:
    """The snapshot in host memory (pinned where there is a GPU, for fast copies back)."""
    return move_snapshot(snapshot, [torch.device("cpu")] * (len(snapshot.tensors) + 1))


def _canonical(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:<current>``, so that a tensor's device and a setting compare equal."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device
