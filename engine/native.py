"""The RWKV-7 CPU step in C (``engine/csrc/rwkv7_cpu.c``): built here, loaded with ctypes.

A decode step in PyTorch is hundreds of small calls (about 40 a layer) and, at batch 1, matrix
products that do not reach the memory's speed; the C step does a layer in one call and one
OpenMP parallel region, and reads each weight once per step whatever the batch. It runs float32
arithmetic on float32 weights, or on int8 weights with one scale per output row (``'cpu int8'``).
The same library serves the batched sampler's top-k and argmax on the CPU (:func:`topk`).

The library is compiled on first use with the C compiler at hand (``$CC``, else ``cc``) for this
CPU (``-march=native``) and cached under ``$XDG_CACHE_HOME/rwkv-discord/native`` (else
``~/.cache``, else a temporary folder), keyed by the source, the flags, the compiler and the CPU:
a cache shared by machines of different CPUs keeps one build each. It links the OpenMP runtime
that torch has already loaded (same ``libgomp.so.1``), so torch's work and the C step's share one
team of threads. Without a compiler, or with ``RWKV_DISCORD_NATIVE=off``, the PyTorch path serves;
:func:`load` says why in one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch  # loaded first: its libgomp is the one the library links

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "rwkv7_cpu.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
ENV_SWITCH = "RWKV_DISCORD_NATIVE"  # "off" (or 0, no, false): the PyTorch path everywhere
VERSION = 7  # rwkv7_native_version() of the source this module speaks to


# Mat.layout: pack()'s panels (float32, or int8 with scales), pack_vnni()'s, pack_bf16()'s
LAYOUT_PANELS, LAYOUT_VNNI, LAYOUT_BF16 = 0, 1, 2


class Mat(ctypes.Structure):
    """A weight matrix ``[rows, cols]``: float32, or int8 with a float32 scale per row (in
    :func:`pack_vnni`'s layout: its products on 8-bit inputs), or bf16 (:func:`pack_bf16`: its
    products on bf16 inputs)."""

    _fields_ = [
        ("w", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("layout", ctypes.c_int64),
    ]


_VECTORS = [
    "ln1_w",
    "ln1_b",
    "ln2_w",
    "ln2_b",
    "mix",
    "w0",
    "a0",
    "v0",
    "k_k",
    "k_a",
    "r_k",
    "ln_x_w",
    "ln_x_b",
    "ffn_x_k",
]
_MATRICES = [
    "receptance",
    "key",
    "value",
    "output",
    "ffn_key",
    "ffn_value",
    "w1",
    "w2",
    "a1",
    "a2",
    "g1",
    "g2",
    "v1",
    "v2",
]


class LayerStruct(ctypes.Structure):
    """The C ``Layer``: pointers to one block's weights."""

    _fields_ = [(name, ctypes.c_void_p) for name in _VECTORS] + [(name, Mat) for name in _MATRICES]


@dataclass(frozen=True)
class Native:
    """The loaded library, or why there is none."""

    lib: ctypes.CDLL | None
    why_not: str | None = None
    simd: str = ""
    vnni: bool = False  # int8 products on 8-bit inputs (AVX-512 VNNI): pack_vnni's layout
    bf16: bool = False  # bf16 products (AVX-512 BF16): pack_bf16's layout

    def describe(self) -> str:
        return f"C step ({self.simd}, OpenMP)" if self.lib is not None else f"no C step ({self.why_not})"


_loaded: dict[str, Native] = {}  # the library, once built and loaded in this process
_lock = threading.Lock()


def load() -> Native:
    """The C step's library, built on first use; a :class:`Native` without one says why
    (``RWKV_DISCORD_NATIVE=off`` is read at every call: a model loaded after setting it runs
    PyTorch)."""
    if switched_off():
        return Native(None, f"{ENV_SWITCH}=off")
    with _lock:
        if "lib" not in _loaded:
            _loaded["lib"] = _load()
            if _loaded["lib"].lib is None:
                log.info("CPU step: %s; PyTorch runs it", _loaded["lib"].why_not)
        return _loaded["lib"]


def switched_off() -> bool:
    """Whether ``RWKV_DISCORD_NATIVE`` turns the C step off."""
    return os.environ.get(ENV_SWITCH, "").strip().lower() in {"off", "0", "no", "false"}


