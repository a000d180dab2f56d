"""Where the random-model writer used to live: it is :mod:`tools.make_model` now.

Kept so that ``from engine.make_model import ...`` goes on working until its importers move;
this is the one import from ``engine`` up into ``tools``, and it goes with this file.
"""

from __future__ import annotations

from tools.make_model import HEAD_SIZE, NAMED_SHAPES, SUPPORTED_VERSIONS, ModelShape, write_random_model

__all__ = ["HEAD_SIZE", "NAMED_SHAPES", "SUPPORTED_VERSIONS", "ModelShape", "write_random_model"]
