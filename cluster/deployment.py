"""The chat service as a Ray Serve deployment: one replica per GPU, each with its own service.

A replica builds its :class:`~chat.session.ChatService` from the factory it is given (an async
context manager yielding a ready service, e.g. the bot's ``open_chat`` bound to its settings), and
names itself the owner of the channels it serves: its service takes each channel's lease at the
first message there, and writes the channel's states only under that lease's epoch. Continuous
batching stays inside the replica (its engine batches the channels it serves).

Every method takes the channel (or server) it is about first: the client routes by it (see
:mod:`cluster.client`). What a replica gives back pickles: text pieces, outcomes, contexts,
plain numbers and strings.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any

from ray import serve

from chat.grammar import GrammarError, Parsed
from chat.outcome import ChatEvent, Outcome
from chat.session import ChatService
from chat.settings import ChannelContext, RoleRules

log = logging.getLogger(__name__)

ServiceFactory = Callable[[], AbstractAsyncContextManager[ChatService]]


class ChatReplica:
    """One replica: one chat service on one engine (one GPU, or a share of a CPU machine)."""

    async def __init__(self, factory: ServiceFactory) -> None:  # type: ignore[misc]  # Serve awaits it
        context = serve.get_replica_context()
        # the lease holder name: unique to this replica's life (a restarted one is another owner)
        self.name = f"{context.deployment}#{context.replica_id.unique_id}"
        self.node = socket.gethostname()
        self._stack = AsyncExitStack()
        self.service = await self._stack.enter_async_context(factory())
        self.service.owner = self.name
        self._cancels: dict[str, threading.Event] = {}
        log.info("replica %s ready on %s (pid %d)", self.name, self.node, os.getpid())

    async def __del__(self) -> None:
        """Close the service (the store; the factory closes the engine) when Serve stops us."""
        await self._stack.aclose()

    # ----------------------------------------------------------------- messages

    async def handle(
        self,
        channel_id: str,
        message: str | Parsed | GrammarError,
        *,
        guild_id: str | None = None,
        parent_id: str | None = None,
        context: ChannelContext | None = None,
        speaker: str | None = None,
    ) -> AsyncIterator[ChatEvent]:
        """:meth:`ChatService.handle`, streamed; :meth:`stop` stops it."""
        cancel = threading.Event()
        events = self.service.handle(
            channel_id,
            message,
            cancel=cancel,
            guild_id=guild_id,
            parent_id=parent_id,
            context=context,
            speaker=speaker,
        )
        try:
            async for event in events:
                yield event
        finally:
            cancel.set()  # a stream the caller dropped stops its generation
            await events.aclose()

    async def respond(self, channel_id: str, message: str) -> Outcome:
        """:meth:`ChatService.respond`: the outcome only."""
        return await self.service.respond(channel_id, message)

    async def stop(self, channel_id: str) -> bool:
        """Stop the generation running in the channel; False when none is running here."""
        return self.service.stop(channel_id)

    async def replica(self, channel_id: str) -> str:
        """The name of the replica the channel's messages come to (this one)."""
        return self.name

    async def busy(self, channel_id: str) -> bool:
        """True while a message of the channel is being handled here."""
        return self.service.busy(channel_id)

    # ----------------------------------------------------------------- one channel

    async def context(self, channel_id: str) -> ChannelContext:
        return await self.service.context(channel_id)

    async def channel_settings(self, channel_id: str) -> dict[str, Any]:
        return await self.service.channel_settings(channel_id)

    async def update_settings(self, channel_id: str, values: dict[str, Any]) -> list[str]:
        return await self.service.update_settings(channel_id, **values)

    async def reset(self, channel_id: str) -> None:
        await self.service.reset(channel_id)

    async def undo_reset(self, channel_id: str) -> bool:
        return await self.service.undo_reset(channel_id)

    async def purge(self, channel_id: str) -> bool:
        return await self.service.purge(channel_id)

    async def record_place(self, channel_id: str, guild_id: str, parent_id: str | None) -> None:
        await self.service.record_place(channel_id, guild_id, parent_id)

    async def role_rules(self, channel_id: str, guild_id: str | None) -> RoleRules:
        return await self.service.role_rules(guild_id, channel_id)

    async def set_role_rule(self, channel_id: str | None, guild_id: str, role_id: str, rule: str) -> str:
        return await self.service.set_role_rule(guild_id, channel_id, role_id, rule)

    async def set_enabled(
        self, channel_id: str, guild_id: str, enabled: bool, by: str, parent_id: str | None
    ) -> bool:
        return await self.service.set_enabled(channel_id, guild_id, enabled, by, parent_id=parent_id)

    async def threads_of(self, channel_id: str) -> list[str]:
        return await self.service.threads_of(channel_id)

    # ----------------------------------------------------------------- servers, the store

    async def reset_policy(self, guild_id: str) -> str:
        return await self.service.reset_policy(guild_id)

    async def set_reset_policy(self, guild_id: str, policy: str) -> None:
        await self.service.set_reset_policy(guild_id, policy)

    async def may_reset(self, guild_id: str | None, moderator: bool) -> bool:
        return await self.service.may_reset(guild_id, moderator)

    async def enabled_channels(self, guild_id: str | None) -> set[str]:
        return await self.service.enabled_channels(guild_id)

    async def disabled_threads(self) -> set[str]:
        return await self.service.disabled_threads()

    async def server_channels(self, guild_id: str) -> list[str]:
        return await self.service.server_channels(guild_id)

    async def server_conversations(self, guild_id: str) -> set[str]:
        return await self.service.server_conversations(guild_id)

    async def forget_server_settings(self, guild_id: str) -> None:
        await self.service.forget_server_settings(guild_id)

    async def housekeeping(self, now: float | None) -> dict[str, int]:
        return await self.service.housekeeping(now)

    # ----------------------------------------------------------------- this replica

    async def describe(self) -> dict[str, Any]:
        """Who this replica is and what it serves: its name (the lease owner), node, process,
        model, presets and setting limits."""
        service = self.service
        return {
            "replica": self.name,
            "node": self.node,
            "pid": os.getpid(),
            "model": service.engine.describe(),
            "presets": service.presets,
            "limits": service.limits,
        }

    async def numbers(self) -> dict[str, Any]:
        """This replica's numbers: the engine's, the state tiers', the state bytes per device,
        and the channels whose lease it holds."""
        service = self.service
        return {
            "replica": self.name,
            "engine": dict(service.engine.metrics()),
            "states": service.state_metrics(),
            "device_state_bytes": service.device_state_bytes(),
            "leases": len(service.states.epochs),
        }