def _load() -> Native:
    if not torch.backends.openmp.is_available():  # type: ignore[no-untyped-call]
        return Native(None, "this torch has no OpenMP")
    compiler = shlex.split(os.environ.get("CC") or "cc") or ["cc"]  # e.g. CC="ccache gcc"
    if shutil.which(compiler[0]) is None:
        return Native(None, f"no C compiler ({compiler[0]!r} not found; install gcc to have it)")
    before = _openmp_runtimes()
    try:
        path = _build(compiler)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:  # a damaged cached build: built again, once
            path.unlink(missing_ok=True)
            lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        return Native(None, f"could not build it ({_first_line(exc)})")
    added = _openmp_runtimes() - before
    if added:  # a compiler whose OpenMP is not torch's: two thread teams would fight for the cores
        return Native(None, f"it would run a second OpenMP runtime ({', '.join(sorted(added))})")
    if lib.rwkv7_native_version() != VERSION:
        return Native(None, "the built library is of another version")
    _declare(lib)
    bits = int(lib.rwkv7_native_simd())
    return Native(lib, simd=describe_simd(bits), vnni=bool(bits & 2), bf16=bool(bits & 4))


def describe_simd(bits: int) -> str:
    """What rwkv7_native_simd()'s bits say the build has (1 AVX2, 2 AVX-512 VNNI, 4 AVX-512 BF16)."""
    names = [name for bit, name in ((1, "AVX2"), (2, "AVX-512 VNNI"), (4, "AVX-512 BF16")) if bits & bit]
    return ", ".join(names) or "portable C"


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtimes mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            names = {line.rsplit("/", 1)[-1].strip() for line in f if "/" in line}
    except OSError:
        return set()
    return {n for n in names if n.startswith(("libgomp", "libomp", "libiomp"))}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def _cpu_key() -> str:
    """The first CPU's name and feature flags (what ``-march=native`` builds for)."""
    import platform

    parts = [platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first CPU's block
                if line.startswith(("flags", "Features", "model name", "CPU implementer", "CPU part")):
                    parts.append(line.strip())
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def _cache_dir() -> Path:
    """The user's cache folder, else one of the user's own in the temporary folder (made private,
    and refused if anyone else owns it or may write to it: a library is loaded from it)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = Path(base) / "rwkv-discord" / "native"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    private = Path(tempfile.gettempdir()) / f"rwkv-discord-native-{os.getuid()}"
    try:
        private.mkdir(mode=0o700, exist_ok=True)
        st = private.lstat()
    except OSError as exc:
        raise RuntimeError(f"no writable cache folder ({exc})") from exc
    if st.st_uid != os.getuid() or st.st_mode & 0o022 or not private.is_dir() or private.is_symlink():
        raise RuntimeError(f"{private} is not this user's own folder")
    return private


def _build(compiler: list[str]) -> Path:
    source = SOURCE.read_bytes()
    about = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30, check=False)
    version = (about.stdout + about.stderr).splitlines()[:1]
    key = hashlib.sha256(
        b"\0".join(
            [source, " ".join([*compiler, *FLAGS]).encode(), "".join(version).encode(), _cpu_key().encode()]
        )
    ).hexdigest()[:16]
    folder = _cache_dir()
    target = folder / f"rwkv7_cpu-{key}.so"
    if target.exists():
        return target
    for stale in folder.glob("*.so.part"):  # left by a build that was killed
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 600:
                stale.unlink()
    fd, partial = tempfile.mkstemp(dir=folder, suffix=".so.part")
    os.close(fd)
    try:
        done = subprocess.run(
            [*compiler, *FLAGS, "-o", partial, str(SOURCE), "-lm"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler[0]} failed: {(done.stderr or done.stdout).strip()[:300]}")
        os.chmod(partial, 0o644)  # readable by whoever shares the cache
        os.replace(partial, target)  # whole or not at all, for processes building at once
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.rwkv7_workspace.restype = i64
    lib.rwkv7_workspace.argtypes = [i64, i64, i64, i64]
    lib.rwkv7_layer.restype = None
    lib.rwkv7_layer.argtypes = [p, i32, i64, i64, i64, i64, i64, i64, p, p, p, p, p, p, i32]
    lib.rwkv7_head.restype = None
    lib.rwkv7_head.argtypes = [p, p, p, i64, i64, p, p, p, i32]
    lib.rwkv7_topk.restype = i32
    lib.rwkv7_topk.argtypes = [p, i64, i64, i64, p, p, i32]


_C_DTYPES = (torch.float32, torch.int8, torch.uint8, torch.bfloat16)  # uint8: pack_vnni's layout


def ptr(t: torch.Tensor) -> int:
    """A float32 (or int8, or uint8) contiguous CPU tensor's data pointer, checked."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in _C_DTYPES:
        raise ValueError("the C step takes contiguous float32 or int8 (uint8, bf16) CPU tensors")
    return int(t.data_ptr())


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``torch.topk(x, k, dim=-1)`` of a float32 CPU matrix [R, V] in one pass over each row, on
    the library's threads: (values, ids), highest first, equal values by the lower index first (so
    ``k = 1`` gives ``torch.argmax``'s ids). None where the library is not at hand or a row holds a
    NaN (torch ranks NaN highest): the caller asks torch. torch's own top-k sorts more than it
    needs: 2.2 ms for 64 of 32 x 65,536, and 1.5 ms for its argmax, on 2 cores."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2 or not 1 <= k <= x.shape[1]:
        return None
    lib = load().lib
    if lib is None or x.shape[0] == 0:
        return None
    x = x.contiguous()
    values = torch.empty(x.shape[0], k)
    ids = torch.empty(x.shape[0], k, dtype=torch.long)
    done = lib.rwkv7_topk(
        ptr(x), x.shape[0], x.shape[1], k, ptr(values), ids.data_ptr(), torch.get_num_threads()
    )
    return (values, ids) if done else None


PANEL = 16  # rows of a panel of a packed weight


def pack(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An ``[rows, cols]`` weight in the C step's layout: panels of 16 rows, column by column,
    ``[ceil(rows / 16), cols, 16]`` (the last panel padded with zeros), in memory asked to be
    backed by huge pages (:func:`_huge_empty`); in ``dtype`` if given (converted on the way)."""
    rows, cols = weight.shape
    panels = -(-rows // PANEL)
    if rows % PANEL:
        weight = torch.cat((weight, weight.new_zeros(panels * PANEL - rows, cols)))
    packed = _huge_empty((panels, cols, PANEL), dtype or weight.dtype)
    packed.copy_(weight.reshape(panels, PANEL, cols).transpose(1, 2))
    return packed


_HUGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux


def _huge_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor of at least 1 MB placed on 2 MB boundaries, whose pages Linux is asked to
    back with huge pages before anything touches them (where transparent huge pages are left to
    ``madvise``, a common default). A decode step streams every weight; with 4 KB pages it misses
    the TLB every 4 KB (measured: 21.6 against 18.3 ms a step at 0.1B, fp32, one sequence). The
    room before the boundary is never touched, so it takes no memory."""
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if nbytes < _HUGE // 2 or not sys.platform.startswith("linux"):
        return torch.empty(shape, dtype=dtype)
    rounded = -(-nbytes // _HUGE) * _HUGE
    buffer = torch.empty(rounded + _HUGE, dtype=torch.uint8)
    offset = -buffer.data_ptr() % _HUGE
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(buffer.data_ptr() + offset), ctypes.c_size_t(rounded), _MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass
    return buffer[offset : offset + nbytes].view(dtype).view(shape)


def unpack(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """The ``[rows, cols]`` weight of :func:`pack`'s layout."""
    panels, cols, _ = packed.shape
    return packed.transpose(1, 2).reshape(panels * PANEL, cols)[:rows]


VNNI_GROUP = 4  # columns of a row summed by one instruction of the VNNI products


BF16_GROUP = 2  # columns of a row summed by one instruction of the bf16 products


def _pack_groups(weight: torch.Tensor, group: int, pad: int) -> torch.Tensor:
    """``[rows, cols]`` as ``[ceil(rows / 16), ceil(cols / group), 16, group]``: panels of 16 rows,
    ``group`` columns of a row together, padded with ``pad``."""
    rows, cols = weight.shape
    panels, groups = -(-rows // PANEL), -(-cols // group)
    wide = weight
    if (panels * PANEL, groups * group) != (rows, cols):
        wide = torch.full((panels * PANEL, groups * group), pad, dtype=weight.dtype)
        wide[:rows, :cols] = weight
    packed = _huge_empty((panels, groups, PANEL, group), weight.dtype)
    packed.copy_(wide.reshape(panels, PANEL, groups, group).transpose(1, 2))
    return packed


def _unpack_groups(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    panels, groups, _, group = packed.shape
    return packed.transpose(1, 2).reshape(panels * PANEL, groups * group)[:rows, :cols]


def pack_vnni(q: torch.Tensor) -> torch.Tensor:
    """An ``[rows, cols]`` int8 weight in the layout of the C step's products on 8-bit inputs:
    panels of 16 rows, four columns of a row together, ``[ceil(rows / 16), ceil(cols / 4), 16, 4]``,
    each weight plus 128 as an unsigned byte (padding: 128, a weight of 0)."""
    return _pack_groups((q.to(torch.int16) + 128).to(torch.uint8), VNNI_GROUP, 128)


def unpack_vnni(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The ``[rows, cols]`` int8 weight of :func:`pack_vnni`'s layout."""
    return (_unpack_groups(packed, rows, cols).to(torch.int16) - 128).to(torch.int8)


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """An ``[rows, cols]`` weight rounded to bf16, in the layout of the C step's bf16 products:
    panels of 16 rows, two columns of a row together, ``[ceil(rows / 16), ceil(cols / 2), 16, 2]``
    (padding: zeros)."""
    return _pack_groups(weight.to(torch.bfloat16), BF16_GROUP, 0)


def unpack_bf16(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The ``[rows, cols]`` bf16 weight of :func:`pack_bf16`'s layout."""
    return _unpack_groups(packed, rows, cols)


def mat(packed: torch.Tensor, rows: int, scale: torch.Tensor | None, cols: int | None = None) -> Mat:
    """The :class:`Mat` of a :func:`pack`-ed weight of ``rows`` rows (int8 with ``scale``, else
    float32), of a :func:`pack_vnni`-ed one of ``rows`` by ``cols`` with its scales, or of a
    :func:`pack_bf16`-ed one of ``rows`` by ``cols``."""
    layout = {torch.uint8: LAYOUT_VNNI, torch.bfloat16: LAYOUT_BF16}.get(packed.dtype, LAYOUT_PANELS)
    if layout != LAYOUT_PANELS:
        if cols is None or (layout == LAYOUT_VNNI) != (scale is not None and scale.dtype == torch.float32):
            raise ValueError("an int8 weight in pack_vnni()'s layout takes float32 scales, a bf16 one none")
        group = VNNI_GROUP if layout == LAYOUT_VNNI else BF16_GROUP
        shape = (-(-rows // PANEL), -(-cols // group), PANEL, group)
        if packed.dim() != 4 or packed.shape[1:] != shape[1:] or packed.shape[0] < shape[0]:
            raise ValueError("a weight in pack_vnni()'s or pack_bf16()'s layout")
    else:
        if scale is None and packed.dtype != torch.float32:
            raise ValueError("a float32 weight, or an int8 one with its scales")
        if scale is not None and (packed.dtype != torch.int8 or scale.dtype != torch.float32):
            raise ValueError("an int8 weight takes float32 scales")
        if packed.dim() != 3 or packed.shape[2] != PANEL or packed.shape[0] * PANEL < rows:
            raise ValueError("a weight in pack()'s layout")
        cols = int(packed.shape[1])
    if scale is not None and (scale.dim() != 1 or scale.shape[0] < rows):
        raise ValueError("one scale per row")
    return Mat(ptr(packed), ptr(scale) if scale is not None else None, rows, cols, layout)


def mat_of(weight: torch.Tensor) -> tuple[Mat, torch.Tensor]:
    """A float32 ``[rows, cols]`` weight packed, its :class:`Mat` and the packed tensor (to keep)."""
    packed = pack(weight.float().contiguous())
    return mat(packed, int(weight.shape[0]), None), packed
