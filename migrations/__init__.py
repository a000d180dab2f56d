"""Numbered SQL migrations (``V<N>__<name>.sql``), applied in order at start-up: the files here by
the SQLite backend (:mod:`chat.storage.sqlite`), those in ``postgres/`` by the Postgres one
(:mod:`chat.storage.postgres`). :func:`bundled` reads either set."""

from __future__ import annotations

import importlib.resources
import re

_MIGRATION_RE = re.compile(r"^V(\d+)__[\w-]+\.sql$")


def bundled(folder: str = "") -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every migration in ``folder`` of this package ("" for the
    SQLite ones, "postgres"), in order. ValueError when they are not numbered 1, 2, 3... without
    gaps."""
    files = importlib.resources.files(__name__)
    found = []
    for entry in (files.joinpath(folder) if folder else files).iterdir():
        match = _MIGRATION_RE.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise ValueError(f"must be numbered 1, 2, 3... without gaps, found {versions}")
    return found
