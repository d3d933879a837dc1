"""Exact tests of `sdk/telemetry.py` (docs/mutation.md): the size and depth bounds at their edge, every
refusal's reason and text, the sketch's keys at bucket edges and its quantile rank rule, merging by adding
counts, the 1.0 conversion's weights and rounding, and each field bound of the payload models.
The broader contract tests are in test_telemetry_payloads.py and test_latency_sketch.py."""
from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from edgeopt.sdk import telemetry as t
from edgeopt.sdk.errors import InputError

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def refusal(fn, *args, **kw) -> tuple[str, str]:
    with pytest.raises(t.PayloadError) as err:
        fn(*args, **kw)
    return err.value.reason, str(err.value)


# ------------------------------------------------------------------------------------------- constants


def test_contract_constants():
    assert (t.SCHEMA_VERSION, t.SUPPORTED_MAJOR, t.COMMAND_SCHEMA_VERSION, t.COMMAND_MAJOR) == ("1.1", 1, "2.1", 2)
    assert t.MAX_PAYLOAD_BYTES == 262_144 and t.MAX_JSON_DEPTH == 32
    assert t.LEGACY_BUCKETS_MS == (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0,
                                   30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0, 750.0, 1000.0, 2000.0,
                                   5000.0, 10000.0)
    assert t.LATENCY_BUCKETS_MS is t.LEGACY_BUCKETS_MS
    assert (t.RELATIVE_ACCURACY, t.SKETCH_LAYOUT, t.SKETCH_MIN_MS, t.SKETCH_MAX_MS) == (
        0.01, "ddsketch-log-0.01", 0.01, 100_000.0)
    assert t.GAMMA == 1 + 0.02 / 0.99
    assert (t.SKETCH_KEY_MIN, t.SKETCH_KEY_MAX, t.SKETCH_BINS) == (-230, 576, 807)
    assert t.MAX_BIN_COUNT == 2**48
    assert t.PAYLOAD_BY_KIND == {"status": t.StatusPayload, "telemetry": t.TelemetryPayload,
                                 "events": t.EventPayload, "cmd": t.SignedCommand,
                                 "cmd/result": t.CommandResultPayload}


# ------------------------------------------------------------------------------------------- load_json bounds


def test_payload_of_exactly_the_limit_passes_one_byte_more_is_oversize():
    at = b'"' + b"a" * (t.MAX_PAYLOAD_BYTES - 2) + b'"'
    assert len(at) == t.MAX_PAYLOAD_BYTES
    assert t.load_json(at) == "a" * (t.MAX_PAYLOAD_BYTES - 2)
    over = at + b" "
    assert refusal(t.load_json, over) == ("oversize", "payload of 262145 bytes is over the 262144-byte limit")
    # parse_payload uses the same default, and passes its own bound on
    doc = b'{"x": "' + b"a" * (t.MAX_PAYLOAD_BYTES - 10) + b'"}'
    assert len(doc) == t.MAX_PAYLOAD_BYTES - 1
    assert refusal(t.parse_payload, "telemetry", doc + b"  ")[0] == "oversize"
    assert refusal(t.parse_payload, "telemetry", doc)[0] == "bad_schema"  # size passed, fields missing
    assert refusal(t.parse_payload, "telemetry", b'{"a": 1}', max_bytes=7) == (
        "oversize", "payload of 8 bytes is over the 7-byte limit")
    assert refusal(t.parse_payload, "telemetry", b'{"a":1}', max_bytes=7)[0] == "bad_schema"


def test_str_input_is_measured_in_utf8_bytes():
    assert refusal(t.load_json, '"\u00e9\u00e9"', max_bytes=5) == ("oversize",
                                                                    "payload of 6 bytes is over the 5-byte limit")
    assert t.load_json('"\u00e9\u00e9"', max_bytes=6) == "\u00e9\u00e9"
    # a lone surrogate in a str is passed through as the standard library's decoder would read it back
    assert t.load_json('"\ud800"') == "\ud800"


def test_depth_at_the_limit_passes_one_more_is_too_deep():
    def nested(n):
        return b"[" * n + b"]" * n

    assert t.load_json(nested(32)) == json.loads(nested(32))
    assert refusal(t.load_json, nested(33)) == ("too_deep", "payload nests deeper than 32 levels")
    assert refusal(t.load_json, nested(3), max_depth=2) == ("too_deep", "payload nests deeper than 2 levels")
    assert t.load_json(nested(2), max_depth=2) == [[]]
    obj = b'{"a":' * 32 + b"1" + b"}" * 32
    assert not t.json_too_deep(obj) and t.json_too_deep(b"[" + obj + b"]")


