"""MQTT topics: the only module that builds or parses them.

``edgeopt/v1/<fleet>/<device_id>/<kind>`` with kind one of status, telemetry, events, cmd, cmd/result.
Fleet and device ids are single topic levels: no wildcards, separators, control characters or ``$``
at the start (Home Assistant's ``valid_publish_topic`` rules, stricter where ids are concerned).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InputError

PREFIX = "edgeopt"
VERSION = "v1"
KINDS = ("status", "telemetry", "events", "cmd", "cmd/result")
SHARED_GROUP = "edgeopt-ingest"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class TopicError(InputError):
    """A topic or topic segment is malformed."""


def validate_id(value: str, what: str = "id") -> str:
    """A fleet or device id: 1-128 of letters, digits, '.', '_', ':', '-', starting with a letter or digit."""
    if not isinstance(value, str) or not _ID.match(value):
        raise TopicError(
            f"invalid {what} {value!r}: use 1-128 letters, digits, '.', '_', ':' or '-' "
            f"(no '/', '+', '#', spaces or control characters), starting with a letter or digit"
        )
    return value


def topic(fleet: str, device_id: str, kind: str) -> str:
    """The topic for one device and message kind."""
    if kind not in KINDS:
        raise TopicError(f"unknown topic kind {kind!r}; expected one of {', '.join(KINDS)}")
    return f"{PREFIX}/{VERSION}/{validate_id(fleet, 'fleet')}/{validate_id(device_id, 'device id')}/{kind}"


@dataclass(frozen=True)
class ParsedTopic:
    fleet: str
    device_id: str
    kind: str


def parse(value: str) -> ParsedTopic:
    """Split a received topic; raises :class:`TopicError` for anything not built by :func:`topic`."""
    parts = value.split("/")
    if len(parts) < 5 or parts[0] != PREFIX or parts[1] != VERSION:
        raise TopicError(f"not an edgeopt {VERSION} topic: {value!r}")
    kind = "/".join(parts[4:])
    if kind not in KINDS:
        raise TopicError(f"unknown topic kind {kind!r} in {value!r}")
    return ParsedTopic(validate_id(parts[2], "fleet"), validate_id(parts[3], "device id"), kind)


def subscription(kind: str, fleet: str | None = None, device_id: str | None = None,
                 shared_group: str | None = None) -> str:
    """A subscription filter; ``None`` for fleet/device means every one (``+``).

    With ``shared_group`` the filter is an MQTT 5 shared subscription (``$share/<group>/...``) so that
    several ingest processes split the messages between them.
    """
    if kind not in KINDS:
        raise TopicError(f"unknown topic kind {kind!r}; expected one of {', '.join(KINDS)}")
    f = validate_id(fleet, "fleet") if fleet is not None else "+"
    d = validate_id(device_id, "device id") if device_id is not None else "+"
    filt = f"{PREFIX}/{VERSION}/{f}/{d}/{kind}"
    if shared_group is not None:
        validate_id(shared_group, "shared subscription group")
        filt = f"$share/{shared_group}/{filt}"
    return filt
