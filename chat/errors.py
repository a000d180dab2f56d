"""Errors of the chat layer, importable without torch (the command line catches them)."""

from __future__ import annotations

from typing import Literal

StoreProblem = Literal[
    "full",
    "read-only",
    "cannot-open",
    "unreachable",
    "damaged",
    "locked",
    "disk",
    "schema",
    "fenced",
    "other",
]


class StoreError(Exception):
    """The database cannot be used; the message says which trouble it is and what to do.

    ``problem`` names the kind: a ``full`` disk or a ``read-only`` file leave the stored data
    intact (never delete such a database), ``damaged`` is a file that needs restoring.
    """

    def __init__(self, message: str, problem: StoreProblem = "other") -> None:
        super().__init__(message)
        self.problem: StoreProblem = problem


class PresetError(ValueError):
    """A preset file that cannot be used."""


class FencedError(StoreError):
    """A write under a lease epoch that is no longer the channel's: another replica took the
    channel since, and nothing was stored."""

    def __init__(self, channel_id: str, epoch: int, current: int | None) -> None:
        now = "never taken" if current is None else f"at epoch {current}"
        super().__init__(
            f"channel {channel_id} was taken by another replica (its lease is {now}, this write was "
            f"under epoch {epoch}): nothing was stored",
            "fenced",
        )
        self.channel_id = channel_id
        self.epoch = epoch
        self.current = current
