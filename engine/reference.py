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
from engine.gpu import no_gpu_reason

_import_lock = threading.Lock()
_modules: dict[bool, ModuleType] = {}

# The reference's strategy strings that this project accepts (device and precision).
CPU_PRECISIONS = ("fp32", "bf16")
CUDA_PRECISIONS = ("fp16", "bf16", "fp32", "fp16i8", "bf16i8")


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


def validate_strategy(strategy: str, spec: ModelSpec) -> str:
    """Check a strategy string against what the reference supports for this model version."""
    parts = strategy.split()
    if len(parts) != 2 and spec.family >= 7:
        raise EngineError(
            f"strategy {strategy!r} is not supported for RWKV-7: use 'cpu fp32', 'cpu bf16', "
            "'cuda fp16', 'cuda bf16' or 'cuda fp32'"
        )
    device = parts[0].split(":")[0] if parts else ""
    precision = parts[1] if len(parts) > 1 else ""
    if device == "cpu" and precision not in CPU_PRECISIONS and "->" not in strategy:
        raise EngineError(f"strategy {strategy!r}: on the CPU use fp32 or bf16")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise EngineError(f"strategy {strategy!r} needs a CUDA GPU, and {no_gpu_reason()}")
        if spec.family >= 7 and precision not in ("fp16", "bf16", "fp32"):
            raise EngineError(
                f"strategy {strategy!r}: RWKV-7 in the rwkv package runs fp16, bf16 or fp32 only"
            )
    elif device not in ("cpu",):
        raise EngineError(f"strategy {strategy!r}: the device must be 'cpu' or 'cuda'")
    return strategy


def load_reference_model(spec: ModelSpec, strategy: str) -> Any:
    """Load ``spec.path`` with the reference implementation under ``strategy``."""
    validate_strategy(strategy, spec)
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
