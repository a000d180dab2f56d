"""Postgres errors as one clear line: which trouble it is, and what to do about it."""

from __future__ import annotations

import functools
import inspect
import socket
from collections.abc import Awaitable, Callable
from typing import ParamSpec, Protocol, TypeVar

from chat.errors import StoreError

__all__ = ["guard_pg_errors", "is_pg_error", "pg_error"]


class _Server(Protocol):
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def database(self) -> str: ...
    @property
    def user(self) -> str: ...


def is_pg_error(exc: BaseException) -> bool:
    """Whether ``exc`` is trouble with the Postgres server or the connection to it."""
    import asyncpg

    return isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, socket.gaierror))


def pg_error(exc: BaseException, server: _Server, doing: str) -> StoreError:
    """One clear line for a Postgres error (or a failed connection to the server)."""
    import asyncpg

    where = f"{server.host}:{server.port}"
    state = getattr(exc, "sqlstate", None) or ""
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, socket.gaierror):
        return StoreError(
            f"cannot connect to Postgres: the host {server.host} is not known ({detail}): check the host "
            "in RWKV_DISCORD_DB",
            "cannot-open",
        )
    if isinstance(exc, (ConnectionError, TimeoutError)) or (isinstance(exc, OSError) and not state):
        return StoreError(
            f"cannot connect to Postgres at {where} ({detail}): is the server running there, and does "
            "RWKV_DISCORD_DB name the right host and port?",
            "unreachable",  # a server starting or restarting: may pass
        )
    if state in ("28000", "28P01"):
        return StoreError(
            f"Postgres at {where} refused the user {server.user} ({detail}): check the user and password "
            "in RWKV_DISCORD_DB (or PGPASSWORD) and the server's pg_hba.conf",
            "cannot-open",
        )
    if state == "3D000":
        return StoreError(
            f"the database {server.database} does not exist on the Postgres server at {where}: create it "
            f"(`createdb -h {server.host} -p {server.port} {server.database}`) or fix RWKV_DISCORD_DB",
            "cannot-open",
        )
    if state == "42501":
        return StoreError(
            f"the Postgres user {server.user} may not do this in the database {server.database} at "
            f"{where} ({detail}; {doing} failed): grant it the rights on the database",
            "cannot-open",
        )
    if state == "53100":
        return StoreError(
            f"the disk of the Postgres server at {where} is full ({doing} failed): free some space "
            "there; everything stored so far is intact",
            "full",
        )
    if state == "25006":
        return StoreError(
            f"the Postgres server at {where} is read-only ({doing} failed): is it a standby? Point "
            "RWKV_DISCORD_DB at the primary",
            "read-only",
        )
    if state in ("40001", "40P01", "55P03", "57014"):
        return StoreError(
            f"the Postgres database {server.database} at {where} was busy ({detail}; {doing} gave up): "
            "nothing was changed",
            "locked",
        )
    if state.startswith("XX") or state == "58030":
        return StoreError(
            f"the Postgres server at {where} reported damage or a disk error ({detail}; {doing} failed): "
            "check the server's log and disk, and restore your latest pg_dump if it is damaged",
            "damaged" if state in ("XX001", "XX002") else "disk",
        )
    if state.startswith("08") or isinstance(exc, (asyncpg.InterfaceError, asyncpg.PostgresConnectionError)):
        return StoreError(
            f"lost the connection to Postgres at {where} ({detail}; {doing} failed): is the server "
            "still running?",
            "disk",
        )
    if state.startswith("57P"):
        return StoreError(
            f"the Postgres server at {where} is shutting down or starting ({detail}; {doing} failed)",
            "disk",
        )
    if state.startswith("23"):
        return StoreError(
            f"the Postgres database {server.database} refused the change ({detail}; {doing} failed): "
            "nothing was stored"
        )
    return StoreError(f"the Postgres database {server.database} at {where}: {doing} failed: {detail}")


_P = ParamSpec("_P")
_R = TypeVar("_R")
_C = TypeVar("_C", bound=type)


class _OnAServer(Protocol):
    server: _Server


def _guarded(method: Callable[_P, Awaitable[_R]]) -> Callable[_P, Awaitable[_R]]:
    """Turn a Postgres error of a repository method into a :class:`StoreError` that says what to do."""
    doing = method.__name__.replace("_", " ")

    @functools.wraps(method)
    async def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await method(*args, **kwargs)
        except StoreError:
            raise
        except Exception as exc:
            if not is_pg_error(exc):
                raise
            repository: _OnAServer = args[0]  # type: ignore[assignment]
            raise pg_error(exc, repository.server, doing) from exc

    return guarded


def guard_pg_errors(cls: _C) -> _C:
    """Class decorator: every public coroutine of ``cls`` (whose instances have ``server``)
    answers a Postgres error with a :class:`StoreError` saying what to do."""
    for name, method in list(vars(cls).items()):
        if not name.startswith("_") and inspect.iscoroutinefunction(method):
            setattr(cls, name, _guarded(method))
    return cls
