"""The offline Discord harness, for every test module of this folder."""

from tests.bot.harness import harness

__all__ = ["harness"]
