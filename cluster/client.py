"""What a front end uses in place of a chat service when the service runs as replicas.

:class:`RemoteChat` has the methods of :class:`chat.session.ChatService` that the front ends call,
with the same names and arguments. Each call goes through the deployment's handle with the channel
(or server) as its session id, so Ray Serve's consistent-hash router sends a channel's messages to
one replica; ``handle`` streams. A replica that dies mid-reply ends that reply with one line, and
the channel's next message goes to another replica, which takes the channel's lease (the store
keeps every answered turn). The numbers of all replicas (:meth:`RemoteChat.state_metrics`...) are
gathered in the background, so that the front end reads them without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncGenerator
from typing import Any

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from chat.errors import StoreError
from chat.grammar import Command, GrammarError, Parsed, parse_message
from chat.outcome import ChatEvent, Outcome, OutcomeKind
from chat.presets import Preset
from chat.settings import ChannelContext, RoleRules, SettingLimits
from cluster.serve import APP, DEPLOYMENT, connect, running_replicas

log = logging.getLogger(__name__)

LOST = "Sorry, the server writing this reply stopped, so it was not kept. Please send your message again."
BUSY = "Sorry, the chat servers are too busy to take this message now. Please send it again in a moment."
STOP_EVERY = 0.05  # seconds between looks at a reply's stop event
RETRIES = 5  # a call that found its replica dead goes again (the router then skips it)
RETRY_AFTER = 0.5  # seconds
NUMBERS_EVERY = 15.0  # seconds between gatherings of the replicas' numbers
_PROBES = 64  # session ids tried to reach every replica
# Calls not sent again when their replica died during them: it may have done them already, and
# twice is not once (a second +reset would make undo bring back the empty conversation). Every
# other call reads, or sets a value to what it already is when done twice.
NOT_RETRIED = frozenset({"reset", "undo_reset", "respond"})
_GONE = (RayActorError, ReplicaUnavailableError)  # the replica died or cannot be reached


def _unreachable(what: str, exc: BaseException) -> StoreError:
    """One line for a chat tier that could not answer (a restart of the bot does not help; the
    replicas come back by themselves)."""
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return StoreError(
        f"the chat server could not {what} ({type(exc).__name__}: {detail[:200]})", "unreachable"
    )


def _unwrapped(exc: RayTaskError) -> BaseException:
    """The error a replica raised (a ValueError for a setting, a StoreError...), not Ray's
    wrapper with its remote traceback: its message is what the front end shows."""
    cause = exc.cause
    return cause if isinstance(cause, Exception) else exc


class RemoteChat:
    """The chat replicas behind one object, for a front end: see the module's docstring."""

    def __init__(self, handle: Any, described: dict[str, Any], app: str = APP) -> None:
        self._handle = handle
        self.app = app
        self.presets: dict[str, Preset] = described["presets"]
        self.limits: SettingLimits = described["limits"]
        self.model: str = described["model"]
        self.faq: Any = None  # the replicas answer +faq from their own FAQ
        self._numbers: dict[str, dict[str, Any]] = {}  # by replica
        self._probe_keys: dict[str, str] = {}  # replica -> a session id that reaches it
        self._refresher: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls, address: str | None = None, *, gather_numbers: bool = True, app: str = APP
    ) -> RemoteChat:
        """Join the Ray cluster at ``address`` and the chat application ``app`` running there
        (:func:`cluster.serve.start`; LookupError when it does not run); with
        ``gather_numbers``, the replicas' numbers are gathered every :data:`NUMBERS_EVERY`
        seconds until :meth:`close`."""
        connect(address)
        running = await asyncio.to_thread(lambda: sorted(serve.status().applications))
        if app not in running:
            raise LookupError(
                f"no chat application {app!r} runs on this Ray cluster "
                f"({'running: ' + ', '.join(running) if running else 'none runs'})"
            )
        handle = serve.get_deployment_handle(DEPLOYMENT, app_name=app)
        described = await handle.options(method_name="describe", session_id="describe").remote()
        remote = cls(handle, described, app)
        if gather_numbers:
            remote._refresher = asyncio.create_task(remote._gather_forever())
        return remote

    async def prepare(self) -> None:
        """Wait until every replica answers (each prepared its service when it started)."""
        await self.refresh_numbers()

    async def close(self) -> None:
        """Stop gathering numbers; the replicas keep running (:func:`cluster.serve.stop`)."""
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher

    def describe(self) -> str:
        """The model the replicas serve, and how many there are."""
        return f"{self.model}, {max(1, len(self._numbers))} replicas"

    async def _call(self, key: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` on the replica of ``key`` (a channel or server id). A replica that
        died before it answered is skipped: the call goes to the next one on the ring (the
        store holds what the dead one committed), unless it is one of :data:`NOT_RETRIED`. A
        tier that cannot answer raises :class:`StoreError` ("unreachable"), one line."""
        for attempt in range(RETRIES + 1):
            try:
                return await self._handle.options(method_name=method, session_id=key).remote(*args, **kwargs)
            except RayTaskError as exc:
                raise _unwrapped(exc) from None
            except _GONE as exc:
                if method in NOT_RETRIED:
                    raise _unreachable(f"finish ({method}): it may or may not be done", exc) from exc
                if attempt == RETRIES:
                    raise _unreachable(f"be reached for {method}", exc) from exc
                log.warning("%s for %s: its replica is gone (%s); trying the next", method, key, exc)
                await asyncio.sleep(RETRY_AFTER)
            except (BackPressureError, DeploymentUnavailableError) as exc:
                raise _unreachable(f"take {method} now", exc) from exc
        raise AssertionError("unreachable")

    # ----------------------------------------------------------------- messages

    async def handle(
        self,
        channel_id: str,
        message: str | Parsed | GrammarError,
        *,
        cancel: threading.Event | None = None,
        guild_id: str | None = None,
        parent_id: str | None = None,
        context: ChannelContext | None = None,
        speaker: str | None = None,
    ) -> AsyncGenerator[ChatEvent, None]:
        """:meth:`ChatService.handle` on the channel's replica: text pieces, then one outcome.
        Setting ``cancel`` stops the generation there; what was written so far is kept."""
        watcher = asyncio.create_task(self._forward_stop(channel_id, cancel)) if cancel is not None else None
        parsed = parse_message(message) if isinstance(message, str) else message
        # A reply is committed after its text: one whose text never began was not stored and is
        # asked again of the next replica. A reset shows no text: it is never asked twice.
        again = not isinstance(parsed, GrammarError) and parsed.command is not Command.RESET
        try:
            for attempt in range(RETRIES + 1):
                stream = self._handle.options(
                    method_name="handle", session_id=channel_id, stream=True
                ).remote(
                    channel_id,
                    parsed,
                    guild_id=guild_id,
                    parent_id=parent_id,
                    context=context,
                    speaker=speaker,
                )
                started = False
                try:
                    async for event in stream:
                        started = True
                        yield event
                    return
                except _GONE as exc:
                    if started or not again or attempt == RETRIES:  # the reply cannot be redone
                        log.warning("channel %s: its replica stopped mid-reply: %s", channel_id, exc)
                        yield Outcome(OutcomeKind.ERROR, LOST)
                        return
                    log.warning("channel %s: its replica is gone (%s); trying the next", channel_id, exc)
                    await asyncio.sleep(RETRY_AFTER)
                except (BackPressureError, DeploymentUnavailableError) as exc:
                    log.warning("channel %s: the chat tier cannot take it now: %s", channel_id, exc)
                    yield Outcome(OutcomeKind.ERROR, BUSY)
                    return
                except RayTaskError as exc:
                    raise _unwrapped(exc) from None
                finally:
                    stream.cancel()
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await watcher

    async def _forward_stop(self, channel_id: str, cancel: threading.Event) -> None:
        """Once ``cancel`` is set, tell the channel's replica to stop (again until it has a
        generation to stop: the message may not have reached it yet). A replica that cannot be
        told is logged: the reply then ends by itself."""
        while not cancel.is_set():
            await asyncio.sleep(STOP_EVERY)
        try:
            while not await self.stop(channel_id):
                await asyncio.sleep(STOP_EVERY)
        except Exception as exc:
            log.warning("channel %s: the stop did not reach its replica: %s", channel_id, exc)

    async def respond(self, channel_id: str, message: str) -> Outcome:
        """Handle a message and return only its outcome (no streaming)."""
        outcome: Outcome = await self._call(channel_id, "respond", channel_id, message)
        return outcome

    async def stop(self, channel_id: str) -> bool:
        """Stop the generation running in a channel; False when none is running."""
        stopped: bool = await self._call(channel_id, "stop", channel_id)
        return stopped

    async def replica_of(self, channel_id: str) -> str:
        """The replica that serves the channel now (its lease owner name)."""
        name: str = await self._call(channel_id, "replica", channel_id)
        return name

    async def busy(self, channel_id: str) -> bool:
        """True while a message of this channel is being handled."""
        busy: bool = await self._call(channel_id, "busy", channel_id)
        return busy

    # ----------------------------------------------------------------- one channel

    async def context(self, channel_id: str) -> ChannelContext:
        """The channel's checked settings and preset, read once."""
        context: ChannelContext = await self._call(channel_id, "context", channel_id)
        return context

    async def channel_settings(self, channel_id: str) -> dict[str, Any]:
        """The channel's own settings, checked."""
        settings: dict[str, Any] = await self._call(channel_id, "channel_settings", channel_id)
        return settings

    async def update_settings(self, channel_id: str, **values: Any) -> list[str]:
        """Validate and store channel settings (ValueError with the user's message)."""
        changes: list[str] = await self._call(channel_id, "update_settings", channel_id, values)
        return changes

    async def reset(self, channel_id: str) -> None:
        """Reset a channel's conversation (undoable)."""
        await self._call(channel_id, "reset", channel_id)

    async def undo_reset(self, channel_id: str) -> bool:
        """Bring back the conversation of before the last reset; False when there is none."""
        undone: bool = await self._call(channel_id, "undo_reset", channel_id)
        return undone

    async def purge(self, channel_id: str) -> bool:
        """Forget a deleted channel; False if nothing was kept."""
        purged: bool = await self._call(channel_id, "purge", channel_id)
        return purged

    async def record_place(self, channel_id: str, guild_id: str, parent_id: str | None) -> None:
        """Record a channel's server (and a thread's channel)."""
        await self._call(channel_id, "record_place", channel_id, guild_id, parent_id)

    async def role_rules(self, guild_id: str | None, channel_id: str) -> RoleRules:
        """The roles allowed and denied in a channel."""
        rules: RoleRules = await self._call(channel_id, "role_rules", channel_id, guild_id)
        return rules

    async def set_role_rule(self, guild_id: str, channel_id: str | None, role_id: str, rule: str) -> str:
        """Allow, deny or remove a role in a server or channel; the change as a line."""
        line: str = await self._call(
            channel_id or guild_id, "set_role_rule", channel_id, guild_id, role_id, rule
        )
        return line

    async def set_enabled(
        self, channel_id: str, guild_id: str, enabled: bool, by: str, *, parent_id: str | None = None
    ) -> bool:
        """Enable or disable the bot in a channel or thread (see ChatService.set_enabled)."""
        override: bool = await self._call(
            channel_id, "set_enabled", channel_id, guild_id, enabled, by, parent_id
        )
        return override

    async def threads_of(self, channel_id: str) -> list[str]:
        """The threads recorded under a channel."""
        threads: list[str] = await self._call(channel_id, "threads_of", channel_id)
        return threads

    # ----------------------------------------------------------------- servers, the store

    async def reset_policy(self, guild_id: str) -> str:
        """Who may use ``+reset`` in text in a server."""
        policy: str = await self._call(guild_id, "reset_policy", guild_id)
        return policy

    async def set_reset_policy(self, guild_id: str, policy: str) -> None:
        """Set who may use ``+reset`` in a server; ValueError for an unknown policy."""
        await self._call(guild_id, "set_reset_policy", guild_id, policy)

    async def may_reset(self, guild_id: str | None, moderator: bool) -> bool:
        """Whether a member may reset a conversation with ``+reset`` in text."""
        if guild_id is None or moderator:
            return True
        allowed: bool = await self._call(guild_id, "may_reset", guild_id, moderator)
        return allowed

    async def enabled_channels(self, guild_id: str | None = None) -> set[str]:
        """Channels where moderators enabled the bot (of one server, when given)."""
        channels: set[str] = await self._call(guild_id or "enabled", "enabled_channels", guild_id)
        return channels

    async def disabled_threads(self) -> set[str]:
        """Threads switched off on their own while their channel is enabled."""
        threads: set[str] = await self._call("enabled", "disabled_threads")
        return threads

    async def server_channels(self, guild_id: str) -> list[str]:
        """The conversations of a server."""
        channels: list[str] = await self._call(guild_id, "server_channels", guild_id)
        return channels

    async def server_conversations(self, guild_id: str) -> set[str]:
        """Everything kept for a server: its conversations and its enabled channels."""
        channels: set[str] = await self._call(guild_id, "server_conversations", guild_id)
        return channels

    async def forget_server_settings(self, guild_id: str) -> None:
        """Delete a server's own settings."""
        await self._call(guild_id, "forget_server_settings", guild_id)

    async def housekeeping(self, now: float | None = None) -> dict[str, int]:
        """Retention, the database budget and old transcripts, run by every replica (each keeps
        the budget with the channels it holds, and takes idle ones); the counts summed."""
        await self.refresh_numbers()
        done: dict[str, int] = {}
        for key in list(self._probe_keys.values()):
            for name, count in (await self._call(key, "housekeeping", now)).items():
                done[name] = done.get(name, 0) + count
        return done

    # ----------------------------------------------------------------- numbers

    def state_metrics(self) -> dict[str, int]:
        """The state tiers' numbers summed over the replicas (as last gathered)."""
        total: dict[str, int] = {}
        for numbers in self._numbers.values():
            for name, value in numbers["states"].items():
                total[name] = total.get(name, 0) + int(value)
        return total

    def device_state_bytes(self) -> dict[str, int]:
        """Bytes of conversation states on each replica's devices, by ``replica/device``."""
        return {
            f"{replica}/{device}": int(n)
            for replica, numbers in self._numbers.items()
            for device, n in numbers["device_state_bytes"].items()
        }

    def replica_numbers(self) -> dict[str, dict[str, Any]]:
        """Each replica's numbers (engine, state tiers, leases held), as last gathered."""
        return dict(self._numbers)

    async def refresh_numbers(self) -> dict[str, dict[str, Any]]:
        """Gather every running replica's numbers now (a replica is reached through a session id
        that the router sends to it, found by trying a few)."""
        want = await asyncio.to_thread(running_replicas, self.app)
        found: dict[str, dict[str, Any]] = {}
        keys = list(self._probe_keys.values()) + [f"numbers:{i}" for i in range(_PROBES)]
        for key in keys:
            if len(found) >= want:
                break
            numbers = await self._call(key, "numbers")
            found[numbers["replica"]] = numbers
            self._probe_keys[numbers["replica"]] = key
        self._probe_keys = {name: key for name, key in self._probe_keys.items() if name in found}
        self._numbers = found
        return found

    async def _gather_forever(self) -> None:
        while True:
            try:
                await self.refresh_numbers()
            except Exception as exc:  # a replica down: one line, not a traceback every time
                why = (str(exc).splitlines() or [type(exc).__name__])[0]
                log.warning("the replicas' numbers could not be gathered (%s); trying again later", why)
            await asyncio.sleep(NUMBERS_EVERY)
