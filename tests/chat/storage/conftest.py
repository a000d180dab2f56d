"""The storage suite: every test in this folder but ``test_sqlite_backend.py`` and
``test_postgres_backend.py`` runs against each backend in :data:`BACKENDS` through the
:mod:`chat.storage` protocols only.

The Postgres backend's cases carry the ``cluster`` marker (``-m cluster`` runs them): they start a
throwaway Postgres and S3 store once a session (:mod:`tests.chat.storage.servers`), and are
skipped, saying why, where those cannot start.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from chat.storage import Backend, Location, Storage
from tests.chat.storage.servers import Servers, ServerUnavailable, cluster_servers

# backend module -> where a test's store lives, given the test's temporary folder and the servers
BACKENDS: dict[str, Callable[[Path, pytest.FixtureRequest], Location]] = {
    "chat.storage.sqlite": lambda folder, _: folder / "store.sqlite3",
    "chat.storage.postgres": lambda _, request: request.getfixturevalue("servers").fresh_location(),
}
NEEDS_SERVERS = {"chat.storage.postgres"}


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    """Postgres and an S3 store for the session; the tests that need them are skipped without."""
    try:
        with cluster_servers() as running:
            yield running
    except ServerUnavailable as exc:
        pytest.skip(f"no Postgres and S3 store for the cluster tests: {exc}")


@pytest.fixture(
    params=[
        pytest.param(
            name, id=name.rsplit(".", 1)[-1], marks=[pytest.mark.cluster] if name in NEEDS_SERVERS else []
        )
        for name in BACKENDS
    ]
)
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Backend, Location]:
    """A backend and the location of a fresh store for it."""
    module: Backend = importlib.import_module(request.param).BACKEND
    if request.param in NEEDS_SERVERS:
        for name, value in request.getfixturevalue("servers").environment.items():
            monkeypatch.setenv(name, value)
    return module, BACKENDS[request.param](tmp_path, request)


@pytest.fixture
async def storage(backend: tuple[Backend, Location]) -> AsyncIterator[Storage]:
    """A fresh, open store of each backend."""
    kind, location = backend
    store = await kind.open(location)
    try:
        yield store
    finally:
        await store.close()
