"""The Prometheus collector (bot/metrics.py)."""

from __future__ import annotations


def test_prometheus_collector_exposes_engine_and_bot_numbers() -> None:
    """Every number of the metrics source becomes a gauge with the project's prefix."""
    from prometheus_client import CollectorRegistry, generate_latest

    from bot.metrics import EngineCollector

    registry = CollectorRegistry()
    registry.register(EngineCollector(lambda: {"queue": 3, "tokens_per_s": 512.5, "ttft_p50_s": 0.09}))
    text = generate_latest(registry).decode()
    assert "rwkv_discord_queue 3.0" in text
    assert "rwkv_discord_tokens_per_s 512.5" in text


def test_prometheus_collector_labels_each_device_s_numbers() -> None:
    """With several devices, each device's numbers are gauges labelled with the device."""
    from prometheus_client import CollectorRegistry, generate_latest

    from bot.metrics import EngineCollector

    registry = CollectorRegistry()
    devices = {"cuda:0": {"batch": 12.0, "queue": 0.0}, "cuda:1": {"batch": 3.0}}
    registry.register(EngineCollector(lambda: {"batch": 15.0}, lambda: devices))
    text = generate_latest(registry).decode()
    assert "rwkv_discord_batch 15.0" in text
    assert 'rwkv_discord_device_batch{device="cuda:0"} 12.0' in text
    assert 'rwkv_discord_device_batch{device="cuda:1"} 3.0' in text
    assert 'rwkv_discord_device_queue{device="cuda:0"} 0.0' in text
    assert 'device="cuda:1"} 0.0' not in text
