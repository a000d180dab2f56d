"""The checksum stored beside serialised states (no torch: the database tools use it)."""

from __future__ import annotations

import hashlib


def checksum(data: bytes) -> str:
    """The checksum stored beside serialised snapshots and state rows."""
    return hashlib.sha256(data).hexdigest()
