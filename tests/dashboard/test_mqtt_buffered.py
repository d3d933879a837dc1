"""The ingest's buffered paho client leans on paho's private API: the pin and this test keep that honest."""
from __future__ import annotations

import inspect
import logging
from importlib.metadata import requires, version

import paho.mqtt.client as mqtt
import pytest
from packaging.requirements import Requirement

from edgeopt.dashboard import mqtt_buffered


def test_paho_still_has_the_private_api_the_buffered_reader_uses():
    """Fails when a paho release drops or reshapes what BufferedClient overrides or calls: then check the
    new release, adapt mqtt_buffered.py, and move the pin in pyproject.toml's dashboard extra."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    missing = [name for name in mqtt_buffered.PRIVATE_API if not hasattr(client, name)]
    assert not missing, f"paho-mqtt {version('paho-mqtt')} lacks {missing}"
    assert list(inspect.signature(mqtt.Client._sock_recv).parameters) == ["self", "bufsize"]
    assert list(inspect.signature(mqtt.Client._packet_read).parameters) == ["self"]
    assert list(inspect.signature(mqtt.Client._loop_rc_handle).parameters) == ["self", "rc"]
    assert list(inspect.signature(mqtt.Client._sock_close).parameters) == ["self"]
    assert mqtt_buffered.private_api_present()
    assert isinstance(mqtt_buffered.make_client(mqtt.CallbackAPIVersion.VERSION2), mqtt_buffered.BufferedClient)


def test_dashboard_extra_pins_paho_to_the_checked_releases():
    reqs = [Requirement(r) for r in requires("edgeopt") or []]
    paho = [r for r in reqs if r.name == "paho-mqtt" and r.marker and r.marker.evaluate({"extra": "dashboard"})]
    assert len(paho) == 1, reqs
    assert str(paho[0].specifier) == "<2.3,>=2.1"  # the releases whose private API was checked (2.1, 2.2)
    assert paho[0].specifier.contains(version("paho-mqtt"))


def test_without_the_private_api_the_public_reader_is_used(monkeypatch, caplog):
    monkeypatch.delattr(mqtt.Client, "_loop_rc_handle")
    # a library imported by an earlier test of the same process may have run logging.config with
    # disable_existing_loggers; the warning is this test's subject, so the logger is switched back on
    monkeypatch.setattr(mqtt_buffered.log, "disabled", False)
    caplog.set_level(logging.WARNING, logger=mqtt_buffered.log.name)
    assert not mqtt_buffered.private_api_present()
    client = mqtt_buffered.make_client(mqtt.CallbackAPIVersion.VERSION2)
    assert type(client) is mqtt_buffered.PlainClient and client.buffered() == 0
    assert "lacks private attributes the buffered reader uses" in caplog.text


@pytest.mark.timeout(120)
def test_ingest_works_on_the_public_reader(engine, db_url, mqtt_broker, tmp_path, monkeypatch):
    """End to end with the fallback client (a paho without the private API): nothing lost either."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from edgeopt.dashboard import models as m
    from edgeopt.dashboard.ingest import IngestService, IngestSettings
    from edgeopt.dashboard.simulate import Publisher, SimDevice
    from test_ingest_mqtt import wait_until

    monkeypatch.setattr(mqtt_buffered, "private_api_present", lambda: False)
    svc = IngestService(IngestSettings(broker=mqtt_broker.url, database_url=db_url, data_dir=str(tmp_path),
                                       flush_ms=50, rollup_every_s=0))
    svc.start()
    try:
        wait_until(svc.connected.is_set, 30)
        assert type(svc.link.client) is mqtt_buffered.PlainClient
        d, pub = SimDevice("plain-1"), Publisher("127.0.0.1", mqtt_broker.port)
        for _ in range(300):
            pub.publish(d.topic("telemetry"), d.telemetry(requests=2)[0].to_json())
        assert pub.wait_acked()

        def rows() -> int:
            with Session(engine) as s:
                return s.scalar(select(func.count()).select_from(m.TelemetryRaw))

        wait_until(lambda: rows() == 300, 60)
        pub.close()
    finally:
        svc.stop()
    assert svc.stats["telemetry"] == 300
