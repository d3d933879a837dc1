"""On-device per-layer profiles: the ``profile`` command the device page sends, and the ``profile`` events
the agents answer with (their details carry the artifact: summary, comparison with the manifest's host
profile, gzip+base64 Chrome trace; see :mod:`edgeopt.agent.profile`)."""
from __future__ import annotations

import base64
import zlib
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeopt.sdk.errors import InputError
from edgeopt.sdk.telemetry import ProfileArgs

from .models import Device, Event

MAX_TRACE_BYTES = 64 * 1024 * 1024  # a trace inflating beyond this is refused (a hostile artifact)


def profile_events(db: Session, device: Device, limit: int = 10) -> list[Event]:
    """The device's latest ``profile`` events, newest first."""
    return list(db.scalars(select(Event).where(Event.device_pk == device.id, Event.kind == "profile")
                           .order_by(Event.ts.desc(), Event.id.desc()).limit(limit)))


def event_json(ev: Event, *, full: bool = True) -> dict[str, Any]:
    """A profile event for pages and the API; the trace itself is served separately."""
    details = ev.details if isinstance(ev.details, dict) else {}
    out: dict[str, Any] = {"id": ev.id, "ts": ev.ts.isoformat(), "model": ev.model, "version": ev.version,
                           "message": ev.message, "command_id": ev.command_id,
                           "has_trace": isinstance(details.get("trace_gz_b64"), str)}
    if full:
        out.update({k: details.get(k) for k in ("profile", "comparison", "bounds", "trace_runs", "trace_note")})
    return out


def request_profile(device: Device, model: str, runs: int, publish, signer) -> str:
    """Sign and publish a ``profile`` command for ``model`` on ``device``; returns the command id."""
    installed = {p.name for p in device.packages}
    if model not in installed:
        raise InputError(f"model {model!r} is not installed on {device.device_id} "
                         f"(installed: {', '.join(sorted(installed)) or 'none'})")
    args = ProfileArgs(model=model, runs=runs).model_dump()
    topic, payload = signer.message(device.fleet, device.device_id, "profile", args)
    publish(topic, payload)
    import json

    return json.loads(json.loads(payload)["body"])["id"]


def trace_bytes(ev: Event) -> bytes:
    """The event's Chrome trace JSON, inflated with a bound; InputError when absent or malformed."""
    details = ev.details if isinstance(ev.details, dict) else {}
    encoded = details.get("trace_gz_b64")
    if not isinstance(encoded, str):
        raise InputError("this profile event carries no trace")
    try:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        data = inflater.decompress(base64.b64decode(encoded, validate=True), MAX_TRACE_BYTES)
    except (ValueError, zlib.error) as exc:
        raise InputError(f"the profile's trace is not valid gzip+base64: {exc}") from None
    if inflater.unconsumed_tail:
        raise InputError(f"the profile's trace inflates to more than {MAX_TRACE_BYTES} bytes; refused")
    return data
