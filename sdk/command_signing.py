"""Signed fleet commands: the dashboard signs, the agent verifies (contract shared by both).

A command (:class:`~edgeopt.sdk.telemetry.CommandPayload`: id, type, target fleet and device, issued-at,
expiry, nonce, arguments) is encoded canonically — JSON with sorted keys, no spaces, ASCII only, no NaN —
and signed with Ed25519 over ``DOMAIN + body``. The domain prefix means a command signature can never
pass as a package-manifest signature or the other way round, even if someone signs both with one key.
The wire message (:class:`~edgeopt.sdk.telemetry.SignedCommand`) carries the body as the exact string
that was signed; the agent verifies those bytes and only then parses them.

:func:`verify_command` checks everything that needs no state: format, trusted key, signature, target,
validity window (with a bounded clock skew) and lifetime. Replay (the same id or nonce twice) needs
memory that survives restarts; the agent keeps it (``edgeopt.agent.control``).

Keys are the package-signing helpers' (:mod:`edgeopt.sdk.package`): PEM Ed25519, ``key_id`` fingerprints.
Pure Python plus ``cryptography`` and pydantic: importable without any ML runtime.
"""
from __future__ import annotations

import base64
import json
import secrets
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

from pydantic import ValidationError

from .errors import SecurityError
from .package import key_id
from .telemetry import CommandPayload, PayloadError, SignedCommand, parse_payload

DOMAIN = b"edgeopt-command-v2\n"
DEFAULT_TTL_S = 900.0

# Counter keys of refusals (agent metrics and events say which one).
REASONS = ("malformed", "unsigned", "unknown_key", "bad_signature", "wrong_target", "not_yet_valid", "expired",
           "lifetime_too_long", "replayed", "no_trusted_key", "internal_error")


class CommandRefused(SecurityError):
    """A command that must not run; ``reason`` is one of :data:`REASONS`, ``claimed_id`` its unverified id."""

    def __init__(self, message: str, reason: str, claimed_id: str | None = None, *, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.reason = reason
        self.claimed_id = claimed_id


def canonical_body(payload: CommandPayload) -> str:
    """The one encoding that is signed: sorted keys, compact separators, ASCII, no NaN."""
    doc = payload.model_dump(mode="json", exclude_none=True)
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def new_command(command: str, *, fleet: str, device_id: str, args: dict[str, Any] | None = None,
                command_id: str | None = None, deployment_id: str | None = None, ttl_s: float = DEFAULT_TTL_S,
                now: datetime | None = None) -> CommandPayload:
    """A command for one device, valid from ``now`` for ``ttl_s`` seconds, with a fresh nonce."""
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return CommandPayload(id=command_id or uuid.uuid4().hex, command=command, fleet=fleet, device_id=device_id,
                          issued_at=now, expires_at=now + timedelta(seconds=ttl_s), nonce=secrets.token_hex(16),
                          args=args or {}, deployment_id=deployment_id)


def sign_command(payload: CommandPayload, private_key) -> SignedCommand:
    """Encode ``payload`` canonically and sign it with an Ed25519 private key."""
    body = canonical_body(payload)
    signature = private_key.sign(DOMAIN + body.encode("ascii"))
    return SignedCommand(body=body, key_id=key_id(private_key.public_key()),
                         signature=base64.b64encode(signature).decode("ascii"))


def _claimed_id(raw: bytes | str) -> str | None:
    """The id an unverified message says it has (for logs and events only, never trusted)."""
    try:
        doc = json.loads(raw)
        if isinstance(doc, dict) and isinstance(doc.get("body"), str):
            doc = json.loads(doc["body"])
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    cid = doc.get("id") if isinstance(doc, dict) else None
    return "".join(ch for ch in str(cid)[:64] if ch.isprintable()) if isinstance(cid, (str, int)) else None


def verify_command(raw: bytes | str, trusted_keys: Iterable, *, fleet: str, device_id: str,
                   now: datetime | None = None, max_skew_s: float = 300.0,
                   max_lifetime_s: float = 86400.0) -> CommandPayload:
    """Check a received ``cmd`` message and return the command it carries; raise :class:`CommandRefused`.

    Order matters: nothing from the body is believed before the signature over its exact bytes checks
    out with a trusted key.
    """
    keys = {key_id(k): k for k in trusted_keys}
    if not keys:
        raise CommandRefused("no command-signing key is trusted: every command is refused", "no_trusted_key",
                             _claimed_id(raw), hint="add the dashboard's public key to [control] trust_keys")
    try:
        signed = parse_payload("cmd", raw)
    except RecursionError:  # absurdly nested JSON: the stdlib decoder gives up before we do
        raise CommandRefused("malformed command: JSON nested too deeply", "malformed") from None
    except PayloadError as exc:
        reason = "unsigned" if exc.reason == "bad_version" or _looks_unsigned(raw) else "malformed"
        what = "unsigned command" if reason == "unsigned" else "malformed command"
        raise CommandRefused(f"{what}: {exc.one_line()}", reason, _claimed_id(raw),
                             hint="only commands signed by the dashboard (schema 2) are accepted") from None
    assert isinstance(signed, SignedCommand)
    claimed = _claimed_id(raw)
    public = keys.get(signed.key_id)
    if public is None:
        raise CommandRefused(f"command signed by key {signed.key_id}, which this device does not trust "
                             f"(trusted: {', '.join(sorted(keys))})", "unknown_key", claimed)
    try:
        signature = base64.b64decode(signed.signature, validate=True)
        public.verify(signature, DOMAIN + signed.body.encode("utf-8"))
    except Exception:  # binascii.Error, InvalidSignature: either way the bytes are not what was signed
        raise CommandRefused(f"command signature does not verify with key {signed.key_id}", "bad_signature",
                             claimed) from None
    try:
        cmd = CommandPayload.model_validate_json(signed.body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<body>"
        raise CommandRefused(f"signed command is invalid at {loc}: {first['msg']}", "malformed", claimed) from None
    if (cmd.fleet, cmd.device_id) != (fleet, device_id):
        raise CommandRefused(f"command {cmd.id} is for {cmd.fleet}/{cmd.device_id}, not this device "
                             f"({fleet}/{device_id})", "wrong_target", cmd.id)
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    skew = timedelta(seconds=max_skew_s)
    if cmd.issued_at > now + skew:
        raise CommandRefused(f"command {cmd.id} is issued at {cmd.issued_at.isoformat()}, in the future for this "
                             f"device (its clock says {now.isoformat()})", "not_yet_valid", cmd.id,
                             hint="check the clocks of the dashboard and the device (NTP)")
    if now > cmd.expires_at + skew:
        raise CommandRefused(f"command {cmd.id} expired at {cmd.expires_at.isoformat()} (device clock "
                             f"{now.isoformat()})", "expired", cmd.id)
    lifetime = (cmd.expires_at - cmd.issued_at).total_seconds()
    if lifetime > max_lifetime_s:
        raise CommandRefused(f"command {cmd.id} is valid for {lifetime:.0f} s, longer than the "
                             f"{max_lifetime_s:.0f} s this device accepts", "lifetime_too_long", cmd.id)
    return cmd


def _looks_unsigned(raw: bytes | str) -> bool:
    """A schema 1 command (bare JSON with a ``command`` field and no signature)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(doc, dict) and "signature" not in doc and "command" in doc
