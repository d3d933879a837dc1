"""MQTT payloads shared by the agent (writer) and the dashboard (reader).

Every payload is a JSON object with ``schema_version``, ``device_id``, UTC ``ts``, ``session_id`` and a
per-session ``seq`` (Sparkplug B style), so a reader drops QoS 1 duplicates by (device, session, seq) and
can order a late last will after a restart. Unknown fields are ignored; an unknown major version is
rejected. Latency is carried as a sparse logarithmic histogram in DDSketch's layout (relative accuracy 1%
from 10 us to 100 s), so readers merge devices by adding counts and compute fleet percentiles within that
accuracy instead of averaging percentiles.

Schema 1.1 introduced that layout (:class:`LatencySketch`); a 1.0 payload's fixed 29-bucket histogram
(:class:`HistogramModel`) is still read and converted by :meth:`HistogramModel.to_histogram`.
"""
from __future__ import annotations

import json
import math
import re
from bisect import bisect_right
from datetime import datetime, timezone
from itertools import accumulate
from typing import Annotated, Any, Iterable, Literal, Union

from pydantic import (AwareDatetime, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      field_validator, model_validator)

from .errors import InputError

# 1.1: latency travels as a LatencySketch (DDSketch layout; 1.0's fixed buckets are converted on read); events
# placement and profile (issue 12); ModelStats.live_sequences (issue 16); ModelStats.text (issue 14: optional,
# so 1.1 readers that predate it ignore it).
SCHEMA_VERSION = "1.1"
SUPPORTED_MAJOR = 1
# Commands went to 2.0 when they became signed: a 1.x (unsigned) command is refused by every agent that
# verifies signatures, and an older agent refuses a 2.x one instead of running it unchecked.
COMMAND_SCHEMA_VERSION = "2.1"  # 2.1: command profile (issue 12)
COMMAND_MAJOR = 2
MAX_PAYLOAD_BYTES = 256 * 1024
# Deepest JSON nesting a payload may have (a telemetry payload needs 5). The standard library's decoder
# recurses once per level and a few KB of brackets end in RecursionError, so depth is checked first.
MAX_JSON_DEPTH = 32

# Schema 1.0's fixed latency buckets (upper bounds, ms; one more bucket counts everything above the last).
# Neighbours are up to 2.5x apart, so percentiles read from them were off by up to ~20%; they are kept only
# to read 1.0 payloads (HistogramModel) and to convert what was stored from them.
LEGACY_BUCKETS_MS: tuple[float, ...] = (
    0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0,
    100.0, 150.0, 200.0, 300.0, 500.0, 750.0, 1000.0, 2000.0, 5000.0, 10000.0,
)
LATENCY_BUCKETS_MS = LEGACY_BUCKETS_MS  # the 1.0 name

# The latency layout of schema 1.1: DDSketch's LogarithmicMapping (ddsketch.mapping, offset 0) with relative
# accuracy 1%. Key k holds the values v with gamma**(k-1) < v <= gamma**k and reads back as
# 2 * gamma**k / (1 + gamma), within 1% of every value it holds. Keys are clamped to [SKETCH_MIN_MS,
# SKETCH_MAX_MS] so a histogram has at most SKETCH_BINS keys: below 10 us reads as 10 us, above 100 s as 100 s.
RELATIVE_ACCURACY = 0.01
SKETCH_LAYOUT = "ddsketch-log-0.01"
SKETCH_MIN_MS = 0.01
SKETCH_MAX_MS = 100_000.0
_GAMMA_MANTISSA = 2 * RELATIVE_ACCURACY / (1 - RELATIVE_ACCURACY)
GAMMA = 1 + _GAMMA_MANTISSA
# The same float operations as ddsketch's LogarithmicMapping, so keys agree with it bit for bit.
_MULTIPLIER = (1 / math.log1p(_GAMMA_MANTISSA)) * math.log(2)
_VALUE_FACTOR = 2.0 / (1 + GAMMA)


def _raw_key(ms: float) -> int:
    return int(math.ceil(math.log(ms, 2) * _MULTIPLIER) + 0.0)


SKETCH_KEY_MIN = _raw_key(SKETCH_MIN_MS)
SKETCH_KEY_MAX = _raw_key(SKETCH_MAX_MS)
SKETCH_BINS = SKETCH_KEY_MAX - SKETCH_KEY_MIN + 1
MAX_BIN_COUNT = 2**48  # per bin of one payload: far above any interval's requests, far below int64