def test_a_decoder_recursion_is_too_deep_not_a_crash():
    """Only reachable with a depth bound above what the decoder can recurse: still a refusal with its reason."""
    deep = b"[" * 100_000 + b"]" * 100_000
    assert refusal(t.load_json, deep, max_bytes=10**7, max_depth=10**9) == (
        "too_deep", "payload nests deeper than 1000000000 levels")


def test_json_too_deep_counts_brackets_not_strings():
    # many brackets side by side are not deep
    flat = b"[" + b"[],".join([b""] * 40) + b"[]]"
    assert flat.count(b"[") > 32 and not t.json_too_deep(flat)
    # brackets in strings, with escaped quotes inside them, do not count
    s = b'["' + b'\\"[' * 40 + b'"]'
    assert not t.json_too_deep(s)
    assert t.json_too_deep(b"[" * 33 + b"]" * 33)
    assert not t.json_too_deep(b"[" * 5 + b"]" * 5, max_depth=5)
    assert t.json_too_deep(b"[" * 6 + b"]" * 6, max_depth=5)
    # only brackets count, whatever else the bytes are (the check runs before the decoder sees them)
    assert t.json_too_deep(b"[X" * 33) and t.json_too_deep(b"[ 1," * 33)
    # a closing bracket takes one level off, not more: 33 levels after a closed pair are still 33
    assert t.json_too_deep(b"[" + b"[]" + b"[" * 32 + b"]" * 33)
    # closing brackets bring the depth down: 40 brackets in sequence at depth 1 are fine
    assert not t.json_too_deep(b"[" + b"{}" * 40 + b"]", max_depth=2)


def test_bad_json_and_not_an_object():
    reason, text = refusal(t.load_json, b"[1,")
    assert (reason, text) == ("bad_json", "payload is not JSON: Expecting value: line 1 column 4 (char 3)")
    assert refusal(t.load_json, b"\xff")[0] == "bad_json"  # not UTF-8
    assert refusal(t.parse_payload, "telemetry", b"[]") == ("bad_json", "payload must be a JSON object")
    assert refusal(t.parse_payload, "nope", b"{}") == ("unknown_kind", "unknown payload kind 'nope'")


def test_nul_paths():
    assert refusal(t.load_json, b'"a\\u0000"') == ("nul_char", "payload holds a NUL character (\\u0000) at <top>")
    assert refusal(t.load_json, b'{"a": {"b": [1, "x\\u0000"]}}')[1].endswith(" at a.b[1]")
    assert refusal(t.load_json, b'[0, {"k\\u0000": 1}]')[1].endswith(" at [1].k\\u0000")
    assert refusal(t.load_json, b'{"a": [], "b": {"c": "\\u0000"}}')[1].endswith(" at b.c")
    assert refusal(t.load_json, b'[["\\u0000"]]')[1].endswith(" at [0][0]")
    # an escaped NUL marker with no NUL decoded: the walk finds nothing
    assert t.load_json(b'{"a": "\\\\u0000", "b": [1]}') == {"a": "\\u0000", "b": [1]}
    assert t._nul_path({"a": 1, "b": "x"}) is None and t._nul_path(["x", 2]) is None
    assert t._nul_path("\x00", "p") == "p"


# ------------------------------------------------------------------------------------------- parse_payload


def _telemetry_doc(**over):
    doc = {"schema_version": "1.1", "device_id": "d1", "ts": "2026-03-01T12:00:00+00:00", "session_id": "s1",
           "seq": 0, "kind": "telemetry", "interval_s": 10}
    doc.update(over)
    return doc


def parse(kind, doc):
    return t.parse_payload(kind, json.dumps(doc).encode())


