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


def test_histogram_bounds_are_part_of_the_contract():
    data = json.loads(_telemetry())
    data["models"][0]["latency"]["bounds_ms"] = [1, 2, 3]
    with pytest.raises(t.PayloadError, match="bounds differ"):
        t.parse_payload("telemetry", json.dumps(data).encode())


def test_merged_histogram_quantiles_track_numpy():
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
        exact = float(np.quantile(both, q))
        # bucket interpolation: within the width of the bucket holding the exact value
        i = int(np.searchsorted(t.LATENCY_BUCKETS_MS, exact))
        lo = t.LATENCY_BUCKETS_MS[i - 1] if i else 0.0
        hi = t.LATENCY_BUCKETS_MS[i]
        assert lo - 1e-9 <= merged.quantile(q) <= hi + 1e-9
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
