"""GPU facts: why no GPU is visible, in words an owner can act on (driver too old, container
without GPU), and copies of small host tensors to a device that do not wait for it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

# The oldest Linux driver each CUDA major version runs on (NVIDIA's minor-version
# compatibility: any 12.x build runs on a 525.60.13 driver, 13.x on 580).
MIN_DRIVER = {11: (450, 80), 12: (525, 60), 13: (580, 0)}
_DRIVER_FILE = Path("/proc/driver/nvidia/version")


def driver_version(text: str | None = None) -> tuple[int, int] | None:
    """The loaded NVIDIA kernel driver's version (e.g. (550, 54)), or None when none is loaded."""
    if text is None:
        try:
            text = _DRIVER_FILE.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    match = re.search(r"Kernel Module(?: for [\w-]+)?\s+(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def no_gpu_reason(
    *,
    cuda_build: str | None = None,
    driver: tuple[int, int] | str | None = "read",
    device_nodes: bool | None = None,
) -> str:
    """The likeliest reason ``torch.cuda.is_available()`` is False, with the fix.

    The arguments default to this machine's facts (PyTorch's CUDA version, the loaded driver,
    whether ``/dev/nvidia*`` exists); tests pass their own.
    """
    build = torch.version.cuda if cuda_build is None and torch.version.cuda else cuda_build
    if build is None:
        return (
            f"this PyTorch ({torch.__version__}) is a CPU-only build: install a CUDA build of torch "
            "(or use the GPU image), or use a 'cpu' strategy"
        )
    found = driver_version() if isinstance(driver, str) else driver
    nodes = device_nodes if device_nodes is not None else any(Path("/dev").glob("nvidia[0-9]*"))
    if found is None and not nodes:
        in_container = Path("/.dockerenv").exists() or os.environ.get("container") is not None  # noqa: SIM112 (systemd and podman set it lowercase)
        where = (
            "this container was started without GPU access: run it with `--gpus all` (with compose: "
            "`docker compose -f compose.yaml -f compose.gpu.yaml up -d`), with the NVIDIA Container "
            "Toolkit installed on the host"
            if in_container
            else "no NVIDIA driver is loaded: install the NVIDIA driver, or use a 'cpu' strategy"
        )
        return f"no NVIDIA GPU is visible: {where}"
    major = int(build.split(".")[0])
    needed = MIN_DRIVER.get(major)
    if found is not None and needed is not None and found < needed:
        return (
            f"the NVIDIA driver {found[0]}.{found[1]} is too old for this PyTorch's CUDA {build}, which "
            f"needs {needed[0]}.{needed[1]} or newer: update the driver, or use a torch build for an "
            "older CUDA"
        )
    return (
        f"PyTorch (CUDA {build}) cannot use the GPU although a driver "
        f"{'' if found is None else f'{found[0]}.{found[1]} '}is loaded: check `nvidia-smi` on this "
        "machine (in Docker: the container needs GPU access, `--gpus all`)"
    )


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without waiting for the device: from pinned memory,
    asynchronously (a plain copy from pageable memory synchronises the stream first)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