def test_version_checks():
    assert parse("telemetry", _telemetry_doc(schema_version="1.9")).schema_version == "1.9"
    assert refusal(parse, "telemetry", _telemetry_doc(schema_version="2.1")) == (
        "bad_version", "unsupported schema_version '2.1'")
    assert refusal(parse, "telemetry", _telemetry_doc(schema_version="x.1")) == (
        "bad_version", "unsupported schema_version 'x.1'")
    # without schema_version the model's default applies
    doc = _telemetry_doc()
    del doc["schema_version"]
    assert parse("telemetry", doc).schema_version == "1.1"
    # the model's own check (reached when parse_payload's is skipped: an empty version)
    assert refusal(parse, "telemetry", _telemetry_doc(schema_version="")) == (
        "bad_schema", "invalid telemetry payload at schema_version: Value error, schema_version must look like "
                      "'1.0', found ''")
    with pytest.raises(ValueError, match=r"unsupported schema major version 3 \(supported: 1\)"):
        t.TelemetryPayload.model_validate(_telemetry_doc(schema_version="3.0"))
    with pytest.raises(ValueError, match=r"unsupported schema major version 1 \(supported: 2\)"):
        t.SignedCommand(schema_version="1.0", body="{}", key_id="0" * 16, signature="A")
    assert t._check_major("2.5", 2) == "2.5"
    for v, text in (("3.0", "unsupported schema major version 3 (supported: 1)"),
                    ("x", "schema_version must look like '1.0', found 'x'")):
        with pytest.raises(ValueError) as err:
            t._check_major(v, 1)
        assert str(err.value) == text


def test_bad_schema_names_the_first_error_and_where():
    assert refusal(parse, "telemetry", _telemetry_doc(seq=-1)) == (
        "bad_schema", "invalid telemetry payload at seq: Input should be greater than or equal to 0")
    assert refusal(parse, "events", []) == ("bad_json", "payload must be a JSON object")
    assert refusal(t.parse_payload, "cmd/result", b'{"device_id": "d"}')[1].startswith(
        "invalid cmd/result payload at ")
    # a model validator's error is at the top
    assert refusal(parse, "telemetry", _telemetry_doc(models=[{"model": "m", "requests": 1, "latency": {
        "layout": "ddsketch-log-0.01", "keys": [1], "counts": []}}])) == (
        "bad_schema", "invalid telemetry payload at models.0.latency.sketch: Value error, 1 keys but 0 counts")


def test_common_fields_bounds_and_defaults():
    base = dict(device_id="d", session_id="s", seq=0, state="online")
    assert t.StatusPayload(**{**base, "device_id": "d" * 128}).device_id == "d" * 128
    assert t.StatusPayload(**{**base, "session_id": "s" * 64}).session_id == "s" * 64
    for bad in ({"device_id": ""}, {"device_id": "d" * 129}, {"session_id": ""}, {"session_id": "s" * 65},
                {"seq": -1}):
        with pytest.raises(ValueError):
            t.StatusPayload(**{**base, **bad})
    p = t.StatusPayload(**base)
    assert p.schema_version == "1.1" and p.kind == "status"
    assert p.ts.tzinfo is timezone.utc and abs(p.ts - datetime.now(timezone.utc)) < timedelta(minutes=5)
    assert (p.agent_version, p.capabilities, p.packages, p.groups, p.tags) == (None, {}, [], [], [])
    other = t.StatusPayload(**base)
    assert other.capabilities is not p.capabilities
    # a ts in another zone is stored in UTC
    cet = datetime(2026, 3, 1, 13, 0, tzinfo=timezone(timedelta(hours=1)))
    q = t.StatusPayload(**base, ts=cet)
    assert q.ts == T0 and q.ts.utcoffset() == timedelta(0) and q.ts.tzinfo is timezone.utc
    assert json.loads(q.to_json()) == {"schema_version": "1.1", "device_id": "d", "ts": "2026-03-01T12:00:00Z",
                                       "session_id": "s", "seq": 0, "kind": "status", "state": "online",
                                       "capabilities": {}, "packages": [], "groups": [], "tags": []}
    pkg = t.InstalledPackage(name="n", version="1", profile="cpu", runtime="onnxruntime")
    assert (pkg.precision, pkg.sha256, pkg.previous_version) == (None, None, None)


def test_every_kind_reads_back_what_it_writes():
    """The ``kind`` field travels on the wire: a reader must accept what a writer puts there."""
    made = [("status", t.StatusPayload(device_id="d", session_id="s", seq=0, state="offline")),
            ("telemetry", t.TelemetryPayload(device_id="d", session_id="s", seq=1, interval_s=1)),
            ("events", t.EventPayload(device_id="d", session_id="s", seq=2, event="error")),
            ("cmd/result", t.CommandResultPayload(device_id="d", session_id="s", seq=3, command_id="c", ok=True,
                                                  status="accepted"))]
    for kind, p in made:
        assert json.loads(p.to_json())["kind"] == {"events": "event", "cmd/result": "cmd_result"}.get(kind, kind)
        assert t.parse_payload(kind, p.to_json()) == p


