"""Throughput of the chat replicas by their number, on the same load.

``python -m cluster.bench MODEL [--replicas 1,2,3] [--channels 12] [--messages 3]``: deploys the
replicas on the Ray cluster at ``--address`` (else on a cluster of CPU nodes started on this
machine, one node per replica), and for each count sends the same load: ``--channels``
conversations at once, each ``--messages`` greedy chat messages in turn (so every count does the
same work). It prints the tokens written per second and their ratio to the first count's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chat.outcome import OutcomeKind
from cluster import serve as chat_serve
from cluster.client import RemoteChat
from cluster.deployment import ServiceFactory
from cluster.standalone import StandaloneService

RESOURCE = "chat_replica"


@dataclass(frozen=True)
class Run:
    """One count's measurement."""

    replicas: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


async def drive(remote: RemoteChat, prefix: str, channels: int, messages: int) -> tuple[int, float]:
    """Send the load (greedy chat messages in ``channels`` conversations at once); returns the
    tokens written and the seconds it took. A message not answered with a reply is an error."""
    names = [f"{prefix}{i}" for i in range(channels)]
    await asyncio.gather(*(remote.update_settings(name, top_p=0.0) for name in names))

    async def talk(name: str) -> int:
        tokens = 0
        for index in range(messages):
            outcome = await remote.respond(name, f"Message {index} here: tell me something new.")
            if outcome.kind is not OutcomeKind.REPLY:
                raise RuntimeError(f"channel {name}: {outcome.kind.value}: {outcome.text}")
            tokens += len(outcome.tokens)
        return tokens

    start = time.perf_counter()
    counts = await asyncio.gather(*(talk(name) for name in names))
    return sum(counts), time.perf_counter() - start


def measure(
    factory: ServiceFactory,
    counts: Sequence[int],
    *,
    channels: int,
    messages: int,
    gpus: bool = False,
    resources: dict[str, float] | None = None,
    runtime_env: dict[str, Any] | None = None,
) -> list[Run]:
    """Deploy each count of replicas in turn and drive the same load through them (fresh
    channels each time, after one warm-up message per replica's share)."""
    runs: list[Run] = []
    for replicas in counts:
        chat_serve.start(factory, replicas=replicas, gpus=gpus, resources=resources, runtime_env=runtime_env)

        async def once(replicas: int = replicas) -> Run:
            remote = await RemoteChat.connect(gather_numbers=False)
            await drive(remote, f"warm{replicas}-", channels, 1)
            tokens, seconds = await drive(remote, f"bench{replicas}-", channels, messages)
            await remote.close()
            return Run(replicas, tokens, seconds)

        runs.append(asyncio.run(once()))
        chat_serve.stop()
    return runs


def report(runs: Sequence[Run]) -> str:
    """One line per count: tokens, seconds, tokens per second and the ratio to the first."""
    base = runs[0].tokens_per_s
    return "\n".join(
        f"replicas {run.replicas}: {run.tokens} tokens in {run.seconds:.2f} s, "
        f"{run.tokens_per_s:.1f} tokens/s, {run.tokens_per_s / base:.2f}x"
        for run in runs
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.bench", description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="an RWKV .pth file")
    parser.add_argument("--address", help="a running Ray cluster (host:port); default: start one here")
    parser.add_argument("--replicas", default="1,2,3", help="the counts to measure, e.g. 1,2,3")
    parser.add_argument("--channels", type=int, default=12)
    parser.add_argument("--messages", type=int, default=3)
    parser.add_argument("--engine", choices=("batched", "reference"), default="batched")
    parser.add_argument("--strategy", default="cpu fp32")
    parser.add_argument("--store", help="a store every node reaches (default: an SQLite file here)")
    parser.add_argument("--gpus", action="store_true", help="one GPU per replica (else a CPU resource)")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.replicas.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        store = args.store or str(Path(folder) / "bench.sqlite3")
        factory = StandaloneService(args.model.resolve(), store, engine=args.engine, strategy=args.strategy)
        resources = None if args.gpus else {RESOURCE: 1.0}
        with contextlib.ExitStack() as stack:
            if args.address is None:
                stack.enter_context(local_cluster(max(counts)))
            else:
                chat_serve.connect(args.address)
            runs = measure(
                factory,
                counts,
                channels=args.channels,
                messages=args.messages,
                gpus=args.gpus,
                resources=resources,
            )
    print(report(runs))
    return 0


def node_args() -> dict[str, Any]:
    """A CPU node of a cluster on one machine: room for one replica, a small object store."""
    return {"num_cpus": 1, "resources": {RESOURCE: 1}, "object_store_memory": 100 * 1024 * 1024}


@contextlib.contextmanager
def local_cluster(nodes: int) -> Iterator[None]:
    """A Ray cluster of ``nodes`` CPU nodes on this machine (each a raylet of its own), this
    process its driver, the nodes importing this checkout with one torch thread each."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=node_args())
    try:
        for _ in range(nodes - 1):
            cluster.add_node(**node_args())
        root = str(Path(__file__).resolve().parents[1])
        chat_serve.connect(
            cluster.address, runtime_env={"env_vars": {"PYTHONPATH": root, "OMP_NUM_THREADS": "1"}}
        )
        yield
    finally:
        chat_serve.shutdown()
        cluster.shutdown()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    raise SystemExit(main())