def sketch_key(ms: float) -> int:
    """The key of a latency in ms (clamped to the layout's range; NaN and values <= 10 us go to the lowest)."""
    if not ms > SKETCH_MIN_MS:
        return SKETCH_KEY_MIN
    if ms >= SKETCH_MAX_MS:
        return SKETCH_KEY_MAX
    return _raw_key(ms)


def sketch_value(key: int) -> float:
    """The value (ms) a key reads back as: within :data:`RELATIVE_ACCURACY` of every value it holds."""
    return math.pow(2.0, key / _MULTIPLIER) * _VALUE_FACTOR


def sketch_upper_bound(key: int) -> float:
    """The largest value (ms) key ``key`` holds (gamma**key)."""
    return math.pow(2.0, key / _MULTIPLIER)


class PayloadError(InputError):
    """A payload could not be accepted; ``reason`` is a short counter key (bad_json, bad_schema, ...)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class Histogram:
    """Latency histogram in the contract's DDSketch layout: ``bins`` maps a key (:func:`sketch_key`) to its
    count. Merged by adding counts; quantiles are within :data:`RELATIVE_ACCURACY` of the exact ones."""

    __slots__ = ("bins", "sum_ms", "count")

    def __init__(self, bins: dict[int, int] | None = None, sum_ms: float = 0.0):
        self.bins: dict[int, int] = {}
        for k, c in (bins or {}).items():
            if not SKETCH_KEY_MIN <= k <= SKETCH_KEY_MAX:
                raise ValueError(f"histogram key {k} outside [{SKETCH_KEY_MIN}, {SKETCH_KEY_MAX}]")
            if c < 0:
                raise ValueError(f"histogram count {c} of key {k} is negative")
            if c:
                self.bins[int(k)] = int(c)
        self.sum_ms = sum_ms
        self.count = sum(self.bins.values())

    def observe(self, ms: float, n: int = 1) -> None:
        k = sketch_key(ms)
        self.bins[k] = self.bins.get(k, 0) + n
        self.sum_ms += ms * n
        self.count += n

    def merge(self, other: "Histogram") -> "Histogram":
        bins = self.bins
        for k, c in other.bins.items():
            bins[k] = bins.get(k, 0) + c
        self.sum_ms += other.sum_ms
        self.count += other.count
        return self

    def quantiles(self, qs: Iterable[float]) -> list[float | None]:
        """DDSketch's quantiles: the value of the lowest key whose running count exceeds q * (count - 1);
        None when empty. Within 1% of the exact lower q-quantile of the values observed (in range)."""
        qs = list(qs)
        if self.count == 0:
            return [None] * len(qs)
        for q in qs:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"quantile {q} outside [0, 1]")
        # One sort and one running sum for all the quantiles, then a binary search each (ingest asks
        # for three per message): the first key whose running count exceeds the rank.
        keys = sorted(self.bins)
        running = list(accumulate(map(self.bins.__getitem__, keys)))
        last = len(keys) - 1
        return [sketch_value(keys[min(bisect_right(running, q * (self.count - 1)), last)]) for q in qs]

    def quantile(self, q: float) -> float | None:
        """One q-quantile (0..1), see :meth:`quantiles`."""
        return self.quantiles((q,))[0]

    def to_pairs(self) -> list[int]:
        """``[key0, count0, key1, count1, ...]`` by key: the dashboard's stored form."""
        out: list[int] = []
        for k in sorted(self.bins):
            out += (k, self.bins[k])
        return out

    @classmethod
    def from_pairs(cls, pairs: list[int], sum_ms: float = 0.0) -> "Histogram":
        """The inverse of :meth:`to_pairs`; ValueError for an odd length, a key out of range or a negative count."""
        if len(pairs) % 2:
            raise ValueError(f"histogram pairs need an even length, got {len(pairs)}")
        h = cls(None, sum_ms)
        for i in range(0, len(pairs), 2):
            k, c = int(pairs[i]), int(pairs[i + 1])
            if not SKETCH_KEY_MIN <= k <= SKETCH_KEY_MAX or c < 0:
                raise ValueError(f"histogram pair ({k}, {c}) is out of range")
            if c:
                h.bins[k] = h.bins.get(k, 0) + c
                h.count += c
        return h

    def to_model(self) -> "LatencySketch":
        keys = sorted(self.bins)
        return LatencySketch(keys=keys, counts=[self.bins[k] for k in keys], sum_ms=self.sum_ms)


