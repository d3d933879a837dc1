"""The agent's configuration file (TOML), validated like hardware profiles.

Unknown keys are refused; every error names the file, the key path, the value found and what was
expected (``edgeopt.sdk.profile.format_validation_error``). Relative paths in the file are resolved
against the file's own folder, so a config and its keys can move together.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..sdk.errors import ConfigError
from ..sdk.profile import format_validation_error
from ..sdk.topics import TopicError, validate_id

if TYPE_CHECKING:
    from .connection import HttpLimits

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_API_PORT = 8470
GIB = 1024**3


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerConfig(_Strict):
    """Where the agent publishes telemetry and receives commands."""

    url: str = Field(title="Broker URL", description="mqtt://host:port, or mqtts://host:port for TLS.")
    ca_file: Path | None = Field(None, title="CA file", description="PEM CA bundle to verify the broker (mqtts).")
    cert_file: Path | None = Field(None, title="Client certificate", description="PEM client certificate (mqtts).")
    key_file: Path | None = Field(None, title="Client key", description="PEM private key of cert_file (mqtts).")
    username: str | None = Field(None, title="User name", description="MQTT user name.")
    password: str | None = Field(None, title="Password", description="MQTT password (needs username).")
    keepalive_s: int = Field(30, ge=5, le=3600, title="Keepalive", description="MQTT keepalive in seconds.")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"broker url must start with mqtt:// or mqtts://, found {v!r}")
        if not parts.hostname:
            raise ValueError(f"broker url {v!r} has no host; expected mqtt://host:1883")
        try:
            parts.port
        except ValueError:
            raise ValueError(f"broker url {v!r} has an invalid port") from None
        if parts.path not in ("", "/") or parts.query:
            raise ValueError(f"broker url {v!r} must be mqtt(s)://host[:port] with no path or query")
        return v

    @model_validator(mode="after")
    def _tls_and_auth(self) -> "BrokerConfig":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both or neither")
        if not self.tls and (self.ca_file or self.cert_file):
            raise ValueError("ca_file/cert_file/key_file need an mqtts:// url (TLS); the url is mqtt://")
        if self.password is not None and self.username is None:
            raise ValueError("password is set but username is not")
        return self

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)


class ApiConfig(_Strict):
    """The local inference API (Open Inference Protocol over HTTP)."""

    host: str = Field("127.0.0.1", title="Bind address",
                      description="Loopback by default; use 0.0.0.0 only behind a firewall (no authentication).")
    port: int = Field(DEFAULT_API_PORT, ge=0, le=65535, title="Port", description="TCP port (0 = any free port).")
    event_loop: Literal["asyncio", "uvloop"] = Field(
        "asyncio", title="Event loop",
        description="asyncio: the standard library's loop. uvloop: uvloop's loop (pip install uvloop); it measured "
                    "no faster here, see BENCHMARKS.md.")
    max_connections: int = Field(
        512, ge=1, le=100_000, title="Max connections",
        description="Open client connections at most. At the cap a new connection closes the longest-idle one; "
                    "when all are busy it gets 503. Lowered (with a warning) to the open-file limit minus 160, "
                    "and to 864 at most: the MQTT client cannot use a descriptor numbered 1024 or above.")
    header_timeout_s: float = Field(
        10.0, gt=0, le=3600, title="Header timeout",
        description="Seconds a client has to send a whole request head (and a new connection its first one); "
                    "then 408 and the connection is closed.")
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600, title="Body timeout",
        description="Seconds a request body may stall without new bytes before 408 and close.")
    idle_timeout_s: float = Field(
        60.0, gt=0, le=86400, title="Idle timeout",
        description="Seconds a keep-alive connection may sit idle between requests before it is closed.")
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, le=1024 * 1024, title="Max request head",
        description="Largest request head (request line and headers) in bytes; larger ones get 431.")
    max_body_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, le=4 * GIB, title="Max request body",
        description="Largest request body in bytes, after gzip/deflate decoding too; larger ones get 413.")

    def http_limits(self) -> HttpLimits:
        """These bounds as the transport's :class:`~edgeopt.agent.connection.HttpLimits`."""
        from .connection import HttpLimits

        return HttpLimits(max_header_bytes=self.max_header_bytes, max_body_bytes=self.max_body_bytes,
                          header_timeout_s=self.header_timeout_s, body_timeout_s=self.body_timeout_s,
                          idle_timeout_s=self.idle_timeout_s, max_connections=self.max_connections)


