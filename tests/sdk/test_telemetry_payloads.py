import json

import numpy as np
import pytest

from edgeopt.sdk import telemetry as t


def _telemetry(**over):
    h = t.Histogram()
    for ms in (0.4, 0.9, 1.2, 3.0):
        h.observe(ms)
    doc = t.TelemetryPayload(device_id="cam-07", session_id="s1", seq=3, interval_s=10,
                             models=[t.ModelStats(model="digits", requests=4, latency=h.to_model())]).model_dump(mode="json")
    doc.update(over)
    return json.dumps(doc).encode()


def test_roundtrip_and_unknown_fields_ignored():
    data = json.loads(_telemetry())
    data["future_field"] = {"x": 1}
    data["schema_version"] = "1.7"
    p = t.parse_payload("telemetry", json.dumps(data).encode())
    assert p.seq == 3 and p.models[0].latency.to_histogram().count == 4
    assert p.ts.tzinfo is not None


@pytest.mark.parametrize("payload,reason", [
    (b"{not json", "bad_json"),
    (b"[1,2]", "bad_json"),
    (_telemetry(schema_version="2.0"), "bad_version"),
    (_telemetry(seq="three"), "bad_schema"),
    (_telemetry(seq=-1), "bad_schema"),
    (_telemetry(ts="2026-01-01T00:00:00"), "bad_schema"),  # naive time refused: must be UTC-aware
    (b"{" + b" " * (t.MAX_PAYLOAD_BYTES + 1) + b"}", "oversize"),
])
def test_rejections_have_counter_reasons(payload, reason):
    with pytest.raises(t.PayloadError) as err:
        t.parse_payload("telemetry", payload)
    assert err.value.reason == reason


def _legacy_doc(counts=None, **latency):
    """A schema 1.0 telemetry document: latency as 29 counts over the fixed bounds."""
    doc = json.loads(_telemetry(schema_version="1.0"))
    counts = counts if counts is not None else [0] * 8 + [4] + [0] * 20
    doc["models"][0]["latency"] = dict({"counts": counts, "sum_ms": 10.0}, **latency)
    return doc


def test_legacy_histogram_bounds_are_part_of_the_1_0_contract():
    data = _legacy_doc(bounds_ms=[1, 2, 3])
    with pytest.raises(t.PayloadError, match="bounds differ"):
        t.parse_payload("telemetry", json.dumps(data).encode())
    data = _legacy_doc(counts=[1, 2, 3])
    with pytest.raises(t.PayloadError, match="needs 29 counts"):
        t.parse_payload("telemetry", json.dumps(data).encode())


def test_1_0_payload_is_read_and_converted_to_the_sketch_layout():
    p = t.parse_payload("telemetry", json.dumps(_legacy_doc()).encode())
    assert isinstance(p.models[0].latency, t.HistogramModel)
    h = p.models[0].latency.to_histogram()
    # 4 counts in the 1.0 bucket (1.5, 2] ms, spread over the sketch keys of that range
    assert h.count == 4 and h.sum_ms == 10.0
    assert all(1.5 < t.sketch_value(k) * (1 + t.RELATIVE_ACCURACY) and t.sketch_value(k) < 2.0 * 1.01 for k in h.bins)
    assert 1.5 <= h.quantile(0.5) <= 2.0


def test_agent_writes_1_1_with_a_sparse_sketch():
    doc = json.loads(_telemetry())
    assert doc["schema_version"] == "1.1"
    lat = doc["models"][0]["latency"]
    assert lat["layout"] == "ddsketch-log-0.01" and len(lat["keys"]) == len(lat["counts"]) == 4
    assert set(lat) == {"layout", "keys", "counts", "sum_ms"}  # no bounds, no empty buckets on the wire


