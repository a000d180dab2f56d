"""The chat service as replicas on a Ray cluster of three nodes on this machine, sharing one store
(Postgres and an S3 store).

Greedy replies make the replicas comparable with one service alone: every channel must answer
exactly as one service would, through a replica's death and a new replica, which shows that each
answered turn was kept and that no stale state was used. The tests run in order on one cluster.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chat.outcome import Outcome, OutcomeKind
from chat.session import MOVED
from chat.storage import Storage, backend_for
from engine.interface import TextDelta
from tests.chat.storage.servers import Servers
from tests.cluster.conftest import RESOURCES, LocalCluster, factory
from tests.conftest import TINY
from tools.make_model import write_random_model

ray = pytest.importorskip("ray")

from cluster import serve as chat_serve  # noqa: E402  (needs ray)
from cluster.bench import measure, report  # noqa: E402
from cluster.client import LOST, RemoteChat  # noqa: E402
from cluster.serve import APP  # noqa: E402

pytestmark = pytest.mark.cluster

CHANNELS = [f"ch{i}" for i in range(20)]
MESSAGES = ["Hello there.", "What is your name?", "Tell me about the sea.", "And the sky?"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("model") / "v7.pth", 7, TINY, seed=7)


@pytest.fixture(scope="module")
def store(servers: Servers) -> str:
    """The store every replica shares: a fresh Postgres database and bucket prefix."""
    return servers.fresh_location()


async def open_store(location: str) -> Storage:
    return await backend_for(location).open(location)


@pytest.fixture(scope="module")
def expected(model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Each channel's greedy replies from one service in this process, without an owner."""

    async def run() -> dict[str, list[str]]:
        make = factory(model, tmp_path_factory.mktemp("alone") / "alone.sqlite3")
        async with make() as service:
            replies: dict[str, list[str]] = {}
            for channel in CHANNELS:
                await service.update_settings(channel, top_p=0.0)
                replies[channel] = [(await service.respond(channel, m)).text for m in MESSAGES]
            return replies

    return asyncio.run(run())


@pytest.fixture(scope="module")
def replicas(ray_cluster: LocalCluster, model: Path, store: str) -> Iterator[str]:
    """Three replicas, one per node; the shared store's path."""
    chat_serve.start(factory(model, store, gen_max_tokens=400), replicas=3, gpus=False, resources=RESOURCES)
    yield store
    chat_serve.stop()


async def say(remote: RemoteChat, round_: int) -> dict[str, str]:
    """Round ``round_`` of the script in every channel, six at a time (the replicas share this
    machine's cores); the replies by channel."""
    room = asyncio.Semaphore(6)

    async def one(channel: str) -> Outcome:
        async with room:
            return await remote.respond(channel, MESSAGES[round_])

    outcomes = await asyncio.gather(*(one(c) for c in CHANNELS))
    assert all(o.kind is OutcomeKind.REPLY for o in outcomes), [o.text for o in outcomes]
    return {c: o.text for c, o in zip(CHANNELS, outcomes, strict=True)}


async def transcripts(store: str) -> dict[str, list[str]]:
    """The replies the store kept, by channel."""
    opened = await open_store(store)
    try:
        return {c: [t.reply_text for t in await opened.transcripts.turns(c)] for c in CHANNELS}
    finally:
        await opened.close()


async def holders(store: str, channels: list[str]) -> dict[str, tuple[str, int] | None]:
    opened = await open_store(store)
    try:
        return {c: await opened.leases.holder(c) for c in channels}
    finally:
        await opened.close()


async def test_replicas_answer_as_one_service(replicas: str, expected: dict[str, list[str]]) -> None:
    remote = await RemoteChat.connect(gather_numbers=False)
    await asyncio.gather(*(remote.update_settings(c, top_p=0.0) for c in CHANNELS))
    for round_ in (0, 1):
        replies = await say(remote, round_)
        assert replies == {c: expected[c][round_] for c in CHANNELS}
    owners = {c: await remote.replica_of(c) for c in CHANNELS}
    assert len(set(owners.values())) == 3  # the channels are spread over the replicas
    # each channel stuck to its replica: taken once, never moved
    assert await holders(replicas, CHANNELS) == {c: (owners[c], 1) for c in CHANNELS}
    numbers = await remote.refresh_numbers()
    assert sorted(numbers) == sorted(set(owners.values()))
    assert sum(n["leases"] for n in numbers.values()) == len(CHANNELS)


async def test_a_stale_replica_cannot_commit(replicas: str) -> None:
    """A replica still writing a reply when the channel's lease was taken (here by the test,
    as a replica would) is refused at its commit, stores nothing, and says so in one line."""
    remote = await RemoteChat.connect(gather_numbers=False)
    assert (await remote.respond("fence", "Hello there.")).kind is OutcomeKind.REPLY
    owner = await remote.replica_of("fence")
    events = remote.handle("fence", "+gen Once upon a time")
    assert isinstance(await anext(events), TextDelta)  # the replica is writing under epoch 1
    intruder = await open_store(replicas)
    try:
        assert await intruder.leases.take("fence", "intruder") == 2
        rest = [event async for event in events]
        assert rest[-1] == Outcome(OutcomeKind.ERROR, MOVED)
        assert len(await intruder.transcripts.turns("fence")) == 1  # the +gen was not stored
        assert await intruder.leases.holder("fence") == ("intruder", 2)
        # the next message: the replica takes the channel back under a new epoch
        assert (await remote.respond("fence", "Still there?")).kind is OutcomeKind.REPLY
        assert await intruder.leases.holder("fence") == (owner, 3)
        assert len(await intruder.transcripts.turns("fence")) == 2
    finally:
        await intruder.close()


