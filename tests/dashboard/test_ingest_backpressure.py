"""``--max-buffer`` (IngestSettings.max_buffer) reached: while the database refuses work the ingest holds at
most that many unacknowledged messages, the broker keeps the rest, and when the database is back everything
is written once. A private Mosquitto, the real ingest service (in this process, so its buffer can be read),
SQLite and PostgreSQL."""
from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
import pytest

from edgeopt.dashboard import models as m
from edgeopt.dashboard.simulate import Publisher, SimDevice
from test_ingest_faults import _Outage, seqs
from test_ingest_mqtt import counters, n_rows, wait_until

pytestmark = pytest.mark.timeout(240)
MAX_BUFFER = 100  # the smallest the setting allows
SENT = 5 * MAX_BUFFER


class Watcher:
    """A plain subscriber on the same topic: when it has every message, so has the broker."""

    def __init__(self, port: int, topic: str):
        self.count, self.cv = 0, threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(10), "the watcher could not subscribe"

    def _on_message(self, client, userdata, msg) -> None:
        with self.cv:
            self.count += 1
            self.cv.notify_all()

    def wait_for(self, n: int, timeout: float = 60) -> None:
        with self.cv:
            assert self.cv.wait_for(lambda: self.count >= n, timeout), f"watcher got {self.count} of {n}"

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_max_buffer_is_reached_reading_stops_and_resumes_without_loss(engine, db_url, mqtt_broker, tmp_path):
    from edgeopt.dashboard.ingest import IngestService, IngestSettings

    svc = IngestService(IngestSettings(broker=mqtt_broker.url, database_url=db_url, data_dir=str(tmp_path),
                                       max_buffer=MAX_BUFFER, batch_size=40, flush_ms=50, rollup_every_s=0))

    def held() -> int:  # received and not yet acknowledged: the batch in the writer's hand and the queue
        return svc.loop.in_hand + svc.queue.qsize()

    d = SimDevice("bp-1", fleet="plant")
    svc.start()
    pub = Publisher("127.0.0.1", mqtt_broker.port)
    watcher = Watcher(mqtt_broker.port, d.topic("telemetry"))
    outage = _Outage(db_url)
    try:
        _run(svc, engine, d, pub, watcher, outage, held)
    finally:
        watcher.close()
        pub.close()
        svc.stop()


def _run(svc, engine, d, pub, watcher, outage, held) -> None:
    try:
        wait_until(svc.connected.is_set, 30)
        engine.dispose()
        outage.begin()
        for _ in range(SENT):
            pub.publish(d.topic("telemetry"), d.telemetry(requests=3)[0].to_json())
        assert pub.wait_acked()
        wait_until(lambda: held() == MAX_BUFFER, 60, lambda: f"the ingest holds {held()}")
        # The broker has delivered all of them to the watcher: it had them for the ingest too, and sent it
        # no more than the Receive Maximum the ingest announced, because none of them was acknowledged.
        watcher.wait_for(SENT)
        assert held() == MAX_BUFFER and svc.queue.qsize() <= MAX_BUFFER
    finally:
        outage.end()
    # Back: the held messages are written and acknowledged, and the broker sends the rest.
    wait_until(lambda: n_rows(engine, m.TelemetryRaw) == SENT, 120,
               lambda: f"{n_rows(engine, m.TelemetryRaw)} of {SENT} written; holding {held()}")
    assert seqs(engine, "bp-1") == list(range(1, SENT + 1))  # every message, once
    assert counters(engine).get("duplicate", 0) == 0

