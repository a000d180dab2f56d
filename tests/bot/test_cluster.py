"""The Discord tier on a Ray cluster started for the tests on this machine: two OS processes
sharing the identify slots and the REST budget through the Ray actor (bot/ray_limits.py), and
the bot answering through the chat tier's replicas on Ray Serve (``RWKV_DISCORD_CLUSTER``)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from discord.webhook.async_ import async_context

from bot.app import load_faq
from bot.limits import IDENTIFY_EVERY
from bot.runner import ReplicaNumbers, chat_service, create_bot
from bot.settings import ConfigError, Settings
from tests.bot.harness import GENERAL, MOD, FakeClock, Harness, RecordingAdapter, connect
from tests.bot.limits_worker import RATE, STREAMS
from tests.bot.test_rest_budget import most_in_any_span

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A one-CPU Ray cluster of this process with room for one chat replica, shut down after
    the module."""
    ray = pytest.importorskip("ray")
    ray.init(
        address="local",  # a cluster of its own, whatever else runs on this machine
        num_cpus=1,
        resources={"chat_replica": 1},
        namespace="rwkv-discord",
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}},
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def test_two_processes_share_the_identify_slot_and_the_rest_budget(ray_address: str, tmp_path: Path) -> None:
    """Two processes streaming 20 replies each through one budget of 10 requests a second: no
    second holds more than 10 writes of both together (measured on a span a little shorter, for
    the calls' lateness), every final write goes out, and their IDENTIFYs of one bucket (shards 0
    and 2, Discord allowing 2 at once), asked for together, go 5 seconds apart."""
    ready = tmp_path / "ready"
    ready.mkdir()
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.bot.limits_worker", ray_address, str(shard), str(ready), "2"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for shard in (0, 2)
    ]
    try:
        outputs = [worker.communicate(timeout=180)[0] for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert [worker.returncode for worker in workers] == [0, 0]
    results = [json.loads(output.strip().splitlines()[-1]) for output in outputs]
    writes = [(kind, at) for result in results for kind, at in result["writes"]]
    assert all(sum(kind == "final" for kind, _ in result["writes"]) == STREAMS for result in results)
    assert any(kind == "edit" for kind, _ in writes)
    assert most_in_any_span([at for _, at in writes], 0.9) <= RATE
    first, second = sorted(result["identified"] for result in results)
    assert IDENTIFY_EVERY - 0.5 <= second - first < 2 * IDENTIFY_EVERY


@pytest.fixture
def chat_tier(ray_address: str, model_dir: Path, tmp_path: Path) -> Iterator[str]:
    """One chat replica on the cluster (the tiny model, its own database); stopped after."""
    from cluster import serve as tier
    from cluster.standalone import StandaloneService

    service = StandaloneService(model_dir / "v7.pth", str(tmp_path / "tier.sqlite3"), chat_max_tokens=40)
    tier.start(service, replicas=1, gpus=False, resources={"chat_replica": 1})
    try:
        yield ray_address
    finally:
        tier.stop()


async def test_the_bot_answers_through_the_chat_tier(chat_tier: str, tmp_path: Path) -> None:
    """With ``cluster`` set, the bot loads no model: it joins the chat tier, is enabled in a
    channel (stored by the replica) and streams the replica's reply into Discord."""
    settings = Settings(db=tmp_path / "bot.sqlite3", token="a-token", cluster=chat_tier, user_cooldown=0)  # type: ignore[arg-type]
    faq, _ = load_faq(settings)
    adapter = RecordingAdapter()
    token = async_context.set(adapter)
    try:
        async with chat_service(settings, None, faq) as (numbers, service):
            assert isinstance(numbers, ReplicaNumbers) and "1 replicas" in numbers.describe()
            clock = FakeClock()
            bot = await create_bot(settings, numbers, service, faq, clock=clock, sleep=clock.sleep)
            harness = Harness(bot, await connect(bot, clock), adapter, clock)
            try:
                await harness.slash("rwkv-mod", "enable", author=MOD)
                assert await service.enabled_channels() == {str(GENERAL)}
                harness.http.messages.clear()
                await harness.say("-top_p=0 Hello there")
                (reply,) = harness.http.posted_to(GENERAL)
                assert reply["content"].strip() and reply["components"]
            finally:
                await bot.close()
    finally:
        async_context.reset(token)


async def test_a_process_keeps_its_own_limits_while_the_actor_is_gone(
    ray_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With the shared actor gone, writes and IDENTIFYs go on under this process's own limits,
    said once in the log; nothing raises."""
    import ray

    from bot.ray_limits import RayLimits

    limits = RayLimits.connect(ray_address, "a-test-token", 5, identify_every=0.2)
    assert await limits.try_take()
    ray.kill(limits.actor, no_restart=True)
    caplog.set_level("WARNING", logger="bot.ray_limits")
    await limits.take()
    await limits.identify(0, 1)
    taken = [await limits.try_take() for _ in range(10)]
    # the fallback's own budget: streamed edits 80 % of 5 a second, less the final write above
    assert limits.unreachable and taken == [True] * 3 + [False] * 7
    (line,) = [r.getMessage() for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert "\n" not in line


async def test_an_unknown_chat_application_is_one_configuration_line(chat_tier: str, tmp_path: Path) -> None:
    """A chat application that does not run on the cluster is said in one line naming the
    setting and the application that runs."""
    settings = Settings(db=tmp_path / "bot.sqlite3", cluster=chat_tier, cluster_app="other")
    faq, _ = load_faq(settings)
    with pytest.raises(ConfigError) as info:
        async with chat_service(settings, None, faq):
            pass
    message = str(info.value)
    assert "RWKV_DISCORD_CLUSTER_APP is wrong" in message and "'other'" in message
    assert "running: rwkv-chat" in message and "\n" not in message