def _legacy_weights() -> list[list[tuple[int, float]]]:
    """For every 1.0 bucket, the sketch keys its range overlaps and the share of the bucket's width each one
    takes (the 1.0 reader interpolated linearly inside a bucket, so a uniform spread reads back the same)."""
    out = []
    for i in range(len(LEGACY_BUCKETS_MS) + 1):
        lo = LEGACY_BUCKETS_MS[i - 1] if i else 0.0
        hi = LEGACY_BUCKETS_MS[i] if i < len(LEGACY_BUCKETS_MS) else LEGACY_BUCKETS_MS[-1] * 2
        shares = []
        for k in range(sketch_key(lo), sketch_key(hi) + 1):
            k_lo = 0.0 if k == SKETCH_KEY_MIN else sketch_upper_bound(k - 1)
            k_hi = sketch_upper_bound(k)
            overlap = min(hi, k_hi) - max(lo, k_lo)
            if overlap > 0:
                shares.append((k, overlap / (hi - lo)))
        out.append(shares)
    return out


_LEGACY_WEIGHTS = _legacy_weights()


def legacy_to_bins(counts: list[int]) -> dict[int, int]:
    """A 1.0 histogram's 29 counts as sketch bins: each count spread over the keys its bucket covers in
    proportion to width (largest remainders, so the total is exact). The result is no more accurate than
    the 1.0 buckets were; it reads back what the 1.0 reader showed, and merges with 1.1 data."""
    if len(counts) != len(_LEGACY_WEIGHTS):
        raise ValueError(f"a 1.0 histogram has {len(_LEGACY_WEIGHTS)} counts, got {len(counts)}")
    bins: dict[int, int] = {}
    for c, shares in zip(counts, _LEGACY_WEIGHTS):
        c = int(c)
        if c <= 0:
            continue
        exact = [(k, c * w) for k, w in shares]
        given = [(k, int(x)) for k, x in exact]
        left = c - sum(n for _, n in given)
        # Largest remainders first; ties to the lower key so the result is deterministic.
        order = sorted(range(len(exact)), key=lambda j: (-(exact[j][1] - given[j][1]), j))
        for j in order[:left]:
            given[j] = (given[j][0], given[j][1] + 1)
        for k, n in given:
            if n:
                bins[k] = bins.get(k, 0) + n
    return bins


def _check_major(v: str, supported: int) -> str:
    try:
        major = int(str(v).split(".", 1)[0])
    except ValueError:
        raise ValueError(f"schema_version must look like '{supported}.0', found {v!r}") from None
    if major != supported:
        raise ValueError(f"unsupported schema major version {major} (supported: {supported})")
    return v


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore")

    schema_version: str = Field(SCHEMA_VERSION, description="major.minor; readers reject other majors.")
    device_id: str = Field(min_length=1, max_length=128)
    ts: AwareDatetime = Field(default_factory=lambda: datetime.now(timezone.utc), description="UTC time.")
    session_id: str = Field(min_length=1, max_length=64, description="New for every agent start.")
    seq: int = Field(ge=0, description="Per-session sequence number, over all of this device's payloads.")

    @field_validator("schema_version")
    @classmethod
    def _major(cls, v: str) -> str:
        return _check_major(v, SUPPORTED_MAJOR)

    @field_validator("ts")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        return v.astimezone(timezone.utc)

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode("utf-8")


class InstalledPackage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    version: str
    profile: str
    runtime: str
    precision: str | None = None
    sha256: str | None = None
    previous_version: str | None = None


class StatusPayload(_Payload):
    """Retained on ``status``: ``online`` as birth, ``offline`` as last will."""

    kind: Literal["status"] = "status"
    state: Literal["online", "offline"]
    agent_version: str | None = None
    capabilities: dict[str, Any] = Field(default_factory=dict)
    packages: list[InstalledPackage] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)