def test_telemetry_fields():
    p = parse("telemetry", _telemetry_doc(interval_s=86400))
    assert parse("telemetry", _telemetry_doc(interval_s=0.001, dropped=0)).interval_s == 0.001
    assert p.kind == "telemetry" and p.models == [] and p.dropped == 0 and p.system == t.SystemStats()
    assert t.SystemStats().model_dump() == dict.fromkeys(
        ["cpu_percent", "rss_bytes", "mem_total_bytes", "mem_available_bytes", "temperature_c", "load_1m"])
    for bad in (0, 86400.001, -1):
        assert refusal(parse, "telemetry", _telemetry_doc(interval_s=bad))[0] == "bad_schema"
    assert refusal(parse, "telemetry", _telemetry_doc(dropped=-1))[1].startswith(
        "invalid telemetry payload at dropped:")
    s = t.ModelStats(model="m", requests=0, latency=t.LatencySketch())
    assert (s.version, s.errors, s.throughput_ips, s.p50_ms, s.p95_ms, s.p99_ms, s.queue_depth, s.batch_sizes,
            s.live_sequences) == (None, 0, 0.0, None, None, None, 0, {}, None)
    for bad in ({"requests": -1}, {"errors": -1}, {"throughput_ips": -0.5}, {"queue_depth": -1},
                {"batch_sizes": {"1": -1}}, {"live_sequences": -1}):
        with pytest.raises(ValueError):
            t.ModelStats(**{"model": "m", "requests": 0, "latency": t.LatencySketch(), **bad})
    assert t.ModelStats(model="m", requests=0, latency=t.LatencySketch(), live_sequences=0).live_sequences == 0
    assert t.ModelStats(model="m", requests=0, latency=t.LatencySketch(), batch_sizes={"1": 0}).batch_sizes == {"1": 0}
    # latency is required: a model's stats without it are refused, not stored without a histogram
    assert refusal(parse, "telemetry", _telemetry_doc(models=[{"model": "m", "requests": 1}])) == (
        "bad_schema", "invalid telemetry payload at models.0.latency: Field required")


def test_event_and_result_fields():
    e = t.EventPayload(device_id="d", session_id="s", seq=1, event="install")
    assert (e.kind, e.ok, e.model, e.version, e.from_version, e.message, e.command_id, e.deployment_id,
            e.details) == ("event", True, None, None, None, "", None, None, {})
    events = ("download", "install", "switch", "self_test", "rollback", "refused", "error", "config", "started",
              "stopped", "placement", "profile")
    for name in events:
        assert t.EventPayload(device_id="d", session_id="s", seq=1, event=name).event == name
    with pytest.raises(ValueError):
        t.EventPayload(device_id="d", session_id="s", seq=1, event="reboot")
    r = t.CommandResultPayload(device_id="d", session_id="s", seq=1, command_id="c", ok=False, status="failed")
    assert (r.kind, r.command, r.message, r.deployment_id, r.details) == ("cmd_result", None, "", None, {})
    for status in ("accepted", "succeeded", "failed", "rejected"):
        assert t.CommandResultPayload(device_id="d", session_id="s", seq=1, command_id="c", ok=True,
                                      status=status).status == status
    with pytest.raises(ValueError):
        t.CommandResultPayload(device_id="d", session_id="s", seq=1, command_id="c", ok=True, status="done")


# ------------------------------------------------------------------------------------------- commands


def _command(**over):
    doc = dict(id="c1", command="ping", fleet="f", device_id="d", issued_at=T0, expires_at=T0 + timedelta(seconds=1),
               nonce="0" * 32)
    doc.update(over)
    return t.CommandPayload(**doc)


def test_command_fields():
    c = _command()
    assert (c.schema_version, c.args, c.deployment_id) == ("2.1", {}, None)
    for name in ("deploy", "rollback", "set-config", "ping", "profile"):
        assert _command(command=name).command == name
    ok = [{"id": "i"}, {"id": "i" * 64}, {"fleet": "f" * 128}, {"device_id": "d" * 128}, {"deployment_id": "x" * 64},
          {"nonce": "0123456789abcdef" * 2}]
    for over in ok:
        _command(**over)
    bad = [{"id": ""}, {"id": "i" * 65}, {"fleet": ""}, {"fleet": "f" * 129}, {"device_id": ""},
           {"device_id": "d" * 129}, {"deployment_id": "x" * 65}, {"nonce": "0" * 31}, {"nonce": "0" * 33},
           {"nonce": "A" * 32}, {"command": "reboot"}, {"schema_version": "1.0"},
           {"expires_at": T0}, {"expires_at": T0 - timedelta(seconds=1)}]
    for over in bad:
        with pytest.raises(ValueError):
            _command(**over)
    for field in ("issued_at", "expires_at", "id", "command", "fleet", "device_id", "nonce"):
        doc = _command().model_dump()
        del doc[field]
        with pytest.raises(ValidationError) as err:
            t.CommandPayload(**doc)
        assert err.value.errors()[0]["type"] == "missing" and err.value.errors()[0]["loc"] == (field,)
    with pytest.raises(ValidationError) as err:
        _command(expires_at=T0)
    assert err.value.errors()[0]["msg"] == "Value error, expires_at must be after issued_at"
    cet = timezone(timedelta(hours=1))
    c = _command(issued_at=T0.astimezone(cet), expires_at=(T0 + timedelta(seconds=1)).astimezone(cet))
    assert c.issued_at.tzinfo is timezone.utc and c.expires_at.tzinfo is timezone.utc


