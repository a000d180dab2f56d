"""``rwkv-discord replicas``, run as an owner would: start, status, a message through the tier,
scale is tested in ``test_replicas.py``, stop. The replicas are the bot's own (``open_chat`` with
the settings of the command's environment), on a 3-node Ray cluster with Postgres and an S3
store."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from chat.outcome import OutcomeKind
from tests.chat.storage.servers import Servers
from tests.cluster.conftest import LocalCluster

pytestmark = pytest.mark.cluster
ray = pytest.importorskip("ray")

from cluster import serve as chat_serve  # noqa: E402  (needs ray)
from cluster.client import RemoteChat  # noqa: E402


@pytest.fixture(scope="module")
def environment(ray_cluster: LocalCluster, servers: Servers, model_dir: Path) -> Iterator[dict[str, str]]:
    """The command's environment: the cluster, a fresh Postgres and object store, the model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_DISCORD_")}
    env.update(
        RWKV_DISCORD_CLUSTER=ray_cluster.cluster.address,
        RWKV_DISCORD_DB=servers.fresh_location(),
        RWKV_DISCORD_MODEL=str(model_dir / "v7.pth"),
        RWKV_DISCORD_STRATEGY="cpu fp32",
        RWKV_DISCORD_CHAT_MAX_TOKENS="16",
        OMP_NUM_THREADS="1",
    )
    yield env


def command(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", "replicas", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


async def test_start_status_a_message_and_stop(environment: dict[str, str]) -> None:
    started = command(environment, "start", "2", "--resource", "chat_replica")
    assert started.returncode == 0, started.stderr[-2000:]
    assert "2 chat replicas of rwkv-chat run" in started.stdout
    status = command(environment, "status")
    assert status.returncode == 0 and "2 chat replicas of rwkv-chat run" in status.stdout
    remote = await RemoteChat.connect(gather_numbers=False)
    try:
        outcome = await remote.respond("c", "-top_p=0 Hello there")
        assert outcome.kind is OutcomeKind.REPLY and outcome.text
    finally:
        await remote.close()
    stopped = command(environment, "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert chat_serve.running_replicas() == 0
