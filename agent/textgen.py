"""Continuous batching for language-model packages: one engine thread per model steps the runtime's
continuous-batching pipeline (OpenVINO GenAI's, paged KV cache) for every request in flight at once.

A request (:class:`Generation`) is admitted by :meth:`TextEngine.submit` (bounded: past ``max_queue`` it is
refused as busy, never queued without limit), added to the pipeline on the engine thread, and stepped with
all the others: a step decodes one token for every running request (and prefills new ones), so eight streams
cost far less than eight times one. Tokens are turned into text incrementally, stop sequences are held back
until they can no longer match (a client never sees half of a stop string), and a cancelled request (the
client went away, or asked to stop) is dropped from the pipeline at the next step, freeing its KV blocks.

The engine thread never dies of one bad step: a pipeline error fails the requests in flight (each gets the
error), is counted, and the loop goes on; :attr:`TextEngine.healthy` says whether the last steps worked.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

from .batcher import BusyError, ClosedError

log = logging.getLogger(__name__)

# Finish reasons, as OpenAI's API names them.
STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"


def _hold_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string (not to be sent yet)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class Generation:
    """One request's life in the engine. The engine thread appends events; the transport drains them.

    Events are ``(delta_text, finished)``; the last one has ``finished`` True and :attr:`finish_reason` set.
    ``subscribe(fn)`` asks for ``fn()`` to be called (on the engine thread) whenever events are waiting, and
    ``on_done(fn)`` for the end (what the server's deferred answers use)."""

    def __init__(self, prompt_ids: list[int], max_tokens: int, stop: list[str] | None = None,
                 sampling: dict[str, Any] | None = None):
        self.prompt_ids = list(prompt_ids)
        self.max_tokens = int(max_tokens)
        self.stop = [s for s in (stop or []) if s]
        self.sampling = dict(sampling or {})
        self.ids: list[int] = []
        self.text = ""  # decoded text so far (stop string cut once found)
        self.sent = 0  # characters of text handed out as deltas
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.cancelled = False
        self.request_id = -1
        self._events: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._notify: Callable[[], None] | None = None
        self._done_cbs: list[Callable[[], None]] = []
        self._done = threading.Event()

    # ---------------------------------------------------------------- consumer side (any thread)
    def subscribe(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._notify = fn
            pending = bool(self._events)
        if pending:
            fn()

    def drain(self) -> list[tuple[str, bool]]:
        with self._lock:
            out = list(self._events)
            self._events.clear()
        return out

    def on_done(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if not self._done.is_set():
                self._done_cbs.append(fn)
                return
        fn()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def cancel(self) -> None:
        """Stop generating (the client went away): the engine drops it at its next step."""
        self.cancelled = True

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    # ---------------------------------------------------------------- engine side
    def _push(self, delta: str, finished: bool) -> None:
        with self._lock:
            self._events.append((delta, finished))
            notify = self._notify
            cbs = []
            if finished:
                self._done.set()
                cbs, self._done_cbs = self._done_cbs, []
        if notify is not None:
            notify()
        for cb in cbs:
            try:
                cb()
            except Exception:  # one consumer's bug must not end the engine thread
                log.exception("a generation's done callback failed")

    def _advance(self, text: str, final: bool) -> None:
        """New decoded text: cut at a stop string, hand out what can no longer become one."""
        if self.stop:
            start = max(0, self.sent - max(len(s) for s in self.stop))
            cut = min((i for i in (text.find(s, start) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, final = text[:cut], True
                self.finish_reason = STOP
        self.text = text
        if text.endswith("\ufffd") and not final:  # half of a multi-byte character: wait for the rest
            return
        end = len(text) if final else len(text) - _hold_back(text, self.stop)
        if end > self.sent:
            delta, self.sent = text[self.sent:end], end
            self._push(delta, False)

    def _end(self, reason: str, error: str | None = None) -> None:
        if self.finish_reason is None or reason in (ERROR, CANCELLED):
            self.finish_reason = reason
        self.error = error
        if reason not in (ERROR, CANCELLED) and len(self.text) > self.sent:
            delta, self.sent = self.text[self.sent:], len(self.text)
            self._push(delta, False)
        self._push("", True)


class TextEngine:
    """The engine thread over one continuous-batching pipeline (see the module docstring).

    ``pipe`` has ``add_request(id, ids, config)`` (returns a handle with ``can_read``/``read``/``get_status``/
    ``cancel``), ``step()``, ``has_non_finished_requests()`` and ``get_metrics()``; ``make_config(gen)``
    builds the runtime's generation config for a request; ``decode(ids)`` turns token ids into text."""

    def __init__(self, pipe: Any, make_config: Callable[[Generation], Any], decode: Callable[[list[int]], str],
                 name: str, *, max_running: int = 8, max_queue: int = 64, metrics: Any = None,
                 make_prompt: Callable[[list[int]], Any] = lambda ids: ids,
                 decode_many: Callable[[list[list[int]]], list[str]] | None = None):
        self.pipe = pipe
        self.make_config = make_config
        self.make_prompt = make_prompt
        self.decode = decode
        # Every request with new tokens decoded in one call per step: the detokenizer is a model run whose cost
        # is per call (0.12 ms for one sequence, 0.11-0.14 ms for eight at once, OpenVINO's on this host).
        self.decode_many = decode_many or (lambda seqs: [decode(ids) for ids in seqs])
        self.name = name
        self.max_running = max_running
        self.max_queue = max_queue
        self.metrics = metrics
        self._inbox: collections.deque[Generation] = collections.deque()
        self._active: dict[int, tuple[Generation, Any]] = {}
        self._cond = threading.Condition()
        self._next_id = 0
        self._closed = False
        self.failures = 0  # pipeline steps that raised
        self.healthy = True
        self.steps = 0
        self.kv_usage = 0.0
        self.running = self.waiting = 0
        self._thread = threading.Thread(target=self._run, name=f"textgen-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the batcher's interface (registry)
    batchable = False

    @property
    def max_batch(self) -> int:
        return self.max_running

    @property
    def queue_depth(self) -> int:
        return len(self._inbox) + self.waiting

    def reconfigure(self, **_: Any) -> None:
        """[batching] changes do not apply: the text engine's limits are [text_generation]'s."""

    def submit(self, *_: Any, **__: Any):
        from .kserve import ApiError

        raise ApiError(400, f"model {self.name!r} generates text: use POST /v1/chat/completions, /v1/completions "
                            f"or /v2/models/{self.name}/generate")

    # ------------------------------------------------------------------ requests
    @property
    def in_flight(self) -> int:
        return len(self._inbox) + len(self._active)

    def admit(self, gen: Generation) -> Generation:
        """Queue ``gen``; BusyError past ``max_queue`` requests in flight, ClosedError once closing."""
        with self._cond:
            if self._closed:
                raise ClosedError(f"model {self.name!r} is closing")
            if self.in_flight >= self.max_queue:
                raise BusyError(f"model {self.name!r} is busy: {self.in_flight} requests in flight "
                                f"(max_queue {self.max_queue}); retry later", retry_after_s=1)
            self._inbox.append(gen)
            self._cond.notify()
        if self.metrics is not None:
            self.metrics.admitted(len(gen.prompt_ids))
        return gen

    def close(self, timeout: float = 120.0) -> bool:
        """Finish what is in flight (new requests are refused), then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self._active and not self._closed:
                    self._cond.wait(1.0)
                if self._closed and not self._inbox and not self._active:
                    return
                new = list(self._inbox)
                self._inbox.clear()
            try:
                self._once(new)
                self.healthy = True
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one step
                self.failures += 1
                self.healthy = False
                message = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                log.error("text engine %s: a step failed, failing %d requests: %s", self.name,
                          len(self._active) + len(new), message)
                for gen, handle in list(self._active.values()):
                    self._drop(handle)
                    self._finish(gen, ERROR, message)
                self._active.clear()
                for gen in new:
                    if not gen.finished:
                        self._finish(gen, ERROR, message)
                time.sleep(0.05)  # a pipeline that fails at once must not spin the CPU

    def _once(self, new: list[Generation]) -> None:
        for gen in new:
            if gen.cancelled:
                self._finish(gen, CANCELLED)
                continue
            gen.request_id = self._next_id
            self._next_id += 1
            handle = self.pipe.add_request(gen.request_id, self.make_prompt(gen.prompt_ids), self.make_config(gen))
            self._active[gen.request_id] = (gen, handle)
        for rid, (gen, handle) in list(self._active.items()):
            if gen.cancelled:
                self._drop(handle)
                del self._active[rid]
                self._finish(gen, CANCELLED)
        if self.pipe.has_non_finished_requests():
            self.pipe.step()
            self.steps += 1
        now = time.perf_counter()
        reasons: dict[int, str] = {}
        fresh: list[Generation] = []
        for rid, (gen, handle) in self._active.items():
            got: list[int] = []
            if handle.can_read():
                for out in handle.read().values():
                    got.extend(int(t) for t in out.generated_ids)
                    fr = str(getattr(out, "finish_reason", "")).rsplit(".", 1)[-1].upper()
                    if fr in ("STOP", "LENGTH"):
                        reasons[rid] = STOP if fr == "STOP" else LENGTH
            if got:
                if gen.t_first is None:
                    gen.t_first = now
                    if self.metrics is not None:
                        self.metrics.first_token((now - gen.t_submit) * 1e3)
                gen.t_last = now
                gen.ids.extend(got)
                if self.metrics is not None:
                    self.metrics.tokens(len(got))
                fresh.append(gen)
        if fresh:
            for gen, text in zip(fresh, self.decode_many([g.ids for g in fresh])):
                gen._advance(text, final=False)
        for rid, (gen, handle) in list(self._active.items()):
            reason = reasons.get(rid)
            status = str(handle.get_status()).rsplit(".", 1)[-1].upper()
            done = status not in ("RUNNING", "WAITING")
            if done and handle.can_read():  # tokens written between the read above and the end
                late = [int(t) for out in handle.read().values() for t in out.generated_ids]
                gen.ids.extend(late)
                if late and self.metrics is not None:
                    self.metrics.tokens(len(late))
            if gen.finish_reason == STOP and not done:  # our stop string matched: drop it from the pipeline
                self._drop(handle)
                done = True
            if done or len(gen.ids) >= gen.max_tokens:
                del self._active[rid]
                if reason is None:
                    reason = LENGTH if len(gen.ids) >= gen.max_tokens else STOP
                if status in ("IGNORED", "DROPPED_BY_PIPELINE"):
                    self._finish(gen, ERROR, getattr(handle, "error", None)
                                 or f"the runtime dropped the request ({status.lower()}): out of KV cache?")
                else:
                    if gen.finish_reason != STOP:  # flush what was held back for a stop string
                        gen._advance(self.decode(gen.ids), final=True)
                    self._finish(gen, gen.finish_reason or reason)
        self._gauges()

    def _gauges(self) -> None:
        if not self._active:  # the pipeline's figures are of its last step: nothing runs or waits now
            self.running = self.waiting = 0
        try:
            m = self.pipe.get_metrics()
            self.kv_usage = min(1.0, max(0.0, float(m.cache_usage) / 100.0))  # GenAI reports a percentage
            if self._active:
                self.running = int(m.scheduled_requests)
                self.waiting = max(0, int(m.requests) - self.running)
        except Exception:  # metrics are a nicety: never fail a step for them
            log.debug("text engine %s: get_metrics failed", self.name, exc_info=True)
        if self.metrics is not None:
            self.metrics.kv(self.kv_usage)

    @staticmethod
    def _drop(handle: Any) -> None:
        try:
            handle.cancel()
        except Exception:  # already finished
            log.debug("cancel of a finished generation", exc_info=True)

    def _finish(self, gen: Generation, reason: str, error: str | None = None) -> None:
        if gen.finished:
            return
        if self.metrics is not None:
            tpot = None
            if gen.t_first is not None and gen.t_last is not None and len(gen.ids) > 1:
                tpot = (gen.t_last - gen.t_first) * 1e3 / (len(gen.ids) - 1)
            self.metrics.finished(tpot, cancelled=reason == CANCELLED)
        gen._end(reason, error)


class _SerialHandle:
    """One request of :class:`StatefulPipeline`, read like a continuous-batching handle."""

    def __init__(self, prompt: Any, config: Any):
        self.prompt, self.config = prompt, config
        self.tokens: list[int] = []
        self.read_to = 0
        self.status = "WAITING"
        self.error: str | None = None
        self.cancelled = False

    def can_read(self) -> bool:
        return len(self.tokens) > self.read_to

    def read(self) -> dict:
        class Out:
            pass

        out = Out()
        out.generated_ids, self.read_to = self.tokens[self.read_to:], len(self.tokens)
        out.finish_reason = "NONE"
        return {0: out}

    def get_status(self) -> str:
        return self.status

    def cancel(self) -> None:
        self.cancelled = True
        if self.status == "WAITING":
            self.status = "DROPPED_BY_HANDLE"


class StatefulPipeline:
    """OpenVINO GenAI's stateful ``LLMPipeline`` behind the continuous-batching interface the engine steps,
    one request at a time: what an NPU runs (OpenVINO serves NPUs only with the stateful pipeline, static
    shapes). The generation runs in a thread of its own with a token streamer; :meth:`step` returns when it has
    at least one new token (or ended), so the engine streams, cancels and counts exactly as with continuous
    batching; the other requests wait their turn (``WAITING``)."""

    def __init__(self, llm: Any, streamer_base: Any, status_enum: Any):
        self.llm = llm
        self._streamer_base, self._status = streamer_base, status_enum
        self.queue: collections.deque[_SerialHandle] = collections.deque()
        self.current: _SerialHandle | None = None
        self.cond = threading.Condition()

    def add_request(self, request_id: int, prompt: Any, config: Any) -> _SerialHandle:
        h = _SerialHandle(prompt, config)
        with self.cond:
            self.queue.append(h)
        return h

    def has_non_finished_requests(self) -> bool:
        with self.cond:
            return self.current is not None or any(h.status == "WAITING" for h in self.queue)

    def _start(self) -> None:
        while self.queue and self.queue[0].status != "WAITING":
            self.queue.popleft()
        if not self.queue:
            return
        h = self.current = self.queue.popleft()
        h.status = "RUNNING"
        pipeline = self

        class Streamer(self._streamer_base):
            def write(self, token):
                with pipeline.cond:
                    h.tokens.extend(int(t) for t in (token if isinstance(token, (list, tuple)) else [token]))
                    pipeline.cond.notify_all()
                return pipeline._status.CANCEL if h.cancelled else pipeline._status.RUNNING

            def end(self):
                pass

        def run() -> None:
            try:
                self.llm.generate(h.prompt, h.config, Streamer())
                final = "DROPPED_BY_HANDLE" if h.cancelled else "FINISHED"
            except Exception as exc:  # noqa: BLE001 - reported on the request, the engine goes on
                h.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                final = "DROPPED_BY_PIPELINE"
            with self.cond:
                h.status = final
                self.cond.notify_all()

        threading.Thread(target=run, name="textgen-stateful", daemon=True).start()

    def step(self) -> None:
        with self.cond:
            if self.current is None or self.current.status != "RUNNING":
                self.current = None
                self._start()
            h = self.current
            if h is None:
                return
            self.cond.wait_for(lambda: h.can_read() or h.status != "RUNNING" or h.cancelled, timeout=60.0)
            if h.status != "RUNNING":
                self.current = None

    def get_metrics(self) -> Any:
        class Metrics:
            cache_usage = 0.0  # the stateful pipeline's KV cache is sized at compile time, not paged

        m = Metrics()
        with self.cond:
            m.scheduled_requests = 1 if self.current is not None else 0
            m.requests = m.scheduled_requests + sum(h.status == "WAITING" for h in self.queue)
        return m