def test_signed_command_fields():
    base = dict(body="{}", key_id="0123456789abcdef", signature="A")
    s = t.SignedCommand(**base)
    assert (s.schema_version, s.alg) == ("2.1", "ed25519")
    assert json.loads(s.to_json()) == {"schema_version": "2.1", "body": "{}", "alg": "ed25519",
                                       "key_id": "0123456789abcdef", "signature": "A"}
    t.SignedCommand(**{**base, "body": "x" * t.MAX_PAYLOAD_BYTES, "signature": "s" * 200})
    assert t.SignedCommand.model_validate_json(s.to_json()) == s  # alg travels, and is read back
    for bad in ({"body": "{"}, {"body": "x" * (t.MAX_PAYLOAD_BYTES + 1)}, {"signature": ""},
                {"signature": "s" * 201}, {"key_id": "0" * 15}, {"key_id": "0" * 17}, {"key_id": "G" * 16},
                {"alg": "rsa"}):
        with pytest.raises(ValueError):
            t.SignedCommand(**{**base, **bad})


def test_command_args():
    d = t.DeployArgs(package_url="u", sha256="a" * 64)
    assert (d.size, d.name, d.version) == (None, None, None)
    assert t.DeployArgs(package_url="u", sha256="a" * 64, size=0).size == 0
    for bad in ({"package_url": ""}, {"sha256": "a" * 63}, {"sha256": "A" * 64}, {"sha256": "a" * 65},
                {"size": -1}, {"extra": 1}):
        with pytest.raises(ValueError):
            t.DeployArgs(**{"package_url": "u", "sha256": "a" * 64, **bad})
    assert t.RollbackArgs(model="m").version is None
    with pytest.raises(ValueError):
        t.RollbackArgs(model="m", extra=1)
    p = t.ProfileArgs(model="m")
    assert (p.runs, p.deadline_s) == (30, 20.0)
    for good in ({"runs": 1}, {"runs": 200}, {"deadline_s": 120.0}, {"deadline_s": 0.001}, {"model": "m" * 128}):
        t.ProfileArgs(**{"model": "m", **good})
    for bad in ({"runs": 0}, {"runs": 201}, {"deadline_s": 0.0}, {"deadline_s": 120.001}, {"model": ""},
                {"model": "m" * 129}, {"extra": 1}):
        with pytest.raises(ValueError):
            t.ProfileArgs(**{"model": "m", **bad})


# ------------------------------------------------------------------------------------------- the sketch


def test_keys_at_bucket_edges():
    # key k holds gamma**(k-1) < v <= gamma**k
    assert t.sketch_key(1.0) == 0 and t.sketch_key(math.nextafter(1.0, 2)) == 1
    assert t.sketch_key(math.nextafter(1.0, 0)) == 0 and t.sketch_key(0.99) == 0 and t.sketch_key(0.98) == -1
    assert t.sketch_key(t.GAMMA) == 1 and t.sketch_key(math.nextafter(t.GAMMA, 2)) == 2
    # the lowest key: everything up to 10 us and NaN; the key above starts just past gamma**-230
    for v in (0.01, 0.0, -5.0, float("nan"), float("-inf"), 1e-300):
        assert t.sketch_key(v) == -230
    edge = t.sketch_upper_bound(-230)
    assert edge == pytest.approx(0.010050294488842289, rel=1e-12)
    assert t.sketch_key(0.01005) == -230 and t.sketch_key(0.010051) == -229
    # the highest: 100 s and above
    for v in (100_000.0, 1e9, float("inf")):
        assert t.sketch_key(v) == 576
    assert t.sketch_key(math.nextafter(100_000.0, 0)) == 576 and t.sketch_key(98_000.0) == 575
    assert t.sketch_key(98_800.0) == 576