def chat_deployment(
    *,
    replicas: int,
    gpus: bool,
    resources: dict[str, float] | None = None,
    num_cpus: float = 0.0,
    max_ongoing: int = 4096,
    virtual_nodes: int = 100,
) -> Any:
    """The Serve deployment of :class:`ChatReplica`, ``replicas`` of it, channels sticky by
    consistent hashing of their ids: one GPU each (``gpus``), else one unit of each custom
    resource in ``resources`` (a node offers as many units as replicas it may run). One fallback
    replica on the ring takes a channel whose replica is gone; ``max_ongoing`` is high so that a
    busy replica is not skipped (its engine queues the work; a channel sent to the fallback
    would move its lease back and forth). A replica stopped by a scale-down or a new version has
    two minutes to finish its replies (a 999-token reply takes far more than ten seconds)."""
    options: dict[str, Any] = {"num_cpus": num_cpus}
    if gpus:
        options["num_gpus"] = 1
    if resources:
        options["resources"] = dict(resources)
    router = {  # a RequestRouterConfig
        "request_router_class": "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter",
        "request_router_kwargs": {"num_virtual_nodes": virtual_nodes, "num_fallback_replicas": 1},
    }
    return serve.deployment(
        ChatReplica,
        name="ChatReplica",
        num_replicas=replicas,
        ray_actor_options=options,
        max_ongoing_requests=max_ongoing,
        request_router_config=router,
        health_check_period_s=2.0,
        graceful_shutdown_timeout_s=120.0,
    )