async def test_stopping_a_reply_reaches_its_replica(replicas: str) -> None:
    remote = await RemoteChat.connect(gather_numbers=False)
    cancel = threading.Event()
    events = remote.handle("stop", "+gen Once upon a time", cancel=cancel)
    assert isinstance(await anext(events), TextDelta)
    cancel.set()  # as the front end's stop button does
    outcome = [event async for event in events][-1]
    assert isinstance(outcome, Outcome) and outcome.kind is OutcomeKind.GENERATION
    assert "The reply was stopped; what was written so far is kept." in outcome.notices
    assert 0 < len(outcome.tokens) < 400
    assert not await remote.busy("stop")


async def test_killing_a_replica_mid_reply(replicas: str, expected: dict[str, list[str]]) -> None:
    remote = await RemoteChat.connect(gather_numbers=False)
    owners = {c: await remote.replica_of(c) for c in CHANNELS}
    victim = owners["ch0"]
    orphans = [c for c in CHANNELS if owners[c] == victim]
    events = remote.handle("ch0", "+gen Once upon a time")
    assert isinstance(await anext(events), TextDelta)
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#{victim}", namespace="serve"))
    rest = [event async for event in events]
    assert rest[-1] == Outcome(OutcomeKind.ERROR, LOST)
    # every channel goes on, the dead replica's on the others, as one service would answer
    replies = await say(remote, 2)
    assert replies == {c: expected[c][2] for c in CHANNELS}
    assert await transcripts(replicas) == {c: expected[c][:3] for c in CHANNELS}
    moved = await holders(replicas, orphans)
    for channel in orphans:
        holder = moved[channel]
        assert holder is not None and holder[0] != victim and holder[1] >= 2
        assert await remote.replica_of(channel) != victim


async def test_a_fourth_replica_takes_about_a_quarter(
    ray_cluster: LocalCluster,
    model: Path,
    replicas: str,
    expected: dict[str, list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    remote = await RemoteChat.connect(gather_numbers=False)
    await wait_for(lambda: chat_serve.running_replicas() == 3)
    probes = [f"probe{i}" for i in range(400)]
    before = await where(remote, probes, 3)
    ray_cluster.add_node()
    scaled = time.perf_counter()
    await asyncio.to_thread(chat_serve.scale, 4, dashboard=ray_cluster.dashboard)
    scaled = time.perf_counter() - scaled
    after = await where(remote, probes, 4)
    (new,) = set(after.values()) - set(before.values())
    assert set(before.values()) < set(after.values())  # the three kept running
    moved = [c for c in probes if before[c] != after[c]]
    assert all(after[c] == new for c in moved)  # nothing moved between the old replicas
    share = len(moved) / len(probes)
    assert 0.12 < share < 0.40
    # the conversations that moved go on from the store, as one service would answer
    owners = {c: await remote.replica_of(c) for c in CHANNELS}
    times: dict[str, list[float]] = {"moved": [], "stayed": []}
    for channel in CHANNELS:
        start = time.perf_counter()
        outcome = await remote.respond(channel, MESSAGES[3])
        times["moved" if owners[channel] == new else "stayed"].append(time.perf_counter() - start)
        assert outcome.text == expected[channel][3]
    numbers = (await remote.refresh_numbers())[new]
    assert numbers["leases"] == len(times["moved"]) > 0
    assert numbers["states"]["restored"] >= len(times["moved"])
    with capsys.disabled():
        print(
            f"\n3 -> 4 replicas in {scaled:.1f} s: {len(moved)} of {len(probes)} channels moved "
            f"({share:.0%}); "
            f"a message of a moved conversation (lease, restore from the store, reply) "
            f"{1000 * sum(times['moved']) / len(times['moved']):.0f} ms on average "
            f"({len(times['moved'])}), of one that stayed "
            f"{1000 * sum(times['stayed']) / len(times['stayed']):.0f} ms ({len(times['stayed'])}); "
            f"restore re-read {numbers['states']['restore_tokens']} tokens"
        )


async def test_throughput_by_replicas(
    ray_cluster: LocalCluster, servers: Servers, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chat_serve.stop()
    make = factory(model, await asyncio.to_thread(servers.fresh_location), engine="batched")
    runs = await asyncio.to_thread(measure, make, [1, 2, 3], channels=6, messages=2, resources=RESOURCES)
    assert [run.replicas for run in runs] == [1, 2, 3]
    assert all(run.tokens > 0 for run in runs)
    with capsys.disabled():
        print("\n" + report(runs))


async def where(remote: RemoteChat, channels: list[str], count: int) -> dict[str, str]:
    """The replica of each channel, once the router knows ``count`` replicas."""
    deadline = time.monotonic() + 60.0
    while True:
        found = {c: await remote.replica_of(c) for c in channels}
        if len(set(found.values())) == count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(1.0)


async def wait_for(done: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(done):
        assert time.monotonic() < deadline
        await asyncio.sleep(1.0)
