"""What this CPU offers the matrix products, and the precision that serves fastest on it.

The products dominate a CPU decode step (73% of it at the 0.1B shape and batch 1), and their
speed in each precision depends on the hardware:

- fp32: oneDNN with prepacked weights (:class:`engine.kernels.Linear`), on any x86-64 CPU;
- bf16: fast only with AMX tiles (measured 3.2x fp32 at batch 32 on a single
  [32, 768] x [768, 3072] product; never measured on the engine as a whole); without them oneDNN
  converts in software (measured 2.4x slower than fp32 at batch 32 on an AVX-512 VNNI CPU without
  AMX or AVX-512 BF16);
- int8 (``'cpu int8'``): fbgemm's dynamic int8 products. Measured only on an AVX-512 VNNI CPU, one
  thread, 0.1B shape: decode 2.3x, 2.3x and 1.8x fp32 at batch 1, 8 and 32 (the head product
  alone about 3x); never measured on a CPU without AVX-512 VNNI. It changes the outputs: on the
  random 0.1B shape the logits moved by 5% (a decode step) to 26% (prefill of 8 to 32 tokens) of
  their largest value, and up to 72% right after a 2-token prompt from a blank state
  (tools/parity.py), so it serves only when asked for.

fbgemm has int8 kernels for AVX2, AVX-512 and AVX-512 VNNI only. Without AVX-512 VNNI (AVX-VNNI
CPUs included: fbgemm has no kernel for it) it runs the AVX2 or AVX-512 path, whose 16-bit sums of
pairs of products saturate on full 8-bit inputs; those CPUs get 7-bit inputs
(:attr:`CpuFeatures.vnni`). ``FBGEMM_ENABLE_INSTRUCTIONS`` can hold fbgemm below the CPU's level,
and is read here too.

:func:`choose_cpu_precision` picks fp32 or bf16 for the ``auto`` precision (bf16 with AMX, or
where the C step is built with AVX-512 BF16); the flags come from
``/proc/cpuinfo`` and torch's own probes (AMX also needs the kernel's permission, which only the
probe sees). This module reads no torch on import.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's vector level (torch's name: ``AVX512``, ``AVX2``, ``DEFAULT``) and the features
    that decide a precision."""

    capability: str
    amx: bool  # AMX tiles usable (bf16 products in hardware, fast)
    avx512_bf16: bool  # AVX-512 BF16 instructions
    # fbgemm's AVX-512 VNNI kernels run (the CPU has them, FBGEMM_ENABLE_INSTRUCTIONS allows them):
    # int8 products accumulate without saturating; AVX-VNNI does not count (fbgemm has no kernel)
    vnni: bool

    @classmethod
    def from_flags(
        cls, flags: Iterable[str], capability: str, *, amx_usable: bool | None = None
    ) -> CpuFeatures:
        """Features from ``/proc/cpuinfo`` flags; ``amx_usable``: torch's probe, which also knows
        whether the kernel lets this process use the tiles (None: trust the flag)."""
        have = set(flags)
        amx_flag = "amx_tile" in have and "amx_bf16" in have
        return cls(
            capability=capability,
            amx=amx_flag if amx_usable is None else amx_flag and amx_usable,
            avx512_bf16="avx512_bf16" in have,
            vnni="avx512_vnni" in have and fbgemm_may_use_vnni(),
        )

    @classmethod
    def detect(cls) -> CpuFeatures:
        """This machine's CPU."""
        import torch

        flags = cpuinfo_flags(_read_cpuinfo())
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
        found = cls.from_flags(
            flags,
            torch.backends.cpu.get_cpu_capability(),
            amx_usable=None if probe is None else bool(probe()),
        )
        if not flags:  # no /proc/cpuinfo (not Linux): torch's probes alone
            bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
            vnni = getattr(torch.cpu, "_is_vnni_supported", None)
            found = cls(
                capability=found.capability,
                amx=bool(probe and probe()),
                avx512_bf16=bool(bf16 and bf16()),
                vnni=bool(vnni and vnni()) and fbgemm_may_use_vnni(),  # avx512_vnni only
            )
        return found

    def describe(self) -> str:
        """For the start-up line: ``AVX512, AVX-512 VNNI, no bf16 hardware``."""
        parts = [self.capability]
        parts += [name for name, on in (("AMX", self.amx), ("AVX-512 BF16", self.avx512_bf16)) if on]
        if self.vnni:
            parts.append("AVX-512 VNNI")
        if not (self.amx or self.avx512_bf16):
            parts.append("no bf16 hardware")
        return ", ".join(parts)


@functools.cache
def this_cpu() -> CpuFeatures:
    """This machine's CPU (detected once)."""
    return CpuFeatures.detect()


# FBGEMM_ENABLE_INSTRUCTIONS values that hold fbgemm below its AVX-512 VNNI kernels (fbgemm's
# Utils.cc: AVX512_E1 and AVX512_E1_256 are the VNNI ones; values it does not know it ignores)
_FBGEMM_BELOW_VNNI = frozenset({"AVX2", "AVX512", "AVX512_256"})


def fbgemm_may_use_vnni() -> bool:
    """Whether ``FBGEMM_ENABLE_INSTRUCTIONS`` leaves fbgemm its AVX-512 VNNI kernels."""
    return os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").strip().upper() not in _FBGEMM_BELOW_VNNI


def choose_cpu_precision(features: CpuFeatures, c_step_bf16: bool = False) -> tuple[str, str]:
    """The precision the ``auto`` strategy runs on this CPU, and why (for the start-up line);
    ``c_step_bf16``: the C step (engine.native) is built with AVX-512 BF16 here."""
    if features.amx:
        return "bf16", "AMX ran a bf16 product at 3.2x fp32 (one product measured, not the engine)"
    if c_step_bf16:
        return "bf16", "the C step's AVX-512 BF16 products ran a decode step at 1.9x to 2.1x fp32"
    if features.avx512_bf16:
        return "fp32", "no C step built with AVX-512 BF16, and PyTorch's bf16 is not faster than fp32"
    return "fp32", "without bf16 hardware bf16 is not faster than fp32 ('cpu int8' is, approximate)"


def cpuinfo_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first CPU in a ``/proc/cpuinfo`` text (empty if it has none)."""
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == "flags":
            return set(value.split())
    return set()


def _read_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""
