"""Giving the C heap's free memory back to the system once a model is loaded.

Loading converts every matrix (bf16 to float32, float32 to int8) and packs it for the kernels: a
temporary per matrix, freed at once. glibc serves allocations of a few megabytes from its heap
once an earlier large block has been freed, and the freed temporaries end up as holes between
the packed matrices that stay: memory the process no longer uses but still holds. glibc returns
the top of its heap on its own, not the holes; ``malloc_trim`` returns them (measured on the
1.5B shape loaded from its bf16 file in ``cpu fp32``: 1.05 GB of 7.9 GB). Other C libraries have
no such call, and nothing is done there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim  # glibc only (musl has none)
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    found: Callable[[int], int] = trim
    return found


def release_free_heap() -> bool:
    """Return the C heap's free pages to the system; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