class BatchingConfig(_Strict):
    """The per-model dynamic batcher."""

    enabled: bool = Field(True, title="Enabled", description="Group concurrent requests into one batch.")
    max_batch: int | None = Field(None, ge=1, le=4096, title="Max batch",
                                  description="Largest batch; unset uses the package profile's batch_size.")
    max_delay_ms: float = Field(2.0, ge=0.0, le=1000.0, title="Max queue delay",
                                description="How long the first request of a batch may wait for others (ms).")
    max_queue: int = Field(256, ge=1, le=1_000_000, title="Max queue",
                           description="Queued requests per model before answering 503 with Retry-After.")
    sequence_idle_timeout_s: float = Field(
        60.0, gt=0.0, le=86400.0, title="Sequence idle timeout",
        description="Stateful models: a sequence without a request for this long is ended (its state freed).")
    max_sequences: int = Field(
        1024, ge=1, le=1_000_000, title="Max sequences",
        description="Stateful models: live sequences per model; a new one evicts the longest-idle sequence.")


class TextGenerationConfig(_Strict):
    """Language-model packages (runtime openvino-genai): the continuous-batching engine and its limits."""

    max_running: int = Field(8, ge=1, le=1024, title="Max running",
                             description="Requests generating at once (the engine's max_num_seqs).")
    max_queue: int = Field(64, ge=1, le=100_000, title="Max queue",
                           description="Requests admitted (running + waiting) before answering 503 busy.")
    default_max_tokens: int = Field(256, ge=1, le=1_000_000, title="Default max tokens",
                                    description="Tokens generated when a request does not say (capped by the "
                                                "model's context).")
    kv_cache_gb: float | None = Field(None, gt=0, le=1024, title="KV cache budget",
                                      description="Paged KV cache memory (GB); unset uses the package profile's.")
    prefix_caching: bool = Field(True, title="Prefix caching",
                                 description="Reuse KV cache blocks of a prompt prefix seen before (a shared "
                                             "system prompt is computed once).")
    pipeline: Literal["auto", "continuous", "stateful"] = Field(
        "auto", title="Pipeline", description="continuous: OpenVINO GenAI's continuous batching (CPU, GPU); "
                                              "stateful: its LLMPipeline, one request at a time (what an NPU runs); "
                                              "auto: stateful on NPU, continuous elsewhere.")
    max_prompt_chars: int = Field(1_000_000, ge=1, le=100_000_000, title="Max prompt characters",
                                  description="Longest prompt text accepted before tokenizing (bounds work per "
                                              "request; the context length is checked after).")


class DownloadConfig(_Strict):
    """Package downloads for deploy commands."""

    max_bytes: int = Field(2 * GIB, ge=1, title="Size limit", description="Largest package accepted, in bytes.")
    timeout_s: float = Field(60.0, gt=0, le=3600, title="Timeout",
                             description="Socket timeout per connection attempt, in seconds.")
    allowed_urls: list[str] = Field(
        default_factory=list, max_length=16, title="Package store URLs",
        description="Base URLs deploy commands may download from (the dashboard's download URL, e.g. "
                    "https://dashboard:8080/dl/). Any other scheme, host, port or path is refused before "
                    "connecting; empty refuses every deploy command.")

    @field_validator("allowed_urls")
    @classmethod
    def _bases(cls, v: list[str]) -> list[str]:
        from .download import normalize_base_url

        return [normalize_base_url(u) for u in v]


class ControlConfig(_Strict):
    """Who may command this device over MQTT: the dashboard's command-signing public keys."""

    trust_keys: list[Path] = Field(
        default_factory=list, max_length=16, title="Command keys",
        description="PEM Ed25519 public keys of the dashboard's command-signing key(s) (`edgeopt-dashboard "
                    "command-key` prints it). Several during a key rotation. Empty refuses every command.")
    max_clock_skew_s: float = Field(300.0, ge=0, le=86400, title="Clock skew",
                                    description="How far this device's clock may be from the dashboard's.")
    max_command_lifetime_s: float = Field(86400.0, gt=0, le=30 * 86400, title="Longest command lifetime",
                                          description="Commands valid for longer than this are refused.")


class OutboxConfig(_Strict):
    """The on-disk outbox that keeps telemetry and events while the broker is away."""

    max_messages: int = Field(100_000, ge=10, le=10_000_000, title="Max messages",
                              description="Oldest messages are dropped (and counted) beyond this.")


