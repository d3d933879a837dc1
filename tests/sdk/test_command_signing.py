"""The signed-command contract: canonical encoding, signature over the exact bytes, target and time checks."""
from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone

import pytest

from edgeopt.sdk.command_signing import (DOMAIN, CommandRefused, canonical_body, new_command, sign_command,
                                         verify_command)
from edgeopt.sdk.package import generate_keypair, key_id, load_private_key, load_public_key, sign_manifest
from edgeopt.sdk.telemetry import SignedCommand

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("cmdkeys")
    priv, pub = generate_keypair(d, "dash")
    old_priv, old_pub = generate_keypair(d, "dash-old")
    return load_private_key(priv), load_public_key(pub), load_private_key(old_priv), load_public_key(old_pub)


def _signed(key, **kw) -> bytes:
    cmd = new_command(kw.pop("command", "ping"), fleet=kw.pop("fleet", "f"), device_id=kw.pop("device_id", "d"),
                      now=kw.pop("now", T0), ttl_s=kw.pop("ttl_s", 600), args=kw.pop("args", None))
    if kw:
        cmd = cmd.model_copy(update=kw)
    return sign_command(cmd, key).to_json()


def _verify(raw, pubs, now=T0, **kw):
    return verify_command(raw, pubs, fleet=kw.pop("fleet", "f"), device_id=kw.pop("device_id", "d"), now=now, **kw)


def test_round_trip_and_canonical_encoding(keys):
    priv, pub, _, _ = keys
    cmd = new_command("set-config", fleet="f", device_id="d", args={"b": 1, "a": {"z": "é", "y": [1.5]}}, now=T0)
    body = canonical_body(cmd)
    assert body == json.dumps(json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert body.isascii() and " " not in body
    raw = sign_command(cmd, priv).to_json()
    got = _verify(raw, [pub])
    assert got == cmd and got.args["a"]["z"] == "é"
    signed = SignedCommand.model_validate_json(raw)
    assert signed.key_id == key_id(pub) and signed.body == body


def test_key_rotation_trusts_either_key(keys):
    priv, pub, old_priv, old_pub = keys
    assert _verify(_signed(old_priv), [pub, old_pub]).command == "ping"
    assert _verify(_signed(priv), [pub, old_pub]).command == "ping"
    with pytest.raises(CommandRefused) as err:
        _verify(_signed(old_priv), [pub])
    assert err.value.reason == "unknown_key" and key_id(old_pub) in err.value.message


def test_signature_covers_the_exact_bytes_and_the_domain(keys):
    priv, pub, _, _ = keys
    signed = SignedCommand.model_validate_json(_signed(priv, args={"x": 1}))
    # Same meaning, other bytes (a space): refused — nothing re-encodes before checking.
    respaced = signed.model_copy(update={"body": signed.body.replace('"x":1', '"x": 1')})
    # A manifest-style signature over the same body (no domain prefix) must not pass as a command signature.
    manifest_sig = json.loads(sign_manifest(signed.body.encode(), priv))["signature"]
    no_domain = signed.model_copy(update={"signature": manifest_sig})
    for forged in (respaced, no_domain):
        with pytest.raises(CommandRefused) as err:
            _verify(forged.to_json(), [pub])
        assert err.value.reason == "bad_signature"
    good = base64.b64decode(signed.signature)
    pub.verify(good, DOMAIN + signed.body.encode())  # what verify checks, spelled out


@pytest.mark.parametrize("fields, now, reason", [
    ({"device_id": "other"}, T0, "wrong_target"),
    ({"fleet": "g"}, T0, "wrong_target"),
    ({}, T0 + timedelta(seconds=600 + 301), "expired"),
    ({}, T0 - timedelta(seconds=301), "not_yet_valid"),
    ({"ttl_s": 86400 * 2}, T0, "lifetime_too_long"),
])
def test_target_and_validity_window(keys, fields, now, reason):
    priv, pub, _, _ = keys
    with pytest.raises(CommandRefused) as err:
        _verify(_signed(priv, **fields), [pub], now=now, max_skew_s=300, max_lifetime_s=86400)
    assert err.value.reason == reason


def test_clock_skew_within_bounds_is_accepted(keys):
    priv, pub, _, _ = keys
    raw = _signed(priv)
    assert _verify(raw, [pub], now=T0 - timedelta(seconds=299), max_skew_s=300)
    assert _verify(raw, [pub], now=T0 + timedelta(seconds=600 + 299), max_skew_s=300)


@pytest.mark.parametrize("raw, reason", [
    (b'{"schema_version": "1.0", "id": "x", "command": "ping"}', "unsigned"),
    (b'{"id": "x", "command": "rollback", "args": {"model": "m"}}', "unsigned"),
    (b"\xff\xfe", "malformed"),
    (b"[" * 50_000, "malformed"),
    (b'{"schema_version": "2.0", "body": "{}", "key_id": "zz", "signature": "AA=="}', "malformed"),
])
def test_unsigned_and_malformed(keys, raw, reason):
    _, pub, _, _ = keys
    with pytest.raises(CommandRefused) as err:
        _verify(raw, [pub])
    assert err.value.reason == reason


def test_no_trusted_key_refuses(keys):
    priv, _, _, _ = keys
    with pytest.raises(CommandRefused) as err:
        _verify(_signed(priv), [])
    assert err.value.reason == "no_trusted_key"
