"""Open Inference Protocol (KServe v2) routes, independent of the HTTP transport.

:meth:`Api.handle` turns (method, path, headers, body) into a :class:`Response`, or for inference into a
:class:`Deferred`: the request is queued in the model's batcher and no thread waits for it.

Endpoints (``{v}`` parts optional)::

    GET  /v2/health/live | /v2/health/ready | /v2
    GET  /v2/models/{name}[/versions/{v}]            model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    GET  /v2/models/{name}[/versions/{v}]/config     Triton-style config (tritonclient's get_model_config)
    POST /v2/models/{name}[/versions/{v}]/infer      JSON tensors or the binary tensor data extension
    POST /v2/repository/index                        loaded models
    GET  /metrics                                    Prometheus text

Language-model packages add the KServe generate extension (``/v2/models/{name}/generate`` and
``generate_stream``) and OpenAI's ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``
(:mod:`edgeopt.agent.text_api`).
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..sdk.errors import EdgeoptError, InputError
from .batcher import BusyError, ClosedError
from .sequences import SequenceError, sequence_params
from .kserve import (HEADER_LENGTH, ApiError, check_requested_outputs, encode_infer_response, error_body,
                     parse_infer_request, tensor_metadata)
from .registry import ModelEntry, ModelRegistry

log = logging.getLogger(__name__)

try:
    from importlib.metadata import version as _dist_version

    AGENT_VERSION = _dist_version("edgeopt")
except Exception:  # not installed as a distribution (source checkout)
    AGENT_VERSION = "0.1.0"

_HEADER_LENGTH_LOWER = HEADER_LENGTH.lower()
_MODEL_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<rest>/[a-z_]+)?$")


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def _json(status: int, doc: Any) -> Response:
    return Response(status, json.dumps(doc, separators=(",", ":")).encode())


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(status, error_body(message), headers=headers or {})


class Api:
    """The protocol's routes over a :class:`ModelRegistry`. ``ready`` is the server-level readiness."""

    def __init__(self, registry: ModelRegistry):
        self.registry = registry
        self.metrics = registry.metrics
        self.ready = threading.Event()
        from .text_api import TextApi

        self.text = TextApi(registry, self.metrics)

    def handle(self, method: str, path: str, headers: Mapping[str, str],
               body: bytes | bytearray) -> "Response | Deferred":
        """Route one request; ``headers`` have lower-case names, ``body`` is already decoded (the transport
        undoes ``Content-Encoding``, bounded, see :mod:`edgeopt.agent.inflate`)."""
        path = path.split("?", 1)[0]
        try:
            if path.startswith("/v1/"):
                return self.text.handle(method, path, body)
            if path.startswith("/v2/models/"):
                m = _MODEL_PATH.match(path)
                if not m:
                    raise ApiError(404, f"unknown path {path}")
                return self._model_route(method, m["name"], m["version"], m["rest"] or "", headers, body)
            if method == "GET" and path == "/v2/health/live":
                return _json(200, {"live": True})
            if method == "GET" and path == "/v2/health/ready":
                ready = self.ready.is_set()
                return _json(200 if ready else 503, {"ready": ready})
            if method == "GET" and path in ("/v2", "/v2/"):
                return _json(200, {"name": "edgeopt-agent", "version": AGENT_VERSION,
                                   "extensions": ["binary_tensor_data", "model_repository", "generate"]})
            if method == "POST" and path == "/v2/repository/index":
                return _json(200, [{"name": e.name, "version": e.version, "state": "READY", "reason": ""}
                                   for e in self.registry.entries()])
            if method == "GET" and path == "/metrics":
                return Response(200, self.metrics.prometheus().encode(), "text/plain; version=0.0.4")
            raise ApiError(404, f"unknown path {method} {path}")
        except ApiError as exc:
            return error_response(exc.status, exc.message, exc.headers)

    def _entry(self, name: str, version: str | None) -> ModelEntry:
        entry = self.registry.get(name)
        if entry is None:
            known = ", ".join(sorted(e.name for e in self.registry.entries())) or "none"
            raise ApiError(404, f"unknown model {name!r} (served models: {known})")
        if version is not None and version != entry.version:
            raise ApiError(404, f"model {name!r} version {version!r} is not served (serving {entry.version})")
        return entry

    def _model_route(self, method: str, name: str, version: str | None, rest: str, headers: Mapping[str, str],
                     body: bytes | bytearray) -> "Response | Deferred":
        if method == "POST" and rest == "/infer":
            entry = self._entry(name, version)
            return self._infer(entry, name, version, headers, body)
        if method == "POST" and rest in ("/generate", "/generate_stream"):
            entry = self._entry(name, version)
            if getattr(entry.loaded, "task", None) != "text-generation":
                raise ApiError(400, f"model {name!r} does not generate text: use /v2/models/{name}/infer")
            return self.text.generate(entry, body, stream=rest == "/generate_stream")
        if method != "GET" or rest not in ("", "/ready", "/config"):
            raise ApiError(404 if rest not in ("", "/ready", "/config", "/infer", "/generate", "/generate_stream")
                           else 405,
                           f"{method} /v2/models/{name}{rest} is not supported")
        entry = self._entry(name, version)
        if rest == "":
            return _json(200, entry.metadata())
        if rest == "/ready":
            return _json(200, {"name": entry.name, "ready": True})
        config = {"name": entry.name, "platform": entry.platform,
                  "max_batch_size": entry.batcher.max_batch if entry.batcher.batchable else 0,
                  "input": [tensor_metadata(s) for s in entry.loaded.inputs],
                  "output": [tensor_metadata(s) for s in entry.loaded.outputs]}
        seqs = entry.sequences
        if seqs is not None:  # Triton's sequence batcher with implicit state
            config["sequence_batching"] = {
                "max_sequence_idle_microseconds": int(seqs.idle_timeout * 1e6),
                "max_candidate_sequences": seqs.max_sequences, "max_batch_size": seqs.max_batch,
                "state": [{"input_name": p.input, "output_name": p.output} for p in seqs.pairs]}
        return _json(200, config)

    def _infer(self, entry: ModelEntry, name: str, version: str | None, headers: Mapping[str, str],
               body: bytes | bytearray) -> "Response | Deferred":
        """Decode, check and queue one request; the answer comes from :meth:`Deferred.finish` once the
        batcher has run it (no thread waits for it)."""
        start = time.perf_counter()
        mm = entry.metrics or self.metrics.model(name)
        try:
            raw_len = headers.get(_HEADER_LENGTH_LOWER)
            try:
                header_len = int(raw_len) if raw_len is not None else None
            except ValueError:
                raise ApiError(400, f"{HEADER_LENGTH} is not a number: {raw_len!r}") from None
            # A swap may close the batcher between lookup and submit: take the new entry and decode again.
            for _ in range(3):
                if entry.sequences is not None:
                    request, pending = self._submit_stateful(entry, body, header_len)
                else:
                    request = parse_infer_request(body, header_len, entry.loaded.inputs)
                    check_requested_outputs(request, entry.loaded.outputs)
                    pending = None
                try:
                    if pending is None:
                        pending = entry.batcher.submit(request.inputs, request.batch_signature)
                    elif callable(pending):
                        pending = pending()
                    break
                except ClosedError:
                    entry = self._entry(name, version)
            else:
                raise ApiError(503, f"model {name!r} is being replaced; retry", {"Retry-After": "1"})
        except SequenceError as exc:
            mm.error()
            return error_response(400, str(exc))
        except BusyError as exc:
            mm.error(busy=True)
            return error_response(503, str(exc), {"Retry-After": str(exc.retry_after_s)})
        except ApiError as exc:
            mm.error()
            return error_response(exc.status, exc.message, exc.headers)
        return Deferred(pending, lambda: self._infer_done(entry, name, request, pending, mm, start))

    @staticmethod
    def _submit_stateful(entry: ModelEntry, body: bytes | bytearray, header_len: int | None):
        """A stateful model's request: with ``sequence_id`` it carries the inputs besides the state and goes
        to the sequence batcher (returned as a callable that submits, so a swap can retry it); without, it
        carries every input, state included, and runs as a plain request."""
        seqs = entry.sequences
        try:
            request = parse_infer_request(body, header_len, seqs.inputs)
        except ApiError as first:
            try:
                request = parse_infer_request(body, header_len, entry.loaded.inputs, same_batch=False)
            except ApiError:
                raise first from None
            if sequence_params(request.parameters) is not None:
                raise ApiError(400, f"model {entry.name!r}: a sequence request carries the inputs besides the "
                                    f"state ({', '.join(s.name for s in seqs.inputs)}); the agent keeps the state "
                                    f"({', '.join(p.input for p in seqs.pairs)})") from None
            check_requested_outputs(request, entry.loaded.outputs)
            return request, None
        # The sequence parameters and requested outputs are in the header: a client's steps of one kind share
        # one (the binary plan's memo), so they are checked once per header, not once per step.
        memo = request.memo
        params = memo.get("sequence") if memo is not None else None
        if params is None:
            params = sequence_params(request.parameters)
            if params is None:
                raise ApiError(400, f"model {entry.name!r} is stateful: send parameters sequence_id (and "
                                    f"sequence_start on a stream's first request), or every input including the "
                                    f"state ({', '.join(p.input for p in seqs.pairs)})")
            check_requested_outputs(request, seqs.outputs)
            if memo is not None:  # the plan is this batcher's (parsed against seqs.inputs): so is its memo
                memo["sequence"] = params
        seq_id, start, end = params
        return request, lambda: seqs.submit(request.inputs, seq_id, start, end, request.batch_signature)

    def _infer_done(self, entry: ModelEntry, name: str, request: Any, pending: Any, mm: Any,
                    start: float) -> Response:
        try:
            try:
                outputs = pending.result(0)
            except InputError as exc:
                raise ApiError(400, f"model {name!r} refused the request: {exc.one_line()}") from None
            except EdgeoptError as exc:
                raise ApiError(500, f"model {name!r} failed: {exc.one_line()}") from None
            except Exception as exc:  # a runtime bug: answer 500 naming it rather than dropping the request
                log.error("model %s failed: %s: %s", name, type(exc).__name__, exc)
                raise ApiError(500, f"model {name!r} failed: {type(exc).__name__}: {exc}") from None
            payload, json_len = encode_infer_response(entry.name, entry.version, request, outputs)
        except ApiError as exc:
            mm.error()
            return error_response(exc.status, exc.message, exc.headers)
        mm.observe((time.perf_counter() - start) * 1000.0, request.batch)
        if json_len is None:
            return Response(200, payload)
        return Response(200, payload, "application/octet-stream", {HEADER_LENGTH: str(json_len)})


class Deferred:
    """An accepted inference: ``pending`` completes in the batcher's thread, then ``finish()`` builds the
    response (call it from the transport's own thread)."""

    __slots__ = ("pending", "finish", "cancel")

    def __init__(self, pending: Any, finish: Callable[[], Response], cancel: Callable[[], None] | None = None):
        self.pending = pending
        self.finish = finish
        self.cancel = cancel  # called if the client goes away first (a generation stops; an inference cannot)