class AgentConfig(_Strict):
    """Everything `edgeopt-agent` needs; see `edgeopt agent init` for a commented example."""

    device_id: str = Field(title="Device id", description="This device's id: one MQTT topic level.")
    fleet: str = Field(title="Fleet", description="Fleet id: one MQTT topic level.")
    broker: BrokerConfig = Field(title="Broker", description="MQTT broker connection.")
    state_dir: Path = Field(title="State directory",
                            description="Installed packages, pointers, outbox and caches live here.")
    trusted_keys: list[Path] = Field(default_factory=list, title="Trusted keys",
                                     description="PEM Ed25519 public keys whose signatures are accepted.")
    allow_unsigned: bool = Field(False, title="Allow unsigned",
                                 description="Accept unsigned packages (development only).")
    telemetry_interval_s: float = Field(10.0, ge=0.1, le=3600, title="Telemetry interval",
                                        description="Seconds between telemetry messages.")
    api: ApiConfig = Field(default_factory=ApiConfig, title="Local API", description="Inference API.")
    batching: BatchingConfig = Field(default_factory=BatchingConfig, title="Batching", description="Batcher.")
    text_generation: TextGenerationConfig = Field(default_factory=TextGenerationConfig, title="Text generation",
                                                  description="Language-model serving.")
    download: DownloadConfig = Field(default_factory=DownloadConfig, title="Download", description="Downloads.")
    outbox: OutboxConfig = Field(default_factory=OutboxConfig, title="Outbox", description="Offline outbox.")
    control: ControlConfig = Field(default_factory=ControlConfig, title="Control",
                                   description="Verification of the dashboard's signed commands.")
    groups: list[str] = Field(default_factory=list, title="Groups",
                              description="Deployment groups this device belongs to (reported in status).")
    tags: list[str] = Field(default_factory=list, title="Tags", description="Free-form labels (reported in status).")

    @field_validator("device_id", "fleet")
    @classmethod
    def _topic_level(cls, v: str, info) -> str:
        try:
            return validate_id(v, info.field_name)
        except TopicError as exc:
            raise ValueError(exc.message) from None

    @model_validator(mode="after")
    def _keys_or_unsigned(self) -> "AgentConfig":
        if not self.trusted_keys and not self.allow_unsigned:
            raise ValueError("trusted_keys is empty: no package could be installed "
                             "(add a public key path, or set allow_unsigned = true for development)")
        return self


