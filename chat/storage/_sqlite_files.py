"""The SQLite file itself: migrations, WAL mode, the checks, backup and vacuum.

Numbered migrations from ``migrations/`` run at open, each in its own transaction, and the schema
version lives in the database (``PRAGMA user_version``). These work on the file with the standard
library's synchronous ``sqlite3``, before the store is open or beside it.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

from chat.errors import StoreError
from chat.storage._sqlite_errors import sqlite_error
from migrations import bundled

__all__ = ["QUICK_CHECK_SECONDS", "backup", "integrity_check", "migrate", "migrations", "vacuum"]

log = logging.getLogger(__name__)
QUICK_CHECK_SECONDS = 10.0  # the start-up check of the file stops here on a very large database


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every bundled migration, in order."""
    try:
        return bundled()
    except ValueError as exc:
        raise StoreError(f"migrations {exc}") from exc


def nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def backup(source: Path, destination: Path) -> None:
    """Copy a live database with SQLite's online backup (consistent even while the bot writes).

    The copy is written beside the destination and renamed into place, so a half-written backup
    never carries the destination's name.
    """
    if not source.exists():
        raise StoreError(f"database not found: {source}")
    partial = destination.with_name(destination.name + ".partial")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        src = sqlite3.connect(source, timeout=30)
        try:
            dst = sqlite3.connect(partial)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
        partial.replace(destination)
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        raise sqlite_error(exc, source, f"the backup to {destination}") from exc
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise StoreError(f"backup to {destination} failed: {exc}") from exc


def vacuum(path: Path) -> tuple[int, int]:
    """Rewrite the database without free pages; returns (bytes before, bytes after)."""
    if not path.exists():
        raise StoreError(f"database not found: {path}")
    before = path.stat().st_size
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise sqlite_error(exc, path, "vacuum") from exc
    return before, path.stat().st_size


def _split_statements(sql: str) -> list[str]:
    statements, buffer = [], ""
    for line in sql.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip() and not all(
        part.strip().startswith("--") or not part.strip() for part in buffer.splitlines()
    ):
        raise StoreError("a migration ends with an incomplete SQL statement")
    return statements


def _enable_wal(conn: sqlite3.Connection, patience: float = 10.0) -> None:
    """Switch to WAL mode; another process switching at the same moment makes SQLite answer
    "locked" at once (the busy timeout does not cover this), so try again for a while."""
    deadline = time.monotonic() + patience
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def migrate(path: Path, check: bool = True) -> None:
    """Check the file (see :meth:`SqliteBackend.open`), then apply the migrations it lacks, each in one
    transaction (WAL mode on).

    The version is read again inside each transaction, so two processes opening a new database
    at once apply each migration once.
    """
    available = migrations()
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    except sqlite3.Error as exc:
        raise sqlite_error(exc, path, "opening it") from exc
    try:
        _enable_wal(conn)
        if check:
            quick_check(conn, path)
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        if current > len(available):
            raise StoreError(
                f"database {path} has schema version {current}, newer than this program "
                f"knows ({len(available)}): upgrade rwkv-discord or use another --db",
                "schema",
            )
        for version, name, sql in available:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if conn.execute("PRAGMA user_version").fetchone()[0] < version:
                    for statement in _split_statements(sql):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {version}")
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:  # SQLite may have rolled back already (a full disk)
                    conn.execute("ROLLBACK")
                raise sqlite_error(exc, path, f"migration {name}") from exc
    except sqlite3.Error as exc:
        raise sqlite_error(exc, path, "opening it") from exc
    finally:
        conn.close()


def quick_check(conn: sqlite3.Connection, path: Path, budget: float = QUICK_CHECK_SECONDS) -> None:
    """SQLite's quick_check of every page, in linear time; on a file so large that it takes
    longer than ``budget`` seconds, the rest is left unchecked (said in the log) rather than
    holding up the start. Raises :class:`StoreError` ("damaged") on the first problem."""
    deadline = time.monotonic() + budget
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    try:
        rows = conn.execute("PRAGMA quick_check(5)").fetchall()
    except sqlite3.OperationalError as exc:
        if "interrupt" not in str(exc):
            raise
        log.warning(
            "the start-up check of %s stopped after %.0f s (a large database); `rwkv-discord db check` "
            "checks all of it",
            path,
            budget,
        )
        return
    finally:
        conn.set_progress_handler(None, 0)
    problems = [str(r[0]) for r in rows if str(r[0]) != "ok"]
    if problems:
        raise StoreError(
            f"the database {path} is damaged ({problems[0]}): stop the bot, keep the file, and restore "
            f"your latest backup (`rwkv-discord db backup` makes them), or salvage what is readable "
            f"with `sqlite3 {path} .recover | sqlite3 recovered.sqlite3` and point RWKV_DISCORD_DB at "
            "the result",
            "damaged",
        )


def integrity_check(path: Path) -> list[str]:
    """SQLite's full integrity check of a database (``db check``); empty when it is sound."""
    if not path.exists():
        raise StoreError(f"database not found: {path}", "cannot-open")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            rows = conn.execute("PRAGMA integrity_check(20)").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        error = sqlite_error(exc, path, "the integrity check")
        if error.problem == "damaged":  # so damaged that the check itself cannot read it
            return [str(exc)]
        raise error from exc
    return [str(r[0]) for r in rows if str(r[0]) != "ok"]
