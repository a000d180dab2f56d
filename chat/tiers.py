"""The memory tiers of conversation states: on the device, and in host memory.

Each tier has a byte budget; the least recently used channels move down (device -> host ->
out of memory, where they are durable in storage only: see :mod:`chat.states`). With several
GPUs the device budget is per GPU, and each channel's states go back to the GPU they came from.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from engine.state import Snapshot, move_snapshot

__all__ = ["StateTiers", "TierStats"]


@dataclass
class _Entry:
    states: dict[int, Snapshot]
    home: list[torch.device] | None = None  # where the states were before they moved to the host
    by_device: dict[torch.device, int] = field(init=False)  # bytes of the states on each device

    def __post_init__(self) -> None:
        self.recount()

    def recount(self) -> None:
        """Count the bytes again after ``states`` changed or moved."""
        self.by_device = {}
        for snapshot in self.states.values():
            for tensor in (*snapshot.tensors, snapshot.logits):
                self.by_device[tensor.device] = self.by_device.get(tensor.device, 0) + tensor.nbytes

    @property
    def nbytes(self) -> int:
        return sum(self.by_device.values())


@dataclass
class TierStats:
    """Counters of moves between tiers."""

    promoted: int = 0  # host -> device
    demoted: int = 0  # device -> host
    evicted: int = 0  # host -> durable only
    restored: int = 0  # durable -> device (re-read from SQLite)


class StateTiers:
    """The device and host tiers: each channel's states, by state id, in LRU order by channel.

    The channel being used is never moved down, so a tier may exceed its budget by one channel.
    """

    def __init__(self, device_bytes: int, host_bytes: int) -> None:
        self.device_bytes = device_bytes
        self.host_bytes = host_bytes
        # Where the engine reads each state tensor (then the logits), learnt from its snapshots;
        # until then states stay where they are.
        self.layout: list[torch.device] | None = None
        self._device: OrderedDict[str, _Entry] = OrderedDict()
        self._host: OrderedDict[str, _Entry] = OrderedDict()
        self.stats = TierStats()

    def usage(self) -> dict[str, int]:
        """Channels and bytes per tier."""
        return {
            "device_channels": len(self._device),
            "device_bytes": sum(e.nbytes for e in self._device.values()),
            "host_channels": len(self._host),
            "host_bytes": sum(e.nbytes for e in self._host.values()),
        }

    def device_usage(self) -> dict[str, int]:
        """Bytes of the device tier on each device, by device name (``cuda:0``...)."""
        used: dict[str, int] = {}
        for entry in self._device.values():
            for device, n in entry.by_device.items():
                used[str(device)] = used.get(str(device), 0) + n
        return used

    def where(self, channel: str) -> str | None:
        """``"device"``, ``"host"`` or None."""
        if channel in self._device:
            return "device"
        return "host" if channel in self._host else None

    def learn(self, snapshot: Snapshot) -> None:
        """Take the devices of a snapshot the engine made as where states belong."""
        self.layout = _layout(snapshot)

    def _home(self, snapshot: Snapshot, home: list[torch.device] | None = None) -> Snapshot:
        """The snapshot where the engine reads it: a state already on a GPU stays on it (with
        several GPUs, each keeps its channels), one in host memory goes back to the GPU it came
        from (``home``), else to the devices of the engine's latest snapshot."""
        layout = home or self.layout
        if layout is None or len(layout) != len(snapshot.tensors) + 1:
            return snapshot
        if any(t.device.type != "cpu" for t in snapshot.tensors):
            return snapshot
        return move_snapshot(snapshot, layout)

    def get(self, channel: str, state_id: int) -> Snapshot | None:
        """A state held in memory, brought to the device first."""
        entry = self._device.get(channel)
        if entry is None:
            entry = self._host.pop(channel, None)
            if entry is None or state_id not in entry.states:
                if entry is not None:
                    self._host[channel] = entry
                return None
            entry.states = {k: self._home(v, entry.home) for k, v in entry.states.items()}
            entry.recount()
            entry.home = None
            self._device[channel] = entry
            self.stats.promoted += 1
            self._shrink(protect=channel)
        self._device.move_to_end(channel)
        return entry.states.get(state_id)

    def put(self, channel: str, states: dict[int, Snapshot]) -> None:
        """Hold exactly ``states`` for the channel, on the device, as the most recently used."""
        from_host = self._host.pop(channel, None)
        self._device.pop(channel, None)
        if not states:
            return
        # Back to the GPU the channel came from, unless one of its states is on a GPU already
        # (a state just read there): the others join it.
        on_gpu = [v for v in states.values() if any(t.device.type != "cpu" for t in v.tensors)]
        home = from_host.home if from_host is not None else None
        if on_gpu:
            home = _layout(on_gpu[0])
        placed = {k: self._home(v, home) for k, v in states.items()}
        self._device[channel] = _Entry(placed)
        self._shrink(protect=channel)

    def hold(self, channel: str, states: dict[int, Snapshot], live: set[int]) -> None:
        """Add ``states`` to the channel's, keep those in ``live`` (the ids its heads name), and
        put them on the device as the most recently used."""
        merged = {**self.held(channel), **states}
        self.put(channel, {k: v for k, v in merged.items() if k in live})

    def keep_only(self, channel: str, state_ids: set[int]) -> None:
        """Forget the channel's other states, leaving it in its tier and place in the order."""
        for tier in (self._device, self._host):
            entry = tier.get(channel)
            if entry is not None:
                entry.states = {k: v for k, v in entry.states.items() if k in state_ids}
                entry.recount()
                if not entry.states:
                    del tier[channel]

    def held(self, channel: str) -> dict[int, Snapshot]:
        """The states held for a channel (without moving them)."""
        entry = self._device.get(channel) or self._host.get(channel)
        return dict(entry.states) if entry else {}

    def drop(self, channel: str) -> None:
        """Forget a channel's states (they are durable in the database)."""
        self._device.pop(channel, None)
        self._host.pop(channel, None)

    def _shrink(self, protect: str) -> None:
        """Move the least recently used channels of each device over its budget (the budget is
        per device: with several GPUs, each keeps its own channels) to host memory, and the
        least recently used in host memory out of memory while the host tier is over budget."""
        used: dict[torch.device, int] = {}
        for entry in self._device.values():
            for device, n in entry.by_device.items():
                used[device] = used.get(device, 0) + n
        for name, entry in list(self._device.items()):
            over = {device for device, n in used.items() if n > self.device_bytes}
            if not over:
                break
            if name == protect or not over & entry.by_device.keys():
                continue
            del self._device[name]
            for device, n in entry.by_device.items():
                used[device] -= n
            if entry.states:
                entry.home = _layout(next(iter(entry.states.values())))
            host = torch.device("cpu")
            entry.states = {
                k: move_snapshot(v, [host] * (len(v.tensors) + 1)) for k, v in entry.states.items()
            }
            entry.recount()
            self._host[name] = entry
            self._host.move_to_end(name)
            self.stats.demoted += 1
        on_host = sum(e.nbytes for e in self._host.values())
        while on_host > self.host_bytes and self._host:
            _, entry = self._host.popitem(last=False)
            on_host -= entry.nbytes
            self.stats.evicted += 1


def _layout(snapshot: Snapshot) -> list[torch.device]:
    """The devices of a snapshot's tensors, then of its logits (as ``move_snapshot`` takes them)."""
    return [t.device for t in snapshot.tensors] + [snapshot.logits.device]
