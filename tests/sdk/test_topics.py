import pytest

from edgeopt.sdk import topics
from edgeopt.sdk.topics import TopicError


def test_build_and_parse_roundtrip():
    for kind in topics.KINDS:
        t = topics.topic("plant-a", "cam-07", kind)
        assert t == f"edgeopt/v1/plant-a/cam-07/{kind}"
        parsed = topics.parse(t)
        assert (parsed.fleet, parsed.device_id, parsed.kind) == ("plant-a", "cam-07", kind)


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "+", "cam 07", "x\x00y", "$SYS", "-lead", "é", "a" * 129])
def test_ids_with_wildcards_separators_or_control_chars_are_refused(bad):
    with pytest.raises(TopicError, match="invalid device id"):
        topics.topic("plant", bad, "status")


def test_unknown_kind_and_foreign_topics():
    with pytest.raises(TopicError, match="unknown topic kind 'metrics'"):
        topics.topic("f", "d", "metrics")
    with pytest.raises(TopicError, match="not an edgeopt v1 topic"):
        topics.parse("homeassistant/sensor/x/state")
    with pytest.raises(TopicError, match="unknown topic kind"):
        topics.parse("edgeopt/v1/f/d/cmd/other")


def test_subscriptions():
    assert topics.subscription("telemetry") == "edgeopt/v1/+/+/telemetry"
    assert topics.subscription("status", fleet="plant-a") == "edgeopt/v1/plant-a/+/status"
    assert (topics.subscription("events", shared_group="edgeopt-ingest")
            == "$share/edgeopt-ingest/edgeopt/v1/+/+/events")
    with pytest.raises(TopicError):
        topics.subscription("events", shared_group="a/b")
