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


class EngineCollector(Collector):
    """One gauge per number that ``source`` returns (engine metrics plus the bot's)."""

    def __init__(self, source: Callable[[], dict[str, float]]) -> None:
        self.source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Gauges of the current values (a failing source yields nothing rather than an error page)."""
        try:
            values = self.source()
        except Exception:
            log.exception("metrics could not be read")
            return
        for name, value in sorted(values.items()):
            clean = re.sub(r"[^a-zA-Z0-9_]", "_", name)
            yield GaugeMetricFamily(PREFIX + clean, f"rwkv-discord {name}", value=float(value))


def serve_metrics(port: int, source: Callable[[], dict[str, float]], address: str = "0.0.0.0") -> None:
    """Start the metrics endpoint (``/metrics``) on ``port`` in a background thread."""
    REGISTRY.register(EngineCollector(source))
    start_http_server(port, addr=address)
    log.info("Prometheus metrics on http://%s:%d/metrics", address, port)
