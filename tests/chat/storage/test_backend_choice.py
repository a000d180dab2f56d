"""Which backend serves a location."""

from __future__ import annotations

from pathlib import Path

import pytest

from chat.storage import StoreError, backend_for
from chat.storage.sqlite import SqliteBackend


def test_a_path_is_an_sqlite_file(tmp_path: Path) -> None:
    """A plain path (or sqlite://) is served by the SQLite backend."""
    assert isinstance(backend_for(tmp_path / "bot.sqlite3"), SqliteBackend)
    assert isinstance(backend_for(f"sqlite://{tmp_path}/bot.sqlite3"), SqliteBackend)


async def test_sqlite_locations_may_name_the_scheme(tmp_path: Path) -> None:
    """``sqlite:///path`` opens the file at ``/path``."""
    store = await backend_for(f"sqlite://{tmp_path}/bot.sqlite3").open(f"sqlite://{tmp_path}/bot.sqlite3")
    await store.close()
    assert (tmp_path / "bot.sqlite3").exists()


def test_an_unknown_scheme_is_named() -> None:
    """A location no backend serves is refused with the schemes that exist."""
    with pytest.raises(StoreError, match=r"no storage backend for nosuch://.*sqlite"):
        backend_for("nosuch://host/db")
