"""Errors the engine raises, each with a message meant for the person who caused it."""

from __future__ import annotations

import os


def process_user() -> str:
    """Who this process runs as (``user rwkv (uid 10001)``), for messages about file access."""
    uid = os.getuid()
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


class EngineError(Exception):
    """Base class of every error the engine reports."""


class ModelFileError(EngineError):
    """A model file that cannot be used: missing, unreadable, truncated or not an RWKV model."""


class TokenizerError(EngineError):
    """A tokenizer that cannot be loaded or does not fit the model."""


class StateMismatchError(EngineError):
    """A stored state that does not belong to the loaded model."""


class EngineDiedError(EngineError):
    """The engine's worker is gone; no further requests can be served."""
