"""Device lists as the settings give them, checked without importing torch."""

from __future__ import annotations


def parse_devices(text: str) -> list[str]:
    """The devices of a comma-separated list such as ``cuda:0,cuda:1`` (``cpu`` alone also
    works); ValueError when wrong."""
    devices: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        kind, colon, index = part.partition(":")
        if part == "cpu":
            devices.append(part)
        elif kind == "cuda" and (not colon or (index.isascii() and index.isdigit())):
            devices.append(f"cuda:{int(index)}" if colon else "cuda")
        else:
            raise ValueError(f"{part!r} is not a device")
    if not devices:
        raise ValueError("no devices listed")
    if "cpu" in devices and len(devices) > 1:
        raise ValueError("the CPU cannot be one of several devices")
    if len({"cuda:0" if d == "cuda" else d for d in devices}) != len(devices):
        raise ValueError("a device is listed twice")
    return devices
