"""The ``rwkv`` pip package (the reference implementation), loaded for any RWKV version.

The package decides at import time, from the process-wide environment variable ``RWKV_V7_ON``,
whether its ``RWKV`` class is the RWKV-7 one (and then it cannot load 4 to 6). We import private
copies of its module, one per mode, with the variable set only while that copy is imported, so a
process can serve RWKV-7 and older models alike and ``RWKV_V7_ON`` stays as the user set it (the
package itself still sets ``RWKV_JIT_ON`` and ``RWKV_CUDA_ON`` to its defaults on import).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
from types import ModuleType
from typing import Any

import torch

from engine.errors import EngineError, ModelFileError
from engine.formats import ModelSpec
from engine.strategy import check_reference_strategy

_import_lock = threading.Lock()
_modules: dict[bool, ModuleType] = {}


def _reference_module(v7: bool) -> ModuleType:
    """A private copy of ``rwkv.model`` imported in RWKV-7 mode or in 4-to-6 mode."""
    with _import_lock:
        if v7 in _modules:
            return _modules[v7]
        spec = importlib.util.find_spec("rwkv.model")
        if spec is None or spec.origin is None:
            raise EngineError("the rwkv package is not installed: pip install rwkv")
        name = "_rwkv_reference_v7" if v7 else "_rwkv_reference_v4_6"
        private = importlib.util.spec_from_file_location(name, spec.origin)
        assert private is not None and private.loader is not None
        module = importlib.util.module_from_spec(private)
        saved = os.environ.get("RWKV_V7_ON")
        os.environ["RWKV_V7_ON"] = "1" if v7 else "0"
        try:
            # The reference prints banners on import; keep stdout clean for --jsonl.
            with contextlib.redirect_stdout(sys.stderr):
                sys.modules[name] = module
                private.loader.exec_module(module)
        finally:
            if saved is None:
                os.environ.pop("RWKV_V7_ON", None)
            else:
                os.environ["RWKV_V7_ON"] = saved
        _modules[v7] = module
        return module


def load_reference_model(spec: ModelSpec, strategy: str) -> Any:
    """Load ``spec.path`` with the reference implementation under ``strategy``."""
    check_reference_strategy(strategy, spec.family)
    module = _reference_module(v7=spec.family >= 7)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            if spec.family >= 7:
                # The RWKV-7 class appends ".pth" itself.
                return module.RWKV_x070(str(spec.path.with_suffix("")), strategy)
            return module.RWKV(str(spec.path), strategy, verbose=False)
    except torch.cuda.OutOfMemoryError as exc:
        raise EngineError(f"not enough GPU memory to load {spec.path.name} as {strategy!r}") from exc
    except (RuntimeError, KeyError, AssertionError, ValueError) as exc:
        raise ModelFileError(
            f"the rwkv package could not load {spec.path} ({spec.describe()}): {exc}"
        ) from exc
