"""Periodic telemetry: every interval, one ``telemetry`` payload into the outbox.

The payload holds each model's interval figures (latency histogram in the DDSketch layout, p50/p95/p99, requests,
errors, throughput, queue depth, batch sizes), the process CPU % and RSS, and how many outbox messages
were dropped since the agent started.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from ..sdk.telemetry import TelemetryPayload
from .metrics import Metrics

log = logging.getLogger(__name__)


class TelemetryReporter:
    """A thread that emits telemetry every ``interval_s`` seconds (changeable with :meth:`set_interval`)."""

    def __init__(self, metrics: Metrics, envelope: Any, emit: Callable[[str, Any], Any], interval_s: float,
                 dropped: Callable[[], int] = lambda: 0):
        self.metrics = metrics
        self.envelope = envelope
        self.emit = emit
        self.interval_s = float(interval_s)
        self.dropped = dropped
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._last = time.monotonic()
        self.sent = 0

    def start(self) -> "TelemetryReporter":
        self.metrics.system()  # prime the CPU % measurement
        self._thread.start()
        return self

    def set_interval(self, seconds: float) -> None:
        self.interval_s = float(seconds)
        self._changed.set()

    def report(self) -> TelemetryPayload:
        """Build and emit one telemetry payload now."""
        now = time.monotonic()
        interval = max(now - self._last, 1e-3)
        self._last = now
        payload = self.envelope.make(TelemetryPayload, interval_s=min(interval, 86400.0),
                                     models=self.metrics.telemetry(), system=self.metrics.system(),
                                     dropped=int(self.dropped()))
        self.emit("telemetry", payload)
        self.sent += 1
        return payload

    def _run(self) -> None:
        next_at = time.monotonic() + self.interval_s
        while not self._stop.is_set():
            if self._changed.is_set():
                self._changed.clear()
                next_at = time.monotonic() + self.interval_s
            wait = next_at - time.monotonic()
            if wait > 0:
                # Short slices so a set-config interval change takes effect promptly.
                self._stop.wait(min(wait, 0.25))
                continue
            try:
                self.report()
            except Exception:  # a failed snapshot must not end telemetry for good
                log.exception("telemetry: report failed")
            next_at += self.interval_s
            if next_at < time.monotonic():  # fell behind (suspended, overloaded): do not burst to catch up
                next_at = time.monotonic() + self.interval_s

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