def test_values_and_bounds_of_keys():
    assert t.sketch_upper_bound(0) == 1.0 and t.sketch_upper_bound(1) == pytest.approx(t.GAMMA, rel=1e-15)
    assert t.sketch_value(0) == pytest.approx(2 / (1 + t.GAMMA), rel=1e-15) == pytest.approx(0.99, rel=1e-15)
    assert t.sketch_value(1) == pytest.approx(1.01, rel=1e-15)
    for k in (-230, -1, 0, 1, 100, 575, 576):
        lo, hi, v = t.sketch_upper_bound(k - 1), t.sketch_upper_bound(k), t.sketch_value(k)
        assert hi / lo == pytest.approx(t.GAMMA, rel=1e-12)
        # the value read back is within 1% of both ends of what the key holds
        assert (v - lo) / lo == pytest.approx(0.01, rel=1e-9) and (hi - v) / hi == pytest.approx(0.01, rel=1e-9)


def test_relative_accuracy_against_exact_values():
    for v in (0.0101, 0.05, 0.3, 1.0, 1.5, 7.3, 42.0, 999.9, 12_345.0, 99_999.0):
        assert abs(t.sketch_value(t.sketch_key(v)) - v) <= 0.01 * v
    # the clamped ends read back as 10 us and 100 s (within 1%)
    assert t.sketch_value(t.sketch_key(0.001)) == pytest.approx(0.01, rel=0.01)
    assert t.sketch_value(t.sketch_key(1e7)) == pytest.approx(100_000.0, rel=0.01)


def test_histogram_construction():
    h = t.Histogram({-230: 2, 576: 1, 5: 0}, sum_ms=3.5)
    assert h.bins == {-230: 2, 576: 1} and h.count == 3 and h.sum_ms == 3.5
    assert t.Histogram().bins == {} and t.Histogram().count == 0 and t.Histogram().sum_ms == 0.0
    with pytest.raises(ValueError, match=r"^histogram key 577 outside \[-230, 576\]$"):
        t.Histogram({577: 1})
    with pytest.raises(ValueError, match=r"^histogram key -231 outside \[-230, 576\]$"):
        t.Histogram({-231: 1})
    with pytest.raises(ValueError, match=r"^histogram count -1 of key 3 is negative$"):
        t.Histogram({3: -1})


def test_observe_counts_and_sums():
    h = t.Histogram()
    h.observe(2.0)
    h.observe(2.0, n=3)
    h.observe(5.0)
    assert h.bins == {t.sketch_key(2.0): 4, t.sketch_key(5.0): 1} and h.count == 5 and h.sum_ms == 13.0


def test_merge_adds_counts_and_returns_itself():
    a = t.Histogram({0: 1, 10: 2}, sum_ms=1.0)
    b = t.Histogram({10: 3, 20: 4}, sum_ms=2.5)
    assert a.merge(b) is a
    assert a.bins == {0: 1, 10: 5, 20: 4} and a.count == 10 and a.sum_ms == 3.5
    assert b.bins == {10: 3, 20: 4} and b.count == 7


def test_quantile_rank_rule():
    # DDSketch: the lowest key whose running count exceeds q * (count - 1)
    h = t.Histogram({0: 1, 10: 1, 20: 1, 30: 1, 40: 1})
    v = [t.sketch_value(k) for k in (0, 10, 20, 30, 40)]
    assert h.quantiles([0.0, 0.24, 0.25, 0.49, 0.5, 0.75, 0.99, 1.0]) == [v[0], v[0], v[1], v[1], v[2], v[3], v[3],
                                                                          v[4]]
    assert h.quantile(0.25) == v[1]
    g = t.Histogram({3: 2, 7: 2})  # count 4: ranks 0..3
    # rank 2.0 is reached exactly by the running count 2 of key 3: "exceeds" moves on to key 7
    assert g.quantiles([0.0, 0.66, 2 / 3, 1.0]) == [t.sketch_value(3), t.sketch_value(3), t.sketch_value(7),
                                                   t.sketch_value(7)]
    assert t.Histogram({9: 1}).quantiles([0.0, 1.0]) == [t.sketch_value(9)] * 2
    assert t.Histogram().quantiles([0.5, 0.9]) == [None, None] and t.Histogram().quantiles([]) == []
    assert h.quantiles(iter([0.5])) == [v[2]]
    for q in (-0.01, 1.01):
        with pytest.raises(ValueError, match=rf"^quantile {q} outside \[0, 1\]$"):
            h.quantile(q)


