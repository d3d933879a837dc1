"""The local inference API: Open Inference Protocol (KServe v2) over HTTP/1.1, standard library only.

Endpoints (``{v}`` parts optional)::

    GET  /v2/health/live | /v2/health/ready | /v2
    GET  /v2/models/{name}[/versions/{v}]            model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    GET  /v2/models/{name}[/versions/{v}]/config     Triton-style config (tritonclient's get_model_config)
    POST /v2/models/{name}[/versions/{v}]/infer      JSON tensors or the binary tensor data extension
    POST /v2/repository/index                        loaded models
    GET  /metrics                                    Prometheus text

``ThreadingHTTPServer`` gives one thread per keep-alive connection; each model's :class:`Batcher` owns
the runtime, so the number of connections never multiplies runtime memory. Measured overhead at
batch 1 is in BENCHMARKS.md (target: direct runtime call + 1 ms).
"""
from __future__ import annotations

import logging
import re
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..sdk.errors import EdgeoptError, InputError
from .batcher import Batcher, BusyError, ClosedError, has_batch_dim
from .kserve import (HEADER_LENGTH, ApiError, check_requested_outputs, encode_infer_response, error_body,
                     parse_infer_request, tensor_metadata)
from .metrics import Metrics
from .runtimes.base import LoadedModel

log = logging.getLogger(__name__)

try:
    from importlib.metadata import version as _dist_version

    AGENT_VERSION = _dist_version("edgeopt")
except Exception:  # not installed as a distribution (source checkout)
    AGENT_VERSION = "0.1.0"

MAX_BODY_BYTES = 256 * 1024 * 1024
_MODEL_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<rest>/[a-z]+)?$")


@dataclass
class BatchLimits:
    """The batcher settings every model starts with (from the config's [batching], changed by set-config)."""

    enabled: bool = True
    max_batch: int | None = None
    max_delay_ms: float = 2.0
    max_queue: int = 256

    @classmethod
    def from_config(cls, batching: Any) -> "BatchLimits":
        return cls(enabled=batching.enabled, max_batch=batching.max_batch, max_delay_ms=batching.max_delay_ms,
                   max_queue=batching.max_queue)


class ModelEntry:
    """One served model version: its loaded runtime, its batcher and what the package says about it."""

    def __init__(self, name: str, version: str, loaded: LoadedModel, batcher: Batcher,
                 manifest: Any = None):
        self.name = name
        self.version = version
        self.loaded = loaded
        self.batcher = batcher
        self.manifest = manifest
        self.platform = getattr(manifest, "runtime", None) or loaded.describe().get("runtime", "unknown")

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "versions": [self.version], "platform": self.platform,
                "inputs": [tensor_metadata(s) for s in self.loaded.inputs],
                "outputs": [tensor_metadata(s) for s in self.loaded.outputs]}

    def retire(self) -> None:
        """Finish every accepted request on this version, then free the runtime."""
        if not self.batcher.close(timeout=120):
            log.warning("model %s %s: requests still running after 120 s; freeing anyway", self.name, self.version)
        try:
            self.loaded.close()
        except Exception:  # the runtime is going away either way
            log.exception("model %s %s: close failed", self.name, self.version)


