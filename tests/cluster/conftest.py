"""A Ray cluster on this machine for the replica tests: a head and worker nodes, each a raylet
of its own offering one ``chat_replica`` unit, and the store they share: Postgres and an S3 store
(:mod:`tests.chat.storage.servers`), their environment given to every node.

Ray is imported inside the fixtures: without the ``cluster`` extra, the default run still collects
this folder (its tests are deselected).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.standalone import StandaloneService
from tests.chat.storage.servers import Servers, ServerUnavailable, cluster_servers

ROOT = Path(__file__).resolve().parents[2]
# the nodes import this checkout; one torch thread per replica (the machine has few cores)
RUNTIME_ENV = {"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}}
RESOURCES = {"chat_replica": 1.0}


def node_args() -> dict[str, Any]:
    """One node: a CPU, room for one replica, a small object store."""
    return {"num_cpus": 1, "resources": {"chat_replica": 1}, "object_store_memory": 100 * 1024 * 1024}


class LocalCluster:
    """Ray's multi-node test cluster: ``nodes`` raylets on this machine, this process a driver."""

    def __init__(self, nodes: int, environment: dict[str, str]) -> None:
        ray = pytest.importorskip("ray")
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args=node_args())
        for _ in range(nodes - 1):
            self.add_node()
        runtime_env = {"env_vars": {**RUNTIME_ENV["env_vars"], **environment}}
        context = ray.init(address=self.cluster.address, namespace="rwkv-discord", runtime_env=runtime_env)
        self.dashboard = f"http://{context.dashboard_url}"

    def add_node(self) -> Any:
        return self.cluster.add_node(**node_args())

    def shutdown(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            self.cluster.shutdown()


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    """Postgres and an S3 store for the module, their variables set in this process too."""
    try:
        with cluster_servers() as running:
            saved = {name: os.environ.get(name) for name in running.environment}
            os.environ.update(running.environment)
            try:
                yield running
            finally:
                for name, value in saved.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
    except ServerUnavailable as exc:
        pytest.skip(f"no Postgres and S3 store for the cluster tests: {exc}")


@pytest.fixture(scope="module")
def ray_cluster(servers: Servers) -> Iterator[LocalCluster]:
    """Three nodes, one replica's room each, reaching the store; stopped after the module."""
    local = LocalCluster(3, servers.environment)
    try:
        yield local
    finally:
        local.shutdown()


def factory(model: Path, store: Path | str, **options: Any) -> StandaloneService:
    """The replicas' service: the tiny model, the reference engine, the shared store."""
    return StandaloneService(model, str(store), chat_max_tokens=48, **options)