def test_pairs():
    h = t.Histogram({20: 4, -5: 1, 3: 2})
    assert h.to_pairs() == [-5, 1, 3, 2, 20, 4]
    back = t.Histogram.from_pairs([3, 2, -5, 1, 3, 1, 8, 0], sum_ms=7.0)
    assert back.bins == {3: 3, -5: 1} and back.count == 4 and back.sum_ms == 7.0
    assert t.Histogram.from_pairs([]).count == 0 and t.Histogram.from_pairs([-230, 1, 576, 1]).count == 2
    assert t.Histogram.from_pairs([1, 2]).sum_ms == 0.0
    with pytest.raises(ValueError, match=r"^histogram pairs need an even length, got 3$"):
        t.Histogram.from_pairs([1, 2, 3])
    for pair, text in (([577, 1], r"\(577, 1\)"), ([-231, 1], r"\(-231, 1\)"), ([0, -1], r"\(0, -1\)")):
        with pytest.raises(ValueError, match=rf"^histogram pair {text} is out of range$"):
            t.Histogram.from_pairs(pair)


def test_to_model_and_back():
    h = t.Histogram({20: 4, -5: 1}, sum_ms=9.0)
    m = h.to_model()
    assert (m.layout, m.keys, m.counts, m.sum_ms) == ("ddsketch-log-0.01", [-5, 20], [1, 4], 9.0)
    back = t.LatencySketch(keys=[1, 2, 3], counts=[5, 0, 1], sum_ms=2.0).to_histogram()
    assert back.bins == {1: 5, 3: 1} and back.count == 6 and back.sum_ms == 2.0


def test_sketch_model_bounds():
    def sketch(keys, counts, **kw):
        return t.LatencySketch(keys=keys, counts=counts, **kw)

    assert sketch([-230, 576], [2**48, 0]).counts == [2**48, 0]
    full = list(range(-230, 577))
    assert len(sketch(full, [1] * 807).keys) == 807
    s = t.LatencySketch()
    assert (s.layout, s.keys, s.counts, s.sum_ms) == ("ddsketch-log-0.01", [], [], 0.0)
    for keys, counts, kw in (([577], [1], {}), ([-231], [1], {}), ([1], [2**48 + 1], {}), ([1], [-1], {}),
                             ([1], [1], {"sum_ms": -0.1}), ([1], [1], {"layout": "ddsketch-log-0.02"}),
                             (full + [577], [1] * 808, {}), (full, [1] * 808, {})):
        with pytest.raises(ValueError):
            sketch(keys, counts, **kw)
    for keys, counts, text in (([1, 2], [1], "2 keys but 1 counts"), ([1, 1], [1, 1], "keys must be strictly ascending")):
        with pytest.raises(ValidationError) as err:
            sketch(keys, counts)
        assert err.value.errors()[0]["msg"] == f"Value error, {text}"
    assert sketch([1, 2], [1, 1], sum_ms=0.0).keys == [1, 2]


def test_latency_layout_is_chosen_by_the_layout_field():
    fixed = {"counts": [0] * 29}
    sketch = {"layout": "ddsketch-log-0.01", "keys": [], "counts": []}
    assert t._latency_layout(fixed) == "fixed" and t._latency_layout(sketch) == "sketch"
    assert t._latency_layout(t.HistogramModel(counts=[0] * 29)) == "fixed"
    assert t._latency_layout(t.LatencySketch()) == "sketch"
    assert isinstance(t.ModelStats(model="m", requests=0, latency=fixed).latency, t.HistogramModel)
    assert isinstance(t.ModelStats(model="m", requests=0, latency=sketch).latency, t.LatencySketch)


# ------------------------------------------------------------------------------------------- schema 1.0


