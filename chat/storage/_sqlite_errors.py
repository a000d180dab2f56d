"""SQLite errors as one clear line: which trouble it is, and what to do about it."""

from __future__ import annotations

import functools
import inspect
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import ParamSpec, Protocol, TypeVar

from chat.errors import StoreError
from engine.errors import process_user

__all__ = ["guard_sqlite_errors", "sqlite_error"]


def sqlite_error(exc: sqlite3.Error, path: Path, doing: str) -> StoreError:
    """One clear line for an SQLite error: which trouble it is, and what to do about it.

    A full disk or a read-only file is said to be just that: the data is intact, and the
    advice never suggests deleting the database.
    """
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    detail = str(exc)
    folder = path.parent if str(path.parent) else Path(".")
    if primary == sqlite3.SQLITE_FULL or "disk is full" in detail:
        return StoreError(
            f"the disk holding the database {path} is full ({doing} failed): free some space there; "
            "everything stored so far is intact, and the bot saves again once there is room",
            "full",
        )
    if primary == sqlite3.SQLITE_READONLY or "readonly" in detail:
        return StoreError(
            f"the database {path} is read-only for {process_user()} ({doing} failed): give that user write "
            f"access to the file and its folder {folder} (for example `chown -R {os.getuid()} {folder}`); "
            "the data in it is intact",
            "read-only",
        )
    if primary in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH):
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            why = f"{process_user()} may not write in its folder {folder}"
            fix = f"give that user write access (for example `chown -R {os.getuid()} {folder}`)"
        elif path.exists() and not os.access(path, os.R_OK | os.W_OK):
            why = f"{process_user()} may not read and write it"
            fix = f"give that user access (for example `chown {os.getuid()} {path}`)"
        else:
            why = detail
            fix = "check that RWKV_DISCORD_DB names a file in a folder that exists and is writable"
        return StoreError(f"cannot open the database {path}: {why}: {fix}", "cannot-open")
    if primary == sqlite3.SQLITE_NOTADB:
        return StoreError(
            f"{path} is not a usable rwkv-discord database ({detail}): check that RWKV_DISCORD_DB "
            "names the bot's database file; if it does, the file is damaged: restore your latest "
            "backup (`rwkv-discord db backup` makes them)",
            "damaged",
        )
    if primary == sqlite3.SQLITE_CORRUPT:
        return StoreError(
            f"the database {path} is damaged ({detail}; {doing} failed): stop the bot, keep the file, "
            f"and restore your latest backup (`rwkv-discord db backup` makes them), or salvage what is "
            f"readable with `sqlite3 {path} .recover | sqlite3 recovered.sqlite3` and point "
            "RWKV_DISCORD_DB at the result",
            "damaged",
        )
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreError(
            f"the database {path} is locked by another program ({doing} waited and gave up): is a "
            "second bot or a `db vacuum` using it? Nothing was changed",
            "locked",
        )
    if primary == sqlite3.SQLITE_IOERR:
        return StoreError(
            f"the disk holding the database {path} reported an error ({detail}; {doing} failed): "
            "check the disk and the system log; nothing was changed",
            "disk",
        )
    return StoreError(f"the database {path}: {doing} failed: {detail}")


_P = ParamSpec("_P")
_R = TypeVar("_R")
_C = TypeVar("_C", bound=type)


class _OnAFile(Protocol):
    path: Path


def _guarded(method: Callable[_P, Awaitable[_R]]) -> Callable[_P, Awaitable[_R]]:
    """Turn an SQLite error of a repository method into a :class:`StoreError` that says what to do."""
    doing = method.__name__.replace("_", " ")

    @functools.wraps(method)
    async def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await method(*args, **kwargs)
        except sqlite3.Error as exc:
            repository: _OnAFile = args[0]  # type: ignore[assignment]
            raise sqlite_error(exc, repository.path, doing) from exc

    return guarded


def guard_sqlite_errors(cls: _C) -> _C:
    """Class decorator: every public coroutine of ``cls`` (whose instances have ``path``)
    answers an SQLite error with a :class:`StoreError` saying what to do."""
    for name, method in list(vars(cls).items()):
        if not name.startswith("_") and inspect.iscoroutinefunction(method):
            setattr(cls, name, _guarded(method))
    return cls
