"""Several batched engines, one per device, behind one engine: routing, balance, settings."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.app import load_engine
from bot.settings import ConfigError, load_settings
from engine.batched_engine import BatchedEngine
from engine.devices import DeviceEngines, parse_devices
from engine.errors import EngineError
from engine.formats import inspect_model
from engine.interface import Finished, GenerationRequest, ReplyMode
from engine.runner import ModelRunner
from engine.sampling import SamplingParams
from engine.state import Snapshot
from engine.tokenizer import world_tokenizer
from tests.conftest import open_service

GREEDY = SamplingParams(top_p=0.0)


@pytest.fixture(scope="module")
def two(model_dir: Path) -> Iterator[DeviceEngines]:
    """Two workers of the tiny RWKV-7 model (both on the CPU: this machine has no GPU)."""
    engines = DeviceEngines([BatchedEngine.load(model_dir / "v7.pth", max_batch=4) for _ in range(2)])
    yield engines
    asyncio.run(engines.close())


async def reply(engine: BatchedEngine | DeviceEngines, prompt: list[int]) -> list[int]:
    request = GenerationRequest(None, prompt, GREEDY, ReplyMode.FREE, 6)
    events = [event async for event in engine.generate(request)]
    assert isinstance(events[-1], Finished)
    return events[-1].tokens


def test_device_lists() -> None:
    """A list of distinct cpu/cuda devices is taken; anything else is refused."""
    assert parse_devices(" cuda:0, cuda:1 ") == ["cuda:0", "cuda:1"]
    assert parse_devices("cuda:01,cuda") == ["cuda:1", "cuda"]
    assert parse_devices("cpu") == ["cpu"]
    assert parse_devices("cuda:0,cuda:1,") == ["cuda:0", "cuda:1"]
    for wrong in ("", "gpu0", "cuda:x", "cpu:1", "cuda:0,cuda:0", "cuda,cuda:0", "cuda:\u0663", "cpu,cuda:0"):
        with pytest.raises(ValueError):
            parse_devices(wrong)


async def test_requests_spread_over_the_devices_and_give_the_same_replies(
    two: DeviceEngines, model_dir: Path
) -> None:
    """Channels that start together are shared out between the workers, with the replies one
    engine gives; the status numbers add the devices up."""
    prompts = [two.tokenizer.encode(f"Channel {i}:") for i in range(6)]
    before = [engine.metrics()["steps"] for engine in two.engines]
    got = await asyncio.gather(*(reply(two, p) for p in prompts))
    assert all(engine.metrics()["steps"] > b for engine, b in zip(two.engines, before, strict=True))
    single = BatchedEngine.load(model_dir / "v7.pth", max_batch=4)
    try:
        assert got == [await reply(single, p) for p in prompts]
    finally:
        await single.close()
    metrics = two.metrics()
    assert metrics["devices"] == 2 and metrics["max_resident"] == 8
    assert (metrics["path_level"], metrics["path_fallback"]) == (3, 0)  # the worst device, not a sum
    assert "on 2 devices" in two.describe()
    each = two.device_metrics()
    assert sorted(each) == ["cpu#0", "cpu#1"]
    assert [m["steps"] for m in each.values()] == [e.metrics()["steps"] for e in two.engines]
    assert sum(m["steps"] for m in each.values()) == metrics["steps"]


async def test_a_state_on_a_device_goes_back_to_that_device(two: DeviceEngines) -> None:
    """A request whose start state is on a GPU runs on that GPU's worker; a state in host memory
    goes to the least busy worker."""
    two.devices[1] = torch.device("meta")  # stands for a second GPU (this machine has none)
    try:
        on_gpu = Snapshot([torch.empty(3, device="meta")], torch.empty(2, device="meta"), None, "fp")
        assert two.pick(on_gpu) is two.engines[1]
        on_host = await two.read(None, two.tokenizer.encode("Hello"))
        assert two.pick(on_host) is two.engines[0]  # both idle: the first
    finally:
        two.devices[1] = two.devices[0]


def test_devices_setting(model_dir: Path) -> None:
    """RWKV_DISCORD_DEVICES is checked at start, with one line naming it and the fix."""
    assert load_settings(devices="cuda:0, cuda:1").devices == "cuda:0,cuda:1"
    assert load_settings(devices=" ").devices is None
    assert load_settings(devices="cuda:00").devices == "cuda:0"
    with pytest.raises(ConfigError, match=r"RWKV_DISCORD_DEVICES is wrong .*cuda:0,cuda:1"):
        load_settings(devices="cuda:0,cuda:0")
    with pytest.raises(ConfigError, match=r"RWKV_DISCORD_DEVICES is set, but v4\.pth runs on the reference"):
        asyncio.run(load_engine(load_settings(model=model_dir / "v4.pth", devices="cpu")))
    with pytest.raises(EngineError, match="needs a CUDA GPU"):  # refused before any model is loaded
        DeviceEngines.load(model_dir / "v7.pth", "cuda fp16", ["cuda:0", "cuda:1"])


async def test_devices_setting_loads_a_worker_per_device(model_dir: Path) -> None:
    """With RWKV_DISCORD_DEVICES, the bot's engine is one batched worker per listed device."""
    engine = await load_engine(load_settings(model=model_dir / "v7.pth", devices="cpu", max_batch=2))
    try:
        assert isinstance(engine, DeviceEngines) and len(engine.engines) == 1
        assert await reply(engine, engine.tokenizer.encode("Hi")) != []
        assert engine.device_metrics() == {}  # one device: its numbers are the totals
    finally:
        await engine.close()