class HistogramModel(BaseModel):
    """Schema 1.0's latency histogram: counts over :data:`LEGACY_BUCKETS_MS`. Read, never written."""

    model_config = ConfigDict(extra="ignore")
    bounds_ms: list[float] = Field(default_factory=lambda: list(LEGACY_BUCKETS_MS))
    counts: list[Annotated[int, Field(ge=0, le=MAX_BIN_COUNT)]]
    sum_ms: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _shape(self) -> "HistogramModel":
        if tuple(self.bounds_ms) != LEGACY_BUCKETS_MS:
            raise ValueError("histogram bounds differ from the contract's fixed LATENCY_BUCKETS_MS")
        if len(self.counts) != len(LEGACY_BUCKETS_MS) + 1:
            raise ValueError(f"histogram needs {len(LEGACY_BUCKETS_MS) + 1} counts")
        return self

    def to_histogram(self) -> Histogram:
        """Converted to the 1.1 layout (:func:`legacy_to_bins`)."""
        h = Histogram(None, self.sum_ms)
        h.bins = legacy_to_bins(self.counts)
        h.count = sum(self.counts)
        return h


class LatencySketch(BaseModel):
    """Schema 1.1's latency histogram, sparse: the non-empty keys of the DDSketch layout, ascending, and
    their counts. Merging two is adding the counts of equal keys."""

    model_config = ConfigDict(extra="ignore")
    layout: Literal["ddsketch-log-0.01"] = Field(SKETCH_LAYOUT, description="Key mapping: DDSketch's "
                                                 "LogarithmicMapping, relative accuracy 0.01, keys clamped "
                                                 "to 10 us .. 100 s.")
    keys: list[Annotated[int, Field(ge=SKETCH_KEY_MIN, le=SKETCH_KEY_MAX)]] = Field(
        default_factory=list, max_length=SKETCH_BINS, description="Non-empty keys, strictly ascending.")
    counts: list[Annotated[int, Field(ge=0, le=MAX_BIN_COUNT)]] = Field(
        default_factory=list, max_length=SKETCH_BINS, description="Count of each key.")
    sum_ms: float = Field(0.0, ge=0, description="Sum of the latencies observed (ms).")

    @model_validator(mode="after")
    def _shape(self) -> "LatencySketch":
        if len(self.keys) != len(self.counts):
            raise ValueError(f"{len(self.keys)} keys but {len(self.counts)} counts")
        if not all(map(int.__lt__, self.keys, self.keys[1:])):  # map over a C slot: no Python frame per key
            raise ValueError("keys must be strictly ascending")
        return self

    def to_histogram(self) -> Histogram:
        h = Histogram(None, self.sum_ms)
        h.bins = {k: c for k, c in zip(self.keys, self.counts) if c}
        h.count = sum(self.counts)
        return h


def _latency_layout(v: Any) -> str:
    if isinstance(v, dict):
        return "sketch" if "layout" in v else "fixed"
    return "fixed" if isinstance(v, HistogramModel) else "sketch"


LatencyModel = Annotated[Union[Annotated[LatencySketch, Tag("sketch")], Annotated[HistogramModel, Tag("fixed")]],
                         Discriminator(_latency_layout)]


class TextStats(BaseModel):
    """A text-generation model's interval figures (issue 14). The two sketches use the latency layout, so
    readers merge devices the same way; the token counts add up across devices and intervals."""

    model_config = ConfigDict(extra="ignore")
    ttft: LatencySketch = Field(default_factory=LatencySketch,
                                description="Time to first token (ms) of each request that produced one.")
    tpot: LatencySketch = Field(default_factory=LatencySketch,
                                description="Time per output token after the first (ms), one value per finished "
                                            "request: (last token time - first token time) / (tokens - 1).")
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    tpot_p50_ms: float | None = None
    tpot_p95_ms: float | None = None
    prompt_tokens: int = Field(0, ge=0, description="Prompt tokens of the requests admitted in the interval.")
    generated_tokens: int = Field(0, ge=0, description="Tokens generated (streamed or not) in the interval.")
    tokens_per_s: float = Field(0.0, ge=0, description="generated_tokens / the interval's length.")
    kv_cache_usage: float | None = Field(None, ge=0, le=1, description="KV cache blocks in use at the end of the "
                                                                       "interval, as a share of the cache.")
    kv_cache_peak: float | None = Field(None, ge=0, le=1, description="The most of the KV cache in use at once.")
    running: int = Field(0, ge=0, description="Requests generating at the end of the interval.")
    waiting: int = Field(0, ge=0, description="Requests admitted and not yet scheduled at the end of the interval.")
    cancelled: int = Field(0, ge=0, description="Requests ended early: the client went away or asked to stop.")
    preemptions: int | None = Field(None, ge=0, description="Requests the scheduler evicted from the KV cache "
                                                            "to make room (None: the runtime does not say).")


