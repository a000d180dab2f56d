"""Errors of the chat layer, importable without torch (the command line catches them)."""

from __future__ import annotations

from typing import Literal

StoreProblem = Literal["full", "read-only", "cannot-open", "damaged", "locked", "disk", "schema", "other"]


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