async def test_a_dead_worker_gets_no_new_channels(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that could not start is passed over: its empty queue does not make it the least busy."""
    original = BatchedEngine._bind
    starts = 0

    def first_fails(self: BatchedEngine) -> None:
        nonlocal starts
        starts += 1
        if starts == 1:
            raise RuntimeError("CUDA error: out of memory")
        original(self)

    monkeypatch.setattr(BatchedEngine, "_bind", first_fails)
    model_path = model_dir / "v7.pth"
    spec = inspect_model(model_path)
    dead = BatchedEngine(ModelRunner.load(model_path), spec, world_tokenizer(), "cpu fp32")
    await asyncio.wait_for(asyncio.to_thread(dead._ready.wait), 10)  # the first start: it fails
    healthy = BatchedEngine.load(model_path, max_batch=2)
    engines = DeviceEngines([dead, healthy])
    try:
        assert not dead.alive and healthy.alive
        for i in range(3):
            assert await reply(engines, engines.tokenizer.encode(f"Hi {i}")) != []
    finally:
        await engines.close()


async def test_a_load_that_fails_halfway_stops_the_workers_it_started(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the second device fails to load, the first one's worker is stopped, not left running,
    and the error is the load's, also when the load runs on an event loop's thread."""
    real_load = BatchedEngine.load
    started: list[BatchedEngine] = []

    def load(*args: Any, **kwargs: Any) -> BatchedEngine:
        if started:
            raise EngineError("not enough GPU memory to load v7.pth as 'cuda:1 fp16'")
        started.append(real_load(args[0]))  # on the CPU: this machine has no GPU
        return started[0]

    monkeypatch.setattr(BatchedEngine, "load", load)
    monkeypatch.setattr("engine.devices.parse_strategy", lambda strategy: None)  # pretend GPUs are there
    with pytest.raises(EngineError, match="not enough GPU memory"):
        DeviceEngines.load(model_dir / "v7.pth", "cuda fp16", ["cuda:0", "cuda:1"])
    assert len(started) == 1 and not started[0].alive and not started[0]._thread.is_alive()


async def test_a_preset_opening_belongs_to_no_device(
    two: DeviceEngines, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The opening state every new channel starts from is kept in host memory, so new channels
    spread over the devices; other reads, a channel's own included, stay where they ran."""
    moved: list[Snapshot] = []

    def to_host(snapshot: Snapshot) -> Snapshot:
        moved.append(snapshot)
        return snapshot

    monkeypatch.setattr("engine.devices._to_host", to_host)
    service = await open_service(two, tmp_path / "chat.sqlite3")  # type: ignore[arg-type]
    try:
        await service.respond("a", "Hello")
        await service.respond("b", "Hello")
        await service.respond("b", "And then?")
        assert len(moved) == 1  # the chat preset's opening, once (then cached)
        assert await two.read(None, two.tokenizer.encode("Hi")) is not None
        assert len(moved) == 1
    finally:
        await service.store.close()


def test_a_strategy_with_more_than_a_precision_is_refused_with_devices(model_dir: Path) -> None:
    """With several devices only the precision comes from the strategy; more is refused, and a
    device that cannot take the precision is named."""
    with pytest.raises(EngineError, match="only the precision"):
        DeviceEngines.load(model_dir / "v7.pth", "cuda fp16 *10 -> cpu fp32", ["cuda:0", "cuda:1"])
    with pytest.raises(EngineError, match="device cpu of the devices setting"):
        DeviceEngines.load(model_dir / "v7.pth", "cuda fp16", ["cpu"])
