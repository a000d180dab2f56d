"""The storage suite: every test in this folder but ``test_sqlite_backend.py`` runs against each
backend in :data:`BACKENDS` through the :mod:`chat.storage` protocols only."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from chat.storage import Backend, Storage

# backend module -> where a test's store lives, given the test's temporary folder
BACKENDS: dict[str, Callable[[Path], Path]] = {
    "chat.storage.sqlite": lambda folder: folder / "store.sqlite3",
}


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Backend, Path]:
    """A backend and the location of a fresh store for it."""
    module: Backend = importlib.import_module(request.param).BACKEND
    return module, BACKENDS[request.param](tmp_path)


@pytest.fixture
async def storage(backend: tuple[Backend, Path]) -> AsyncIterator[Storage]:
    """A fresh, open store of each backend."""
    kind, location = backend
    store = await kind.open(location)
    try:
        yield store
    finally:
        await store.close()
