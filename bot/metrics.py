"""Prometheus metrics on an optional HTTP port: the engine's numbers and the bot's queues.

Values are read when Prometheus scrapes (a custom collector), so nothing runs between scrapes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PREFIX = "rwkv_discord_"


DeviceSource = Callable[[], dict[str, dict[str, float]]]


class EngineCollector(Collector):
    """One gauge per number that ``source`` returns (engine metrics plus the bot's) and, with
    several devices, one ``rwkv_discord_device_*`` gauge per number of ``by_device``, labelled
    with the device."""

    def __init__(self, source: Callable[[], dict[str, float]], by_device: DeviceSource | None = None) -> None:
        self.source = source
        self.by_device = by_device

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Gauges of the current values (a failing source yields nothing rather than an error page)."""
        try:
            values = self.source()
        except Exception:
            log.exception("metrics could not be read")
            return
        try:
            devices = self.by_device() if self.by_device is not None else {}
        except Exception:
            log.exception("the devices' metrics could not be read")
            devices = {}
        for name, value in sorted(values.items()):
            yield GaugeMetricFamily(PREFIX + _clean(name), f"rwkv-discord {name}", value=float(value))
        names = sorted({name for numbers in devices.values() for name in numbers})
        for name in names:
            gauge = GaugeMetricFamily(
                PREFIX + "device_" + _clean(name), f"rwkv-discord {name}, by device", labels=["device"]
            )
            for device, numbers in sorted(devices.items()):
                if name in numbers:
                    gauge.add_metric([device], float(numbers[name]))
            yield gauge


def _clean(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def serve_metrics(
    port: int,
    source: Callable[[], dict[str, float]],
    address: str = "0.0.0.0",
    *,
    by_device: DeviceSource | None = None,
) -> None:
    """Start the metrics endpoint (``/metrics``) on ``port`` in a background thread."""
    REGISTRY.register(EngineCollector(source, by_device))
    start_http_server(port, addr=address)
    log.info("Prometheus metrics on http://%s:%d/metrics", address, port)
