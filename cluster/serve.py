"""Starting, scaling and stopping the chat deployment on a Ray cluster.

The cluster is Ray's: ``ray start --head`` on one machine and ``ray start --address=HEAD:6379`` on
the others, each node offering its GPUs (or, for CPU replicas, a custom resource such as
``--resources='{"chat_replica": 1}'``). :func:`start` deploys the replicas there; they keep
running after the process that started them exits, and a front end connects to them with
:func:`cluster.client.RemoteChat.connect`.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import ray
from ray import serve

from cluster.deployment import ServiceFactory, chat_deployment

APP = "rwkv-chat"
DEPLOYMENT = "ChatReplica"
DASHBOARD = "http://127.0.0.1:8265"  # the head node's Ray dashboard, where Serve's REST API is


def connect(address: str | None = None, *, runtime_env: dict[str, Any] | None = None) -> None:
    """Join the Ray cluster at ``address`` (``host:port``; None: the one this machine belongs
    to, or a new local one) unless this process is in one already."""
    if not ray.is_initialized():
        ray.init(address=address, namespace="rwkv-discord", runtime_env=runtime_env, log_to_driver=False)


def start(
    factory: ServiceFactory,
    *,
    replicas: int,
    gpus: bool = True,
    resources: dict[str, float] | None = None,
    address: str | None = None,
    runtime_env: dict[str, Any] | None = None,
    app: str = APP,
) -> None:
    """Deploy ``replicas`` chat replicas as the Serve application ``app``, each building its
    service with ``factory`` (a picklable callable: every node runs it), and wait until all are
    ready. One GPU per replica with ``gpus``, else one unit of each of ``resources`` (e.g.
    ``{"chat_replica": 1}``). Called again, it replaces every replica (a new version);
    :func:`scale` changes only the count. Several applications (several models) may share one
    cluster."""
    connect(address, runtime_env=runtime_env)
    serve.start(proxy_location="Disabled")
    deployment = chat_deployment(replicas=replicas, gpus=gpus, resources=resources)
    serve.run(deployment.bind(factory), name=app, route_prefix=None, external_scaler_enabled=True)


def scale(replicas: int, *, dashboard: str = DASHBOARD, timeout: float = 300.0, app: str = APP) -> None:
    """Run ``replicas`` chat replicas from now on, and wait until they run: the running ones
    stay, only the difference starts or stops (through Ray Serve's scaling REST API on the
    head node's dashboard). RuntimeError when Serve refuses, or the count is not reached."""
    request = urllib.request.Request(
        f"{dashboard}/api/v1/applications/{app}/deployments/{DEPLOYMENT}/scale",
        data=json.dumps({"target_num_replicas": replicas}).encode(),
        headers={"Content-Type": "application/json", **_auth_headers()},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        said = exc.read().decode()
        if exc.code == 401:
            said += " (the cluster uses Ray's token authentication: give this process its token)"
        raise RuntimeError(f"Ray Serve did not scale to {replicas} replicas: {said}") from exc
    except urllib.error.URLError as exc:
        raise RuntimeError(f"the Ray dashboard at {dashboard} cannot be reached: {exc.reason}") from exc
    deadline = time.monotonic() + timeout
    while running_replicas(app) != replicas:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{running_replicas(app)} chat replicas run after {timeout:.0f} s, not {replicas}"
            )
        time.sleep(0.5)


def _auth_headers() -> dict[str, str]:
    """The header with the cluster's token when Ray's token authentication is on (Ray 2.60 turns
    it on for a cluster started where a token exists, ~/.ray/auth_token): the dashboard's REST
    API refuses requests without it. Ray's own HTTP clients add it the same way."""
    try:
        from ray._private.authentication.http_token_authentication import (
            get_auth_headers_if_auth_enabled,
        )
    except ImportError:  # a Ray without token authentication
        return {}
    return dict(get_auth_headers_if_auth_enabled({}))


def running_replicas(app: str = APP) -> int:
    """How many chat replicas of ``app`` are running now (0 when the deployment is not there)."""
    application = serve.status().applications.get(app)
    if application is None or DEPLOYMENT not in application.deployments:
        return 0
    states = application.deployments[DEPLOYMENT].replica_states
    return sum(count for state, count in states.items() if state == "RUNNING")


def shutdown() -> None:
    """Stop Serve on the cluster (each replica closes its service) and leave the cluster."""
    serve.shutdown()  # type: ignore[no-untyped-call]
    ray.shutdown()


def stop(app: str = APP) -> None:
    """Stop the chat replicas of ``app`` (each closes its service)."""
    serve.delete(app)