@pytest.mark.parametrize("latency,message", [
    ({"layout": "ddsketch-log-0.02", "keys": [], "counts": []}, "latency.sketch.layout"),
    ({"layout": "ddsketch-log-0.01", "keys": [1, 2], "counts": [1]}, "2 keys but 1 counts"),
    ({"layout": "ddsketch-log-0.01", "keys": [5, 5], "counts": [1, 1]}, "strictly ascending"),
    ({"layout": "ddsketch-log-0.01", "keys": [3, 2], "counts": [1, 1]}, "strictly ascending"),
    ({"layout": "ddsketch-log-0.01", "keys": [t.SKETCH_KEY_MAX + 1], "counts": [1]}, "latency.sketch.keys.0"),
    ({"layout": "ddsketch-log-0.01", "keys": [t.SKETCH_KEY_MIN - 1], "counts": [1]}, "latency.sketch.keys.0"),
    ({"layout": "ddsketch-log-0.01", "keys": [1], "counts": [-1]}, "latency.sketch.counts.0"),
    ({"layout": "ddsketch-log-0.01", "keys": [1], "counts": [2**60]}, "latency.sketch.counts.0"),
    ({"layout": "ddsketch-log-0.01", "keys": list(range(t.SKETCH_BINS + 1)), "counts": [1] * (t.SKETCH_BINS + 1)},
     "latency.sketch.keys"),
])
def test_bad_sketches_are_refused_with_where_and_why(latency, message):
    doc = json.loads(_telemetry())
    doc["models"][0]["latency"] = latency
    with pytest.raises(t.PayloadError) as err:
        t.parse_payload("telemetry", json.dumps(doc).encode())
    assert err.value.reason == "bad_schema" and message in str(err.value)


def test_merged_histogram_quantiles_within_one_percent_of_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(0.5, 0.6, 5000), rng.lognormal(2.0, 0.4, 5000)
    ha, hb = t.Histogram(), t.Histogram()
    for x in a:
        ha.observe(float(x))
    for x in b:
        hb.observe(float(x))
    merged = t.Histogram().merge(ha).merge(hb)
    both = np.concatenate([a, b])
    for q in (0.5, 0.95, 0.99):
        exact = float(np.quantile(both, q, method="lower"))
        assert abs(merged.quantile(q) - exact) <= t.RELATIVE_ACCURACY * exact
    # averaging the two devices' p99 is wrong, and merging is not that
    assert abs(merged.quantile(0.99) - (ha.quantile(0.99) + hb.quantile(0.99)) / 2) > 1.0
    assert t.Histogram().quantile(0.5) is None


def test_commands_travel_signed_with_their_own_schema_major():
    """cmd carries a SignedCommand (schema 2.x); a bare schema 1 command is refused as a version mismatch."""
    signed = t.parse_payload("cmd", b'{"schema_version": "2.0", "body": "{}", "key_id": "' + b"0" * 16
                             + b'", "signature": "AA=="}')
    assert isinstance(signed, t.SignedCommand) and signed.alg == "ed25519"
    with pytest.raises(t.PayloadError) as err:
        t.parse_payload("cmd", b'{"schema_version": "1.0", "id": "c1", "command": "ping"}')
    assert err.value.reason == "bad_version"
    with pytest.raises(t.PayloadError) as err:
        t.parse_payload("cmd", b'{"id": "c2", "command": "reboot"}')
    assert err.value.reason == "bad_schema"
    # the other payloads stay at 1.x
    assert t.SCHEMA_VERSION == "1.1" and t.COMMAND_SCHEMA_VERSION == "2.1"


def test_deep_nesting_is_refused_before_the_decoder_recurses():
    """The probe's payload: a 4 KB event nested 2,000 deep ended the ingest writer with RecursionError."""
    deep = b'{"details": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    for kind in ("telemetry", "events", "cmd"):
        with pytest.raises(t.PayloadError) as err:
            t.parse_payload(kind, deep)
        assert err.value.reason == "too_deep"
        assert str(err.value) == f"payload nests deeper than {t.MAX_JSON_DEPTH} levels"
    # Brackets inside strings do not nest, and the bound itself is allowed.
    assert not t.json_too_deep(b'{"m": "' + b"[" * 5000 + b'"}')
    at_bound = b"[" * (t.MAX_JSON_DEPTH - 1) + b"{}" + b"]" * (t.MAX_JSON_DEPTH - 1)
    assert not t.json_too_deep(at_bound) and t.json_too_deep(b"[" + at_bound + b"]")


def test_nul_characters_are_refused_with_where():
    data = json.loads(_telemetry())
    data["models"][0]["model"] = "dig\u0000its"
    with pytest.raises(t.PayloadError) as err:
        t.parse_payload("telemetry", json.dumps(data).encode())
    assert err.value.reason == "nul_char"
    assert str(err.value) == "payload holds a NUL character (\\u0000) at models[0].model"
    data = json.loads(_telemetry())
    data["details\u0000"] = 1
    with pytest.raises(t.PayloadError, match=r"at details\\u0000$"):
        t.parse_payload("telemetry", json.dumps(data).encode())
    # An escaped backslash followed by "u0000" is six printable characters, not a NUL.
    data = json.loads(_telemetry())
    data["note"] = "\\u0000"
    assert t.parse_payload("telemetry", json.dumps(data).encode()).seq == 3
