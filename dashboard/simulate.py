"""A simulated fleet that speaks the real contracts: payloads built with ``sdk.telemetry`` models and
published with paho-mqtt (QoS 1) on topics from ``sdk.topics``.

Used by ``edgeopt-dashboard seed-demo``, the ingest tests and ``benchmarks/ingest_bench.py``. Every
telemetry payload is built from raw latency samples, which are returned too, so tests can check the
dashboard's merged percentiles against numpy on the very same samples.
"""
from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np

from edgeopt.sdk import topics
from edgeopt.sdk.telemetry import (Histogram, InstalledPackage, ModelStats, StatusPayload, SystemStats,
                                   TelemetryPayload, TextStats)


class SimDevice:
    """One fake device: a session, a seq counter and a latency distribution per model."""

    def __init__(self, device_id: str, fleet: str = "sim", models: tuple[str, ...] = ("digits",),
                 median_ms: float = 3.0, profile: str = "cpu", groups: tuple[str, ...] = (),
                 tags: tuple[str, ...] = (), seed: int = 0, session_id: str | None = None,
                 stateful: tuple[str, ...] = (), text: tuple[str, ...] = ()):
        self.device_id, self.fleet, self.models = device_id, fleet, models
        # models among ``models`` that serve streams: they report live sequences (a walk between 0 and 16)
        self.stateful = stateful
        self._live = {mo: 4 for mo in stateful}
        # models among ``models`` that generate text: they report ``text`` figures (issue 14); the TTFT and
        # TPOT samples (ms) behind the last payload are kept in ``text_samples`` for tests
        self.text = text
        self._kv = {mo: 0.3 for mo in text}
        self.text_samples: dict[str, dict[str, np.ndarray]] = {}
        self.median_ms, self.profile, self.groups, self.tags = median_ms, profile, groups, tags
        self.rng = np.random.default_rng(seed)
        self.session_id = session_id or uuid.uuid4().hex[:16]
        self.seq = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def topic(self, kind: str) -> str:
        return topics.topic(self.fleet, self.device_id, kind)

    def status(self, state: str = "online", ts: datetime | None = None, seq: int | None = None) -> StatusPayload:
        return StatusPayload(device_id=self.device_id, session_id=self.session_id,
                             seq=self.next_seq() if seq is None else seq, ts=ts or datetime.now(timezone.utc),
                             state=state, agent_version="0.1.0",
                             capabilities={"profile": self.profile, "cpu_flags": ["avx2"]},
                             packages=[InstalledPackage(name=mo, version="1.0.0", profile=self.profile,
                                                        runtime="onnxruntime") for mo in self.models],
                             groups=list(self.groups), tags=list(self.tags))

    def telemetry(self, ts: datetime | None = None, interval_s: float = 10.0, requests: int = 50,
                  seq: int | None = None) -> tuple[TelemetryPayload, dict[str, np.ndarray]]:
        """A telemetry payload and the raw latency samples (ms) per model behind it."""
        samples: dict[str, np.ndarray] = {}
        stats = []
        for i, mo in enumerate(self.models):
            lat = self.rng.lognormal(np.log(self.median_ms * (1 + i)), 0.5, size=requests)
            samples[mo] = lat
            h = Histogram()
            for v in lat:
                h.observe(float(v))
            p50, p95, p99 = h.quantiles((0.5, 0.95, 0.99))
            live = None
            if mo in self._live:
                live = self._live[mo] = int(np.clip(self._live[mo] + self.rng.integers(-2, 3), 0, 16))
            stats.append(ModelStats(model=mo, version="1.0.0", requests=requests, errors=int(requests // 50),
                                    throughput_ips=requests / interval_s, latency=h.to_model(), p50_ms=p50,
                                    p95_ms=p95, p99_ms=p99, queue_depth=int(self.rng.integers(0, 4)),
                                    batch_sizes={"1": requests // 2, "4": requests - requests // 2},
                                    live_sequences=live, text=self._text_stats(mo, requests, interval_s)))
        p = TelemetryPayload(device_id=self.device_id, session_id=self.session_id,
                             seq=self.next_seq() if seq is None else seq, ts=ts or datetime.now(timezone.utc),
                             interval_s=interval_s, models=stats,
                             system=SystemStats(cpu_percent=float(self.rng.uniform(5, 90)),
                                                rss_bytes=int(self.rng.integers(50, 500)) * 2**20))
        return p, samples

    def _text_stats(self, mo: str, requests: int, interval_s: float) -> TextStats | None:
        """A text model's interval: TTFT around 20x the latency median, about 25 ms per output token, some
        120 generated tokens a request, and a KV cache use that wanders between 5% and 95%."""
        if mo not in self._kv:
            return None
        ttft = self.rng.lognormal(np.log(self.median_ms * 20), 0.4, size=requests)
        tpot = self.rng.lognormal(np.log(25.0), 0.2, size=requests)
        self.text_samples[mo] = {"ttft": ttft, "tpot": tpot}
        sketches = []
        for values in (ttft, tpot):
            h = Histogram()
            for v in values:
                h.observe(float(v))
            sketches.append(h)
        generated = int(self.rng.integers(80, 160)) * requests
        kv = self._kv[mo] = float(np.clip(self._kv[mo] + self.rng.uniform(-0.1, 0.1), 0.05, 0.95))
        (t50, t95), (o50, o95) = (h.quantiles((0.5, 0.95)) for h in sketches)
        return TextStats(ttft=sketches[0].to_model(), tpot=sketches[1].to_model(), ttft_p50_ms=t50,
                         ttft_p95_ms=t95, tpot_p50_ms=o50, tpot_p95_ms=o95,
                         prompt_tokens=int(self.rng.integers(100, 400)) * requests, generated_tokens=generated,
                         tokens_per_s=generated / interval_s, kv_cache_usage=kv,
                         kv_cache_peak=min(1.0, kv + float(self.rng.uniform(0, 0.05))),
                         running=int(self.rng.integers(0, 8)), waiting=int(self.rng.integers(0, 3)),
                         cancelled=requests // 20, preemptions=int(self.rng.integers(0, 2)))


class Publisher:
    """A paho MQTT 5 client that publishes QoS 1 and can wait until the broker acknowledged everything."""

    def __init__(self, host: str, port: int, client_id: str | None = None, will: tuple[str, bytes] | None = None):
        import paho.mqtt.client as mqtt

        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"sim-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self._acked = 0
        self._sent = 0
        self._cv = threading.Condition()
        self._connected = threading.Event()
        self.client.on_publish = self._on_publish
        self.client.on_connect = lambda c, u, f, rc, p: None if rc.is_failure else self._connected.set()
        self.client.on_disconnect = lambda *a: self._connected.clear()
        self.client.reconnect_delay_set(0.2, 2)
        self.client.connect_async(host, port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError(f"could not connect to the MQTT broker at {host}:{port}")

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._cv:
            self._acked += 1
            self._cv.notify_all()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        with self._cv:
            self._sent += 1
        self.client.publish(topic, payload, qos=qos, retain=retain)

    def wait_acked(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._acked < self._sent:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self) -> None:
        self.wait_acked(10)
        self.client.disconnect()
        self.client.loop_stop()


def minute_series(devices: list[SimDevice], start: datetime, minutes: int, interval_s: float = 10.0,
                  requests: int = 20) -> list[tuple[str, bytes, dict[str, Any]]]:
    """Telemetry of every device every ``interval_s`` for ``minutes``: [(topic, payload, samples)]."""
    out = []
    steps = int(minutes * 60 // interval_s)
    for k in range(steps):
        ts = start + timedelta(seconds=k * interval_s)
        for d in devices:
            p, samples = d.telemetry(ts=ts, interval_s=interval_s, requests=requests)
            out.append((d.topic("telemetry"), p.to_json(), {"ts": ts, "device": d.device_id, "samples": samples}))
    return out