class ModelRegistry:
    """Name -> serving :class:`ModelEntry`. :meth:`swap` is the hot swap the installer triggers."""

    def __init__(self, metrics: Metrics | None = None, limits: BatchLimits | None = None):
        self.metrics = metrics or Metrics()
        self.limits = limits or BatchLimits()
        self._entries: dict[str, ModelEntry] = {}
        self._lock = threading.Lock()

    def max_batch_for(self, loaded: LoadedModel, manifest: Any) -> int:
        if not self.limits.enabled or not has_batch_dim(loaded):
            return 1
        if self.limits.max_batch is not None:
            return self.limits.max_batch
        profile = getattr(manifest, "profile", None) or {}
        return int(profile.get("batch_size", 1) or 1)

    def swap(self, name: str, version: str, loaded: LoadedModel, manifest: Any = None) -> ModelEntry:
        """Serve ``loaded`` for ``name`` from now on; the previous version drains in the background."""
        mm = self.metrics.model(name)
        batcher = Batcher(loaded, name, max_batch=self.max_batch_for(loaded, manifest),
                          max_delay_ms=self.limits.max_delay_ms, max_queue=self.limits.max_queue, metrics=mm)
        entry = ModelEntry(name, version, loaded, batcher, manifest)
        with self._lock:
            old = self._entries.get(name)
            self._entries[name] = entry
        mm.version = version
        mm.queue_depth = lambda: batcher.queue_depth
        log.info("serving %s %s (max batch %d%s)", name, version, batcher.max_batch,
                 "" if batcher.batchable else ", no dynamic batch dimension")
        if old is not None and old is not entry:
            threading.Thread(target=old.retire, name=f"retire-{name}-{old.version}", daemon=True).start()
        return entry

    def get(self, name: str) -> ModelEntry | None:
        return self._entries.get(name)

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._entries.values())

    def reconfigure(self, **limits: Any) -> None:
        """Apply new batching limits to the defaults and to every serving model."""
        for key, value in limits.items():
            setattr(self.limits, key, value)
        for entry in self.entries():
            entry.batcher.reconfigure(max_batch=self.max_batch_for(entry.loaded, entry.manifest),
                                      max_delay_ms=self.limits.max_delay_ms, max_queue=self.limits.max_queue)

    def close(self) -> None:
        with self._lock:
            entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            entry.retire()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"edgeopt-agent/{AGENT_VERSION}"
    server: "_HTTPServer"

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in one write; without NODELAY small responses can stall on delayed ACKs.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.debug("%s " + format, self.address_string(), *args)

    # ------------------------------------------------------------------ responses
    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        head = [f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}",
                f"Server: {self.server_version}", f"Content-Type: {content_type}",
                f"Content-Length: {len(body)}"]
        for k, v in (headers or {}).items():
            head.append(f"{k}: {v}")
        if self.close_connection:
            head.append("Connection: close")
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        self.log_request(status, len(body))

    def _json(self, status: int, doc: Any) -> None:
        import json

        self._send(status, json.dumps(doc, separators=(",", ":")).encode())

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, error_body(message), headers=headers)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise ApiError(411, "chunked request bodies are not supported: send Content-Length")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise ApiError(400, "Content-Length is not a number") from None
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(413, f"request body of {length} bytes is over the {MAX_BODY_BYTES}-byte limit")
        body = self.rfile.read(length) if length else b""
        encoding = self.headers.get("Content-Encoding", "").lower()
        if encoding in ("gzip", "deflate"):
            try:
                body = zlib.decompress(body, 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
            except zlib.error as exc:
                raise ApiError(400, f"request body is not valid {encoding}: {exc}") from None
        elif encoding not in ("", "identity"):
            raise ApiError(400, f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
        return body

    # ------------------------------------------------------------------ routing
    def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path.startswith("/v2/models/"):
                m = _MODEL_PATH.match(path)
                if not m:
                    raise ApiError(404, f"unknown path {path}")
                self._model_route(method, m["name"], m["version"], m["rest"] or "")
            elif method == "GET" and path == "/v2/health/live":
                self._json(200, {"live": True})
            elif method == "GET" and path == "/v2/health/ready":
                ready = self.server.ready.is_set()
                self._json(200 if ready else 503, {"ready": ready})
            elif method == "GET" and path in ("/v2", "/v2/"):
                self._json(200, {"name": "edgeopt-agent", "version": AGENT_VERSION,
                                 "extensions": ["binary_tensor_data", "model_repository"]})
            elif method == "POST" and path == "/v2/repository/index":
                self._read_body()
                self._json(200, [{"name": e.name, "version": e.version, "state": "READY", "reason": ""}
                                 for e in self.server.registry.entries()])
            elif method == "GET" and path == "/metrics":
                self._send(200, self.server.metrics.prometheus().encode(), "text/plain; version=0.0.4")
            else:
                raise ApiError(404, f"unknown path {method} {path}")
        except ApiError as exc:
            self._error(exc.status, exc.message, exc.headers)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as exc:  # a bug must answer 500, not drop the connection silently
            log.exception("unexpected error on %s %s", method, path)
            self._error(500, f"internal error: {type(exc).__name__}: {exc}")

    def _entry(self, name: str, version: str | None) -> ModelEntry:
        entry = self.server.registry.get(name)
        if entry is None:
            known = ", ".join(sorted(e.name for e in self.server.registry.entries())) or "none"
            raise ApiError(404, f"unknown model {name!r} (served models: {known})")
        if version is not None and version != entry.version:
            raise ApiError(404, f"model {name!r} version {version!r} is not served (serving {entry.version})")
        return entry

    def _model_route(self, method: str, name: str, version: str | None, rest: str) -> None:
        if method == "POST" and rest == "/infer":
            self._infer(name, version)
            return
        if method != "GET" or rest not in ("", "/ready", "/config"):
            raise ApiError(404 if rest not in ("", "/ready", "/config", "/infer") else 405,
                           f"{method} /v2/models/{name}{rest} is not supported")
        entry = self._entry(name, version)
        if rest == "":
            self._json(200, entry.metadata())
        elif rest == "/ready":
            self._json(200, {"name": entry.name, "ready": True})
        else:
            self._json(200, {"name": entry.name, "platform": entry.platform,
                             "max_batch_size": entry.batcher.max_batch if entry.batcher.batchable else 0,
                             "input": [tensor_metadata(s) for s in entry.loaded.inputs],
                             "output": [tensor_metadata(s) for s in entry.loaded.outputs]})

    def _infer(self, name: str, version: str | None) -> None:
        entry = self._entry(name, version)
        start = time.perf_counter()
        mm = self.server.metrics.model(name)
        entry.batcher.arriving(1)
        arriving = entry.batcher
        try:
            body = self._read_body()
            raw_len = self.headers.get(HEADER_LENGTH)
            try:
                header_len = int(raw_len) if raw_len is not None else None
            except ValueError:
                raise ApiError(400, f"{HEADER_LENGTH} is not a number: {raw_len!r}") from None
            # A swap may close the batcher between lookup and submit: take the new entry and decode again.
            for _ in range(3):
                request = parse_infer_request(body, header_len, entry.loaded.inputs)
                check_requested_outputs(request, entry.loaded.outputs)
                try:
                    pending = entry.batcher.submit(request.inputs)
                    break
                except ClosedError:
                    entry = self._entry(name, version)
            else:
                raise ApiError(503, f"model {name!r} is being replaced; retry", {"Retry-After": "1"})
            arriving.arriving(-1)
            arriving = None
            try:
                outputs = pending.result()
            except InputError as exc:
                raise ApiError(400, f"model {name!r} refused the request: {exc.one_line()}") from None
            except EdgeoptError as exc:
                raise ApiError(500, f"model {name!r} failed: {exc.one_line()}") from None
            payload, json_len = encode_infer_response(entry.name, entry.version, request, outputs)
        except BusyError as exc:
            mm.error(busy=True)
            self._error(503, str(exc), {"Retry-After": str(exc.retry_after_s)})
            return
        except ApiError:
            mm.error()
            raise
        finally:
            if arriving is not None:
                arriving.arriving(-1)
        mm.observe((time.perf_counter() - start) * 1000.0, request.batch)
        self._send(200, payload, "application/octet-stream" if json_len is not None else "application/json",
                   {HEADER_LENGTH: str(json_len)} if json_len is not None else None)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Many short keep-alive clients connect at once under load; the default backlog of 5 refuses some.
    request_queue_size = 128

    def __init__(self, address, registry: ModelRegistry, metrics: Metrics):
        self.registry = registry
        self.metrics = metrics
        self.ready = threading.Event()
        super().__init__(address, _Handler)


class InferenceServer:
    """The HTTP server in a background thread. Raises :class:`UnavailableError`-style OSError on bind."""

    def __init__(self, registry: ModelRegistry, host: str = "127.0.0.1", port: int = 8470):
        self.registry = registry
        self._httpd = _HTTPServer((host, port), registry, registry.metrics)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self, ready: bool = True) -> "InferenceServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="inference-api", daemon=True)
        self._thread.start()
        if ready:
            self._httpd.ready.set()
        return self

    def set_ready(self, ready: bool) -> None:
        (self._httpd.ready.set if ready else self._httpd.ready.clear)()

    def stop(self) -> None:
        self._httpd.ready.clear()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
