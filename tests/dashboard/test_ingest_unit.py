"""Ingest process pieces that need no broker: subscriptions, settings, the deployment hook lookup."""
from __future__ import annotations

import importlib

import pytest

from edgeopt.dashboard import ingest
from edgeopt.sdk.errors import ConfigError


def test_subscriptions_share_all_but_status():
    assert ingest.subscriptions("edgeopt-ingest") == [
        "$share/edgeopt-ingest/edgeopt/v1/+/+/telemetry", "$share/edgeopt-ingest/edgeopt/v1/+/+/events",
        "$share/edgeopt-ingest/edgeopt/v1/+/+/cmd/result", "edgeopt/v1/+/+/status"]
    assert ingest.subscriptions("")[0] == "edgeopt/v1/+/+/telemetry"


def test_settings_are_validated():
    assert ingest.IngestSettings(broker="mqtt://h:1884").broker_address() == ("h", 1884)
    assert ingest.IngestSettings(broker="mqtt://h").broker_address() == ("h", 1883)
    with pytest.raises(ConfigError, match="invalid broker URL 'ws://h'"):
        ingest.IngestSettings(broker="ws://h").broker_address()
    with pytest.raises(ValueError, match="extra"):
        ingest.IngestSettings(batchsize=3)
    with pytest.raises(ValueError, match="batch_size"):
        ingest.IngestSettings(batch_size=0)


def test_deployment_hook_is_optional(monkeypatch):
    from edgeopt.dashboard import deployments

    assert ingest._load_tick() is deployments.tick
    real = importlib.import_module

    def missing(name, *a, **kw):
        if name == "edgeopt.dashboard.deployments":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *a, **kw)

    monkeypatch.setattr(importlib, "import_module", missing)
    assert ingest._load_tick() is None

    def broken(name, *a, **kw):
        if name == "edgeopt.dashboard.deployments":
            raise ModuleNotFoundError("No module named 'somedependency'", name="somedependency")
        return real(name, *a, **kw)

    # A missing dependency INSIDE the controller is a real error, not "no controller".
    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="somedependency"):
        ingest._load_tick()