_PATH_KEYS = (("state_dir",), ("broker", "ca_file"), ("broker", "cert_file"), ("broker", "key_file"))


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Relative paths are relative to the config file, not to the daemon's working directory."""
    for path in _PATH_KEYS:
        node = data
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(path[-1]), str):
            node[path[-1]] = str(base / Path(node[path[-1]]).expanduser())
    for parent, name in ((data, "trusted_keys"), (data.get("control"), "trust_keys")):
        keys = parent.get(name) if isinstance(parent, dict) else None
        if isinstance(keys, list):
            parent[name] = [str(base / Path(k).expanduser()) if isinstance(k, str) else k for k in keys]


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate an agent config file. Raises :class:`ConfigError` naming file, key, value and fix."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: agent config file not found",
                          hint="create one with: edgeopt agent init ... > agent.toml") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read agent config: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    _resolve_paths(data, path.resolve().parent)
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from None
    for key in config.trusted_keys:
        if not key.is_file():
            raise ConfigError(f"{path}: trusted_keys: public key file {key} not found",
                              hint="copy the signer's .pub file there or fix the path")
    for key in config.control.trust_keys:
        if not key.is_file():
            raise ConfigError(f"{path}: control.trust_keys: public key file {key} not found",
                              hint="copy the dashboard's command key there (edgeopt-dashboard command-key)")
    for name in ("ca_file", "cert_file", "key_file"):
        value = getattr(config.broker, name)
        if value is not None and not value.is_file():
            raise ConfigError(f"{path}: broker.{name}: file {value} not found")
    return config


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(*, device_id: str, fleet: str, broker: str, state_dir: str | Path,
                  trusted_keys: list[str | Path] = (), api_host: str = "127.0.0.1",
                  api_port: int = DEFAULT_API_PORT, telemetry_interval_s: float = 10.0,
                  allow_unsigned: bool = False, groups: list[str] = (), tags: list[str] = (),
                  command_keys: list[str | Path] = (), package_urls: list[str] = (),
                  broker_ca: str | Path | None = None, broker_username: str | None = None,
                  broker_password: str | None = None) -> str:
    """A commented TOML config; validated before it is returned so `init` never writes a broken file."""
    keys = ", ".join(_toml_str(str(Path(k).expanduser().resolve())) for k in trusted_keys)
    cmd_keys = ", ".join(_toml_str(str(Path(k).expanduser().resolve())) for k in command_keys)
    urls = ", ".join(_toml_str(u) for u in package_urls)
    auth = "".join([f"ca_file = {_toml_str(str(Path(broker_ca).expanduser().resolve()))}\n" if broker_ca else "",
                    f"username = {_toml_str(broker_username)}\n" if broker_username is not None else "",
                    f"password = {_toml_str(broker_password)}\n" if broker_password is not None else ""])
    text = f"""\
# edgeopt agent configuration (validated at start; unknown keys are refused).
# Relative paths are resolved against this file's folder.

# This device's id and its fleet: each is one MQTT topic level (letters, digits, . _ : -).
device_id = {_toml_str(device_id)}
fleet = {_toml_str(fleet)}

# Installed packages, model pointers, the telemetry outbox and runtime caches live here.
state_dir = {_toml_str(str(Path(state_dir).expanduser().resolve()))}

# PEM Ed25519 public keys whose package signatures this agent accepts.
trusted_keys = [{keys}]
# Accept unsigned packages: development only.
allow_unsigned = {str(allow_unsigned).lower()}

# Seconds between telemetry messages.
telemetry_interval_s = {telemetry_interval_s}

# Deployment groups and free-form tags, reported in the retained status message.
groups = [{", ".join(_toml_str(g) for g in groups)}]
tags = [{", ".join(_toml_str(t) for t in tags)}]

[broker]
# mqtt://host:port, or mqtts://host:port with ca_file (and cert_file + key_file for client certificates).
url = {_toml_str(broker)}
keepalive_s = 30
{auth}# ca_file = "/etc/edgeopt/ca.pem"
# cert_file = "/etc/edgeopt/client.pem"
# key_file = "/etc/edgeopt/client.key"
# username = "cam-07"
# password = "..."

[api]
# The local inference API (KServe v2 / Open Inference Protocol). It has no authentication:
# keep it on loopback unless a firewall protects it.
host = {_toml_str(api_host)}
port = {int(api_port)}
# asyncio (the standard library's loop) or uvloop (pip install uvloop; measured no faster here).
event_loop = "asyncio"
# What one client can hold: open connections (at the cap the longest-idle one is closed; kept under the
# open-file limit), seconds to send a request head / between body bytes / idle between requests,
# and the largest request head and body (bodies after gzip/deflate decoding too).
max_connections = 512
header_timeout_s = 10
body_timeout_s = 30
idle_timeout_s = 60
max_header_bytes = 16384
max_body_bytes = 268435456

[batching]
# Group concurrent requests: up to max_batch (unset = the package profile's batch_size, which is 1 for
# the latency profiles), waiting at most max_delay_ms for a batch to fill; beyond max_queue waiting
# requests get 503. Models without a dynamic batch dimension are never batched.
enabled = true
max_batch = 8
max_delay_ms = 2.0
max_queue = 256
# Stateful models (packages with state pairs) keep one state per sequence (sequence_id): a sequence idle
# this long is ended; beyond max_sequences live ones the longest-idle is evicted.
sequence_idle_timeout_s = 60
max_sequences = 1024

[download]
# Largest package accepted from a deploy command, and the socket timeout.
max_bytes = {2 * GIB}
timeout_s = 60
# The only places deploy commands may download from: the dashboard's download URL (EDGEOPT_PUBLIC_URL
# + "/dl/"). Other hosts, ports, schemes and paths are refused before connecting; empty refuses all.
allowed_urls = [{urls}]

[control]
# Public keys of the dashboard's command-signing key (edgeopt-dashboard command-key). Commands not
# signed by one of them, for another device, expired or replayed are refused and reported as events.
# List two keys while rotating. Empty refuses every command.
trust_keys = [{cmd_keys}]
# How far this device's clock may differ from the dashboard's, and the longest validity accepted.
max_clock_skew_s = 300
max_command_lifetime_s = 86400

[outbox]
# Telemetry and events kept on disk while the broker is away; the oldest are dropped beyond this.
max_messages = 100000
"""
    try:
        AgentConfig.model_validate(tomllib.loads(text))
    except ValidationError as exc:
        raise ConfigError(format_validation_error("agent init", exc)) from None
    return text
