"""Text-generation routes of the local API, for language-model packages (issue 14).

OpenAI-compatible (the ``openai`` client library and anything built on it work unchanged)::

    GET  /v1/models
    POST /v1/chat/completions      {"model", "messages", "stream", "max_tokens" | "max_completion_tokens",
                                    "stop", "temperature", "top_p", "seed", "stream_options": {"include_usage"}}
    POST /v1/completions           {"model", "prompt", ...the same options}

and the KServe v2 generate extension (Triton's)::

    POST /v2/models/{name}[/versions/{v}]/generate          {"text_input", "parameters": {...}}
    POST /v2/models/{name}[/versions/{v}]/generate_stream   server-sent events, one per text delta

A streamed answer is a :class:`Stream` (server-sent events over chunked transfer encoding); a whole answer is a
:class:`~edgeopt.agent.api.Deferred` on the :class:`~edgeopt.agent.textgen.Generation`. Either way no thread
waits: the engine thread produces, the event loop writes. A client that goes away cancels its generation
(the transport calls :meth:`Stream.cancel`), which frees its KV cache at the engine's next step.
"""
from __future__ import annotations

import json
import secrets
import time
from typing import Any, Callable, Mapping

from ..sdk.errors import InputError
from .batcher import BusyError, ClosedError
from .kserve import ApiError, loads_bounded

MAX_STOP = 8  # stop sequences per request (OpenAI's limit is 4)
MAX_STOP_CHARS = 256
_SSE_DONE = b"data: [DONE]\n\n"


def _sse(doc: Any) -> bytes:
    return b"data: " + json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class Stream:
    """A streamed answer: the transport writes the head, then calls :meth:`pull` whenever the generation has
    news (``subscribe``), writing what it returns, until ``pull`` says the stream ended."""

    content_type = "text/event-stream"

    def __init__(self, gen: Any, render: Callable[[str, bool], bytes], on_end: Callable[[], None],
                 status: int = 200, headers: dict[str, str] | None = None, first: bytes = b""):
        self.gen = gen
        self.status = status
        self.headers = {"Cache-Control": "no-cache", **(headers or {})}
        self._render = render
        self._on_end = on_end
        self._first = first
        self.ended = False

    def subscribe(self, notify: Callable[[], None]) -> None:
        self.gen.subscribe(notify)

    def pull(self) -> tuple[bytes, bool]:
        """The bytes to write now, and whether the stream ended with them."""
        out = [self._first] if self._first else []
        self._first = b""
        done = False
        for delta, finished in self.gen.drain():
            if delta or finished:
                out.append(self._render(delta, finished))
            done = done or finished
        if done and not self.ended:
            self.ended = True
            self._on_end()
        return b"".join(out), done

    def cancel(self) -> None:
        self.gen.cancel()


def _error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
    from .api import Response

    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
    return Response(status, body, headers=headers or {})


def _opt_int(doc: Mapping, key: str, lo: int, hi: int) -> int | None:
    v = doc.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise InputError(f"'{key}' must be an integer in [{lo}, {hi}]")
    return v


def _opt_float(doc: Mapping, key: str, lo: float, hi: float) -> float | None:
    v = doc.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= float(v) <= hi:
        raise InputError(f"'{key}' must be a number in [{lo:g}, {hi:g}]")
    return float(v)


def _options(doc: Mapping) -> tuple[int | None, list[str], dict[str, Any]]:
    """max_tokens, stop sequences and sampling options of an OpenAI-style request (or KServe parameters)."""
    max_tokens = _opt_int(doc, "max_completion_tokens", 1, 1 << 20)
    if max_tokens is None:
        max_tokens = _opt_int(doc, "max_tokens", 1, 1 << 20)
    stop = doc.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise InputError(f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings of at most "
                         f"{MAX_STOP_CHARS} characters")
    n = doc.get("n", 1)
    if n != 1:
        raise InputError("'n' must be 1: one choice per request")
    sampling = {"temperature": _opt_float(doc, "temperature", 0.0, 2.0), "top_p": _opt_float(doc, "top_p", 0.0, 1.0),
                "seed": _opt_int(doc, "seed", -(1 << 63), (1 << 63) - 1)}
    ignore_eos = doc.get("ignore_eos", False)  # vLLM's extension: generate max_tokens whatever the model says
    if not isinstance(ignore_eos, bool):
        raise InputError("'ignore_eos' must be true or false")
    sampling["ignore_eos"] = ignore_eos
    return max_tokens, stop, sampling


