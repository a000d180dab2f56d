"""``rwkv-discord replicas``: the chat tier on a Ray cluster (start, scale, status, stop).

The replicas run the chat service of :func:`bot.app.open_chat` with this process's settings
(the model, the database, the presets), one per GPU, or per unit of a custom resource on a CPU
cluster. The Discord processes then run with the same ``RWKV_DISCORD_CLUSTER`` and load no model.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from bot.settings import ENV_PREFIX, ConfigError, Settings, require_model


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``replicas`` and its actions."""
    replicas = sub.add_parser(
        "replicas",
        help="start, scale, list or stop the chat tier's replicas on a Ray cluster",
        description="The chat tier across machines: replicas of the chat service (the model and the "
        "conversations' states) on the Ray cluster of RWKV_DISCORD_CLUSTER, sharing the database of "
        "RWKV_DISCORD_DB, which must be a server every node reaches (postgresql://...). Needs the "
        "cluster extra (pip install '.[cluster]'). See the README, Running across machines.",
    )
    actions = replicas.add_subparsers(dest="replicas_command", required=True, metavar="ACTION")
    start = actions.add_parser("start", help="deploy N replicas (again: replace them all)")
    start.add_argument("count", type=int, help="how many replicas")
    start.add_argument(
        "--resource",
        metavar="NAME",
        help="CPU replicas: each takes one unit of this custom Ray resource (the nodes offer it with "
        "ray start --resources='{\"NAME\": K}'); without it each takes one GPU",
    )
    scale = actions.add_parser("scale", help="run N replicas from now on; the running ones stay")
    scale.add_argument("count", type=int, help="how many replicas")
    scale.add_argument(
        "--dashboard",
        default="http://127.0.0.1:8265",
        help="the Ray dashboard of the head node (default: http://127.0.0.1:8265)",
    )
    actions.add_parser("status", help="how many replicas run")
    actions.add_parser("stop", help="stop every replica (each closes its service)")


# What the replicas need from this process's environment besides the settings (which travel in
# the factory): the object store's endpoint and credentials, Postgres's password file or
# password, Hugging Face's cache and offline switch.
FORWARDED = ("AWS_", "PGPASSWORD", "PGPASSFILE", "HF_")


def forwarded_environment() -> dict[str, str]:
    """The variables of this process that the replicas get (see :data:`FORWARDED`)."""
    return {name: value for name, value in os.environ.items() if name.startswith(FORWARDED)}


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Carry out one ``replicas`` action."""
    if settings.cluster is None:
        raise ConfigError(
            f"{ENV_PREFIX}CLUSTER is not set: give the Ray cluster's address (host:6379 of its head, "
            "or auto on a node of it)"
        )
    if getattr(args, "count", 1) < 1:
        raise ConfigError(f"give at least 1 replica, not {args.count}")
    if args.replicas_command == "start":
        require_model(settings)
        if not isinstance(settings.db, str):
            raise ConfigError(
                f"{ENV_PREFIX}DB is an SQLite file ({settings.db}), which replicas on several machines "
                "cannot share: give postgresql://user@host/db?objects=s3://bucket/prefix"
            )
    from bot.app import open_chat  # torch and the engine: not for --help

    try:
        from cluster import serve
    except ImportError as exc:
        raise ConfigError(f"the cluster extra is not installed ({exc}): pip install '.[cluster]'") from exc
    app = settings.cluster_app
    if args.replicas_command == "start":
        # The replicas need no Discord token: it stays here.
        factory = functools.partial(open_chat, settings.model_copy(update={"token": None}))
        resources = None if args.resource is None else {args.resource: 1.0}
        serve.start(
            factory,
            replicas=args.count,
            gpus=args.resource is None,
            resources=resources,
            address=settings.cluster,
            app=app,
            runtime_env={"env_vars": forwarded_environment()},
        )
        print(f"{serve.running_replicas(app)} chat replicas of {app} run on {settings.cluster}")
        return 0
    serve.connect(settings.cluster)
    if args.replicas_command == "scale":
        try:
            serve.scale(args.count, dashboard=args.dashboard, app=app)
        except RuntimeError as exc:
            print(f"rwkv-discord: error: {exc}", file=sys.stderr)
            return 1
        print(f"{args.count} chat replicas of {app} run")
        return 0
    if args.replicas_command == "stop":
        serve.stop(app)
        print(f"the chat replicas of {app} are stopped")
        return 0
    print(f"{serve.running_replicas(app)} chat replicas of {app} run on {settings.cluster}")
    return 0