class ModelStats(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    version: str | None = None
    requests: int = Field(ge=0, description="Requests completed in this interval.")
    errors: int = Field(0, ge=0)
    throughput_ips: float = Field(0.0, ge=0, description="Inferences per second over the interval.")
    latency: LatencyModel = Field(description="1.1: a LatencySketch; 1.0: a HistogramModel (converted on read).")
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    queue_depth: int = Field(0, ge=0)
    batch_sizes: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    live_sequences: int | None = Field(None, ge=0, description="Stateful models: sequences (streams) with state "
                                                               "kept on the device at the end of the interval.")
    text: TextStats | None = Field(None, description="Text-generation models only: TTFT, time per output token, "
                                                     "tokens, KV cache.")


class SystemStats(BaseModel):
    model_config = ConfigDict(extra="ignore")
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    mem_total_bytes: int | None = None
    mem_available_bytes: int | None = None
    temperature_c: float | None = None
    load_1m: float | None = None


class TelemetryPayload(_Payload):
    kind: Literal["telemetry"] = "telemetry"
    interval_s: float = Field(gt=0, le=86400)
    models: list[ModelStats] = Field(default_factory=list)
    system: SystemStats = Field(default_factory=SystemStats)
    dropped: int = Field(0, ge=0, description="Outbox messages dropped (oldest first) since the agent started.")


class EventPayload(_Payload):
    kind: Literal["event"] = "event"
    event: Literal["download", "install", "switch", "self_test", "rollback", "refused", "error", "config",
                   "started", "stopped", "placement", "profile"]
    ok: bool = True
    model: str | None = None
    version: str | None = None
    from_version: str | None = None
    message: str = ""
    command_id: str | None = None
    deployment_id: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class CommandPayload(BaseModel):
    """A dashboard command: what to do, to which device, and when it is valid (schema 2).

    It is never sent bare: :mod:`edgeopt.sdk.command_signing` encodes it canonically and signs it, and
    :class:`SignedCommand` carries those exact bytes. The agent answers on ``cmd/result`` naming the id.
    """

    model_config = ConfigDict(extra="ignore")
    schema_version: str = Field(COMMAND_SCHEMA_VERSION, description="major.minor; agents reject other majors.")
    id: str = Field(min_length=1, max_length=64, description="Command id; every result names it.")
    command: Literal["deploy", "rollback", "set-config", "ping", "profile"]
    fleet: str = Field(min_length=1, max_length=128, description="The fleet of the one device it targets.")
    device_id: str = Field(min_length=1, max_length=128, description="The one device it targets.")
    issued_at: AwareDatetime = Field(description="UTC time the dashboard signed it.")
    expires_at: AwareDatetime = Field(description="UTC time after which the agent refuses it.")
    nonce: str = Field(pattern=r"^[0-9a-f]{32}$", description="128 random bits; a replay repeats it.")
    args: dict[str, Any] = Field(default_factory=dict)
    deployment_id: str | None = Field(None, max_length=64)

    @field_validator("schema_version")
    @classmethod
    def _major(cls, v: str) -> str:
        return _check_major(v, COMMAND_MAJOR)

    @field_validator("issued_at", "expires_at")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        return v.astimezone(timezone.utc)

    @model_validator(mode="after")
    def _window(self) -> "CommandPayload":
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        return self


class SignedCommand(BaseModel):
    """What travels on ``cmd``: the canonical JSON of a :class:`CommandPayload` and its Ed25519 signature.

    ``body`` is verified as the exact string received and only then parsed, so no re-encoding can make
    the bytes checked differ from the command executed.
    """

    model_config = ConfigDict(extra="ignore")
    schema_version: str = Field(COMMAND_SCHEMA_VERSION, description="major.minor; agents reject other majors.")
    body: str = Field(min_length=2, max_length=MAX_PAYLOAD_BYTES, description="Canonical JSON of the command.")
    alg: Literal["ed25519"] = "ed25519"
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$", description="Fingerprint of the signing key (sdk.package.key_id).")
    signature: str = Field(min_length=1, max_length=200, description="Base64 Ed25519 signature.")

    @field_validator("schema_version")
    @classmethod
    def _major(cls, v: str) -> str:
        return _check_major(v, COMMAND_MAJOR)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode("utf-8")


class DeployArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    package_url: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int | None = Field(None, ge=0)
    name: str | None = None
    version: str | None = None


class RollbackArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    version: str | None = Field(None, description="Version to return to; default the previous one.")


class ProfileArgs(BaseModel):
    """``profile``: per-layer profile of an installed model on the device, bounded in runs and time."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=128, description="Installed model to profile (current version).")
    runs: int = Field(30, ge=1, le=200, description="Profiled runs on the golden input.")
    deadline_s: float = Field(20.0, gt=0.0, le=120.0, description="Stop profiling after this many seconds.")


class CommandResultPayload(_Payload):
    kind: Literal["cmd_result"] = "cmd_result"
    command_id: str
    command: str | None = None
    ok: bool
    status: Literal["accepted", "succeeded", "failed", "rejected"]
    message: str = ""
    deployment_id: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


PAYLOAD_BY_KIND: dict[str, type[BaseModel]] = {
    "status": StatusPayload,
    "telemetry": TelemetryPayload,
    "events": EventPayload,
    "cmd": SignedCommand,
    "cmd/result": CommandResultPayload,
}


_MAJOR_BY_KIND = {"cmd": COMMAND_MAJOR}


# JSON strings (brackets inside them do not nest) and every byte that is not a bracket.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_NUL_ESCAPE = b"\\u0000"


def json_too_deep(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``data`` nests arrays/objects deeper than ``max_depth``, found without parsing it
    (C-speed scans; one pass over the brackets only when there are more than ``max_depth`` of them)."""
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return False
    depth = 0
    for b in _JSON_STRING.sub(b'""', data).translate(None, _NOT_BRACKETS):
        depth += 1 if b in (0x5B, 0x7B) else -1
        if depth > max_depth:
            return True
    return False


def _nul_path(value: Any, path: str = "") -> str | None:
    """Where in a decoded document a string (key or value) holds U+0000, or None."""
    if isinstance(value, str):
        return (path or "<top>") if "\x00" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            key = k.replace("\x00", "\\u0000")
            where = f"{path}.{key}" if path else key
            if "\x00" in k:
                return where
            found = _nul_path(v, where)
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _nul_path(v, f"{path}[{i}]")
            if found:
                return found
    return None


def load_json(data: bytes | str, max_bytes: int = MAX_PAYLOAD_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The standard library's ``json.loads`` with the bounds every reader of device input needs: size,
    nesting depth, and no U+0000 in any string (PostgreSQL text cannot hold it, and a NUL in a name or
    message is never legitimate). Raises :class:`PayloadError` with reason ``oversize``, ``too_deep``,
    ``bad_json`` or ``nul_char``."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise PayloadError(f"payload of {len(raw)} bytes is over the {max_bytes}-byte limit", "oversize")
    if json_too_deep(raw, max_depth):
        raise PayloadError(f"payload nests deeper than {max_depth} levels", "too_deep")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"payload is not JSON: {exc}", "bad_json") from None
    except RecursionError:  # unreachable after the depth check; kept so no input can escape as a crash
        raise PayloadError(f"payload nests deeper than {max_depth} levels", "too_deep") from None
    if _NUL_ESCAPE in raw:  # the exact walk only when an escaped NUL may be there
        where = _nul_path(doc)
        if where:
            raise PayloadError(f"payload holds a NUL character (\\u0000) at {where}", "nul_char")
    return doc


def parse_payload(kind: str, data: bytes | str, max_bytes: int = MAX_PAYLOAD_BYTES) -> BaseModel:
    """Decode and validate a payload for a topic kind. Raises :class:`PayloadError` with a counter reason
    (``unknown_kind``, ``oversize``, ``too_deep``, ``bad_json``, ``nul_char``, ``bad_version``, ``bad_schema``)."""
    model = PAYLOAD_BY_KIND.get(kind)
    if model is None:
        raise PayloadError(f"unknown payload kind {kind!r}", "unknown_kind")
    doc = load_json(data, max_bytes=max_bytes)
    if not isinstance(doc, dict):
        raise PayloadError("payload must be a JSON object", "bad_json")
    version = str(doc.get("schema_version", ""))
    if version and version.split(".", 1)[0] != str(_MAJOR_BY_KIND.get(kind, SUPPORTED_MAJOR)):
        raise PayloadError(f"unsupported schema_version {version!r}", "bad_version")
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<top>"
        raise PayloadError(f"invalid {kind} payload at {loc}: {first['msg']}", "bad_schema") from None