class TextApi:
    """The routes above, over the registry's text-generation models."""

    def __init__(self, registry: Any, metrics: Any):
        self.registry = registry
        self.metrics = metrics

    def text_entries(self) -> list[Any]:
        return [e for e in self.registry.entries() if getattr(e.loaded, "task", None) == "text-generation"]

    def _model(self, name: Any) -> Any:
        entries = self.text_entries()
        if name is None and len(entries) == 1:
            return entries[0]
        for e in entries:
            if e.name == name:
                return e
        known = ", ".join(sorted(e.name for e in entries)) or "none"
        raise ApiError(404, f"model {name!r} is not a text-generation model served here (text models: {known})")

    def handle(self, method: str, path: str, body: bytes | bytearray):
        """An OpenAI route (``/v1/...``)."""
        try:
            if method == "GET" and path == "/v1/models":
                from .api import _json

                return _json(200, {"object": "list", "data": [
                    {"id": e.name, "object": "model", "created": 0, "owned_by": "edgeopt",
                     "version": e.version} for e in self.text_entries()]})
            if method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
                return self._openai(path.endswith("chat/completions"), body)
            raise ApiError(404 if path not in ("/v1/chat/completions", "/v1/completions", "/v1/models") else 405,
                           f"{method} {path} is not supported")
        except ApiError as exc:
            kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
            return _error(exc.status, exc.message, kind, exc.headers)

    def _doc(self, body: bytes | bytearray) -> dict:
        if not body:
            raise ApiError(400, "the request needs a JSON body")
        doc = loads_bounded(bytes(body))
        if not isinstance(doc, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return doc

    def _openai(self, chat: bool, body: bytes | bytearray):
        from .api import Deferred, Response

        doc = self._doc(body)
        entry = self._model(doc.get("model"))
        model, mm = entry.loaded, entry.metrics
        stream = doc.get("stream", False)
        if not isinstance(stream, bool):
            return _error(400, "'stream' must be true or false")
        try:
            max_tokens, stop, sampling = _options(doc)
            ids = model.chat_ids(doc.get("messages")) if chat else model.prompt_ids(doc.get("prompt"))
            gen = model.start(ids, max_tokens, stop, sampling)
        except InputError as exc:
            mm.error()
            return _error(400, exc.one_line())
        except BusyError as exc:
            mm.error(busy=True)
            return _error(503, str(exc), "server_busy", {"Retry-After": str(exc.retry_after_s)})
        except ClosedError:
            mm.error()
            return _error(503, f"model {entry.name!r} is being replaced; retry", "server_busy", {"Retry-After": "1"})
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        name = entry.name
        usage_of = lambda: {"prompt_tokens": len(ids), "completion_tokens": len(gen.ids),  # noqa: E731
                            "total_tokens": len(ids) + len(gen.ids)}
        done = _recorder(gen, mm)
        if not stream:
            def finish() -> Response:
                done()
                if gen.finish_reason == "error":
                    return _error(500, f"model {name!r} failed: {gen.error}", "server_error")
                choice = ({"index": 0, "message": {"role": "assistant", "content": gen.text}} if chat
                          else {"index": 0, "text": gen.text})
                choice.update(finish_reason=gen.finish_reason, logprobs=None)
                from .api import _json

                return _json(200, {"id": rid, "object": "chat.completion" if chat else "text_completion",
                                   "created": created, "model": name, "choices": [choice], "usage": usage_of()})
            return Deferred(gen, finish, cancel=gen.cancel)
        obj = "chat.completion.chunk" if chat else "text_completion"
        opts = doc.get("stream_options") or {}
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True

        def chunk(delta: Any, reason: str | None) -> dict:
            c = {"index": 0, "delta": delta} if chat else {"index": 0, "text": delta}
            c.update(finish_reason=reason, logprobs=None)
            return {"id": rid, "object": obj, "created": created, "model": name, "choices": [c]}

        def render(delta: str, finished: bool) -> bytes:
            if not finished:
                return _sse(chunk({"content": delta} if chat else delta, None))
            if gen.finish_reason == "error":
                return _sse({"error": {"message": f"model {name!r} failed: {gen.error}", "type": "server_error",
                                       "param": None, "code": None}}) + _SSE_DONE
            tail = _sse(chunk({} if chat else "", gen.finish_reason))
            if include_usage:
                tail += _sse({"id": rid, "object": obj, "created": created, "model": name, "choices": [],
                              "usage": usage_of()})
            return tail + _SSE_DONE

        first = _sse(chunk({"role": "assistant", "content": ""}, None)) if chat else b""
        return Stream(gen, render, done, first=first)

    def generate(self, entry: Any, body: bytes | bytearray, stream: bool):
        """KServe v2 generate / generate_stream for one model."""
        from .api import Deferred, Response, _json, error_response

        model, mm = entry.loaded, entry.metrics
        try:
            doc = self._doc(body)
            text = doc.get("text_input")
            if not isinstance(text, str):
                raise InputError("'text_input' must be a string")
            params = doc.get("parameters") or {}
            if not isinstance(params, dict):
                raise InputError("'parameters' must be an object")
            max_tokens, stop, sampling = _options(params)
            gen = model.start(model.prompt_ids(text), max_tokens, stop, sampling)
        except InputError as exc:
            mm.error()
            return error_response(400, exc.one_line())
        except BusyError as exc:
            mm.error(busy=True)
            return error_response(503, str(exc), {"Retry-After": str(exc.retry_after_s)})
        except ClosedError:
            mm.error()
            return error_response(503, f"model {entry.name!r} is being replaced; retry", {"Retry-After": "1"})
        head = {"model_name": entry.name, "model_version": entry.version}
        if isinstance(doc.get("id"), str):
            head["id"] = doc["id"][:256]
        done = _recorder(gen, mm)
        if not stream:
            def finish() -> Response:
                done()
                if gen.finish_reason == "error":
                    return error_response(500, f"model {entry.name!r} failed: {gen.error}")
                return _json(200, {**head, "text_output": gen.text, "finish_reason": gen.finish_reason})
            return Deferred(gen, finish, cancel=gen.cancel)

        def render(delta: str, finished: bool) -> bytes:
            if finished and gen.finish_reason == "error":
                return _sse({"error": f"model {entry.name!r} failed: {gen.error}"})
            doc = {**head, "text_output": delta}
            if finished:
                doc["finish_reason"] = gen.finish_reason
            return _sse(doc)

        return Stream(gen, render, done)


def _recorder(gen: Any, mm: Any) -> Callable[[], None]:
    """Counts the request once when it ends: whole-request latency into the model's latency histogram (what
    the dashboard's request charts read), or an error."""
    state = {"done": False}

    def done() -> None:
        if state["done"]:
            return
        state["done"] = True
        if gen.finish_reason == "error":
            mm.error()
        elif gen.finish_reason != "cancelled":
            mm.observe((time.perf_counter() - gen.t_submit) * 1e3, 1)
    return done
