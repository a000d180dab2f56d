"""The whole bot across processes: two Discord-tier processes (shards 0 and 1 of 2, on the offline
harness) and three chat replicas of the bot's own service (:func:`bot.app.open_chat`) on a Ray
cluster of three nodes, sharing Postgres and an S3 store. The scripted conversation of the
durability driver (:mod:`tests.scripted_channels`), greedy, in channels of several servers, must
leave the same transcripts as the driver's single-process run on SQLite."""

from __future__ import annotations

import asyncio
import functools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.app import open_chat
from bot.settings import Settings
from chat.storage import backend_for
from tests.chat.storage.servers import Servers
from tests.cluster.conftest import RESOURCES, LocalCluster
from tests.scripted_channels import SCRIPT
from tests.test_durability import DRIVER, driver_env, transcripts

ray = pytest.importorskip("ray")

from cluster import serve as chat_serve  # noqa: E402  (needs ray)

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 6  # chat, +, +gen, ++, +++, chat
# four servers, whose ids put two on each shard ((id >> 22) % 2), three channels each
SERVERS = [(k << 22) + 17 for k in (1, 2, 3, 4)]
PLAN = [(3 * n + k, guild, guild + 1000 + k) for n, guild in enumerate(SERVERS) for k in range(3)]
Transcript = list[tuple[str, str, str]]


@pytest.fixture(scope="module")
def settings(model_dir: Path, servers: Servers) -> Settings:
    """The replicas' settings: the tiny model, a fresh Postgres database and bucket prefix, the
    durability driver's reply lengths."""
    return Settings(
        model=model_dir / "v7.pth",
        db=servers.fresh_location(),
        strategy="cpu fp32",
        chat_max_tokens=24,
        gen_max_tokens=12,
    )


@pytest.fixture(scope="module")
def replicas(ray_cluster: LocalCluster, settings: Settings) -> Iterator[str]:
    """Three replicas of the bot's chat service, one per node; the cluster's address."""
    chat_serve.start(functools.partial(open_chat, settings), replicas=3, gpus=False, resources=RESOURCES)
    try:
        yield str(ray_cluster.cluster.address)
    finally:
        chat_serve.stop()


@pytest.fixture(scope="module")
def expected(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Transcript]:
    """The durability driver's transcripts, one process on SQLite, by script channel index."""
    db = tmp_path_factory.mktemp("alone") / "alone.sqlite3"
    done = subprocess.run(
        [sys.executable, str(DRIVER), str(model_dir / "v7.pth"), str(db), str(len(PLAN)), str(ROUNDS)],
        env=driver_env(strategy="cpu fp32"),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    assert done.stdout.strip().endswith("DONE"), done.stderr[-2000:]
    found = transcripts(db, len(PLAN))
    assert all(len(turns) == ROUNDS for turns in found.values())
    return found


async def stored(location: str) -> tuple[dict[int, Transcript], dict[int, tuple[str, int] | None]]:
    """Each channel's transcript and lease holder in the shared store."""
    store = await backend_for(location).open(location)
    try:
        turns = {c: await store.transcripts.turns(str(c)) for _, _, c in PLAN}
        holders = {c: await store.leases.holder(str(c)) for _, _, c in PLAN}
    finally:
        await store.close()
    return {c: [(t.command, t.user_text, t.reply_text) for t in ts] for c, ts in turns.items()}, holders


def test_two_shard_processes_and_three_replicas_answer_as_one_process(
    replicas: str,
    settings: Settings,
    expected: dict[str, Transcript],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert {SCRIPT[i].split(" ")[0] for i in range(ROUNDS)} >= {"+", "+gen", "++", "+++"}
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(PLAN))
    started = time.perf_counter()
    outs = [tmp_path / f"shard{shard}.jsonl" for shard in (0, 1)]
    command = [sys.executable, "-m", "tests.cluster.discord_process", replicas]
    processes = [
        subprocess.Popen(
            [*command, str(shard), str(plan), str(ROUNDS), str(out)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for shard, out in zip((0, 1), outs, strict=True)
    ]
    try:
        results = [process.communicate(timeout=420) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    elapsed = time.perf_counter() - started
    for shard, (process, (out, err)) in enumerate(zip(processes, results, strict=True)):
        assert process.returncode == 0, err[-3000:]
        # the bot of each process is the shard its settings name, of two
        assert json.loads(out.strip().splitlines()[-1]) == {"shard_ids": [shard], "shard_count": 2}
    lines = {shard: [json.loads(x) for x in out.read_text().splitlines()] for shard, out in enumerate(outs)}

    # each process answered every round in exactly the channels of its own shard's servers
    for shard, answered in lines.items():
        own = {c for _, g, c in PLAN if (g >> 22) % 2 == shard}
        assert own and sorted((x["channel"], x["round"]) for x in answered) == sorted(
            (c, r) for c in own for r in range(ROUNDS)
        )

    got, holders = asyncio.run(stored(str(settings.db)))
    for index, _, channel in PLAN:
        assert got[channel] == expected[str(index)], f"channel {channel} (script channel {index})"
    # what Discord shows is what was stored
    for answered in lines.values():
        for line in answered:
            reply = got[line["channel"]][line["round"]][2].strip()
            assert line["posted"] and reply in "\n".join(line["posted"]), line
    # each channel was taken once by one replica and kept; the channels are spread over replicas
    spread: dict[str, int] = {}
    for holder in holders.values():
        assert holder is not None and holder[1] == 1
        spread[holder[0]] = spread.get(holder[0], 0) + 1
    assert len(spread) > 1
    with capsys.disabled():
        print(
            f"\n2 shard processes, {len(PLAN)} channels x {ROUNDS} rounds through 3 replicas in "
            f"{elapsed:.1f} s; channels per replica {sorted(spread.values())}"
        )
