"""Serving metrics: telemetry snapshots (contract payload models) and Prometheus text."""
from __future__ import annotations

from edgeopt.agent.metrics import Metrics
from edgeopt.sdk.telemetry import SystemStats, TelemetryPayload


def test_snapshot_reports_interval_and_resets():
    metrics = Metrics()
    mm = metrics.model("digits")
    mm.version = "1.0.0"
    mm.queue_depth = lambda: 3
    for ms in (0.4, 0.6, 0.6, 2.5, 40.0):
        mm.observe(ms, samples=2)
    mm.error()
    mm.batch(4)
    mm.batch(4)
    mm.batch(1)
    (stats,) = metrics.telemetry()
    assert (stats.model, stats.version, stats.requests, stats.errors, stats.queue_depth) == ("digits", "1.0.0", 5, 1, 3)
    assert stats.batch_sizes == {"1": 1, "4": 2}
    assert sum(stats.latency.counts) == 5
    # DDSketch quantiles: within 1% of the exact lower quantile (rank q * (n - 1)) of the five latencies
    assert stats.latency.layout == "ddsketch-log-0.01"
    assert abs(stats.p50_ms - 0.6) <= 0.006 and abs(stats.p95_ms - 2.5) <= 0.025 and abs(stats.p99_ms - 2.5) <= 0.025
    assert stats.throughput_ips > 0
    # The payload model accepts the snapshot (it is what goes on the wire).
    payload = TelemetryPayload(device_id="d", session_id="s", seq=0, interval_s=1.0, models=[stats],
                               system=SystemStats())
    assert payload.models[0].latency.to_histogram().count == 5
    (again,) = metrics.telemetry()
    assert (again.requests, again.errors, again.batch_sizes, again.p50_ms) == (0, 0, {}, None)


def test_system_figures_are_real():
    system = Metrics().system()
    assert system.rss_bytes > 10 * 1024 * 1024
    assert system.cpu_percent is not None and system.cpu_percent >= 0
    assert system.mem_total_bytes >= system.mem_available_bytes > 0


def test_prometheus_text_is_cumulative():
    metrics = Metrics()
    mm = metrics.model('we"ird')
    mm.observe(0.3)
    mm.observe(7.0)
    mm.error(busy=True)
    mm.batch(2)
    metrics.telemetry()  # a telemetry snapshot must not reset the Prometheus counters
    metrics.extra_gauges["edgeopt_outbox_pending"] = lambda: 4
    text = metrics.prometheus()
    assert 'edgeopt_requests_total{model="we\\"ird"} 2' in text
    assert 'edgeopt_requests_busy_total{model="we\\"ird"} 1' in text
    assert 'edgeopt_request_latency_ms_bucket{model="we\\"ird",le="0.3"} 1' in text
    assert 'edgeopt_request_latency_ms_bucket{model="we\\"ird",le="7.5"} 2' in text
    assert 'edgeopt_batches_total{model="we\\"ird",size="2"} 1' in text
    assert "edgeopt_outbox_pending 4" in text
    assert text.endswith("\n")