def test_legacy_histogram_model():
    h = t.HistogramModel(counts=[0] * 29)
    assert h.bounds_ms == list(t.LEGACY_BUCKETS_MS) and h.sum_ms == 0.0
    assert t.HistogramModel(counts=[2**48] + [0] * 28).counts[0] == 2**48
    for bad in ({"counts": [2**48 + 1] + [0] * 28}, {"counts": [-1] + [0] * 28},
                {"counts": [0] * 29, "sum_ms": -1.0}):
        with pytest.raises(ValueError):
            t.HistogramModel(**bad)
    with pytest.raises(ValidationError) as err:
        t.HistogramModel(counts=[0] * 29, bounds_ms=list(t.LEGACY_BUCKETS_MS[:-1]) + [10001.0])
    assert err.value.errors()[0]["msg"] == (
        "Value error, histogram bounds differ from the contract's fixed LATENCY_BUCKETS_MS")
    for n in (28, 30):
        with pytest.raises(ValidationError) as err:
            t.HistogramModel(counts=[0] * n)
        assert err.value.errors()[0]["msg"] == "Value error, histogram needs 29 counts"
    assert t.HistogramModel(counts=[0] * 29, sum_ms=0.0).sum_ms == 0.0
    assert t.HistogramModel(counts=[0] * 29, sum_ms=0.5).sum_ms == 0.5
    conv = t.HistogramModel(counts=[0] * 8 + [4] + [0] * 20, sum_ms=7.0).to_histogram()
    assert conv.bins == {31: 1, 32: 1, 33: 1, 34: 1} and conv.count == 4 and conv.sum_ms == 7.0


def _reference_weights(i):
    """The shares of 1.0 bucket i over the sketch keys, from the layouts' geometry: bucket i is (lo, hi]
    (the first from 0, the last, > 10 s, spread up to 20 s) and key k is (gamma**(k-1), gamma**k]."""
    b = t.LEGACY_BUCKETS_MS
    lo = b[i - 1] if i > 0 else 0.0
    hi = b[i] if i < len(b) else 20_000.0
    out = []
    for k in range(-230, 577):
        k_lo = 0.0 if k == -230 else t.GAMMA ** (k - 1)
        overlap = min(hi, t.GAMMA ** k) - max(lo, k_lo)
        if overlap > 1e-9 * (hi - lo):
            out.append((k, overlap / (hi - lo)))
    return out


@pytest.mark.parametrize("i", range(29))
def test_legacy_weights_follow_the_bucket_geometry(i):
    got = t._LEGACY_WEIGHTS[i]
    ref = _reference_weights(i)
    assert [k for k, _ in got] == [k for k, _ in ref]
    assert [w for _, w in got] == pytest.approx([w for _, w in ref], rel=1e-6, abs=1e-12)
    assert sum(w for _, w in got) == pytest.approx(1.0, rel=1e-12)
    assert len(t._LEGACY_WEIGHTS) == 29


def test_legacy_to_bins_largest_remainders():
    one = [0] * 29
    one[8] = 1  # (1.5, 2]: the widest share is key 34's
    assert t.legacy_to_bins(one) == {34: 1}
    one[8] = 4
    assert t.legacy_to_bins(one) == {31: 1, 32: 1, 33: 1, 34: 1}
    one[8] = 100
    assert t.legacy_to_bins(one) == {21: 4, 22: 6, 23: 6, 24: 6, 25: 7, 26: 7, 27: 7, 28: 7, 29: 7, 30: 7, 31: 7,
                                     32: 8, 33: 8, 34: 8, 35: 5}
    first = [1] + [0] * 28
    assert t.legacy_to_bins(first) == {-230: 1}  # (0, 0.05]: the lowest key takes 20% of the width
    last = [0] * 28 + [3]
    assert t.legacy_to_bins(last) == {493: 1, 494: 1, 495: 1}
    # zero and negative counts add nothing; several buckets add up on shared keys
    assert t.legacy_to_bins([0] * 29) == {} and t.legacy_to_bins([-3] + [0] * 28) == {}
    both = [0] * 29
    both[7], both[8] = 1000, 1000  # (1, 1.5] and (1.5, 2] share key 21
    bins = t.legacy_to_bins(both)
    assert sum(bins.values()) == 2000
    for k, n in bins.items():
        exact = sum(1000 * w for i in (7, 8) for kk, w in _reference_weights(i) if kk == k)
        assert abs(n - exact) < 2, (k, n, exact)
    with pytest.raises(ValueError, match=r"^a 1.0 histogram has 29 counts, got 28$"):
        t.legacy_to_bins([0] * 28)


def test_legacy_to_bins_keeps_each_total_and_rounds_within_one():
    for i in range(29):
        counts = [0] * 29
        counts[i] = 997
        bins = t.legacy_to_bins(counts)
        assert sum(bins.values()) == 997
        ref = dict(_reference_weights(i))
        for k, n in bins.items():
            assert math.floor(997 * ref[k]) <= n <= math.floor(997 * ref[k]) + 1


def test_payload_error_is_an_input_error_with_a_reason():
    e = t.PayloadError("msg", "why")
    assert isinstance(e, InputError) and str(e) == "msg" and e.reason == "why"
