"""Dynamic batcher: one worker thread per model groups concurrent requests into one runtime call.

A request waits in a bounded queue; beyond ``max_queue`` waiting requests :class:`BusyError` is raised
(the server answers 503 with Retry-After) instead of letting the queue and the latency grow without
limit. The worker takes the oldest request and adds queued requests with the same per-sample shapes
until the batch holds ``max_batch`` samples or the first request has waited ``max_delay_ms``.

Waiting is adaptive so a lone client does not pay the delay: the worker waits for more requests only
while the previous batch was bigger than what it holds now (concurrent clients are active). Under load
the batch fills to the clients' number; a single client runs at once, as it would without a batcher.

Errors are per request: if a merged batch fails, its requests are run one by one so a bad request
cannot fail its neighbours. :meth:`Batcher.close` stops accepting and drains what was accepted, which
is how a hot swap finishes in-flight requests on the old model.
"""
from __future__ import annotations

import collections
import logging
import math
import threading
import time
from typing import Any

import numpy as np

from ..sdk.errors import EdgeoptError
from .runtimes.base import LoadedModel

log = logging.getLogger(__name__)
_EVENT_LOCK = threading.Lock()


class BusyError(Exception):
    """The queue is full; retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ClosedError(Exception):
    """The batcher no longer accepts requests (its model is being replaced or the agent stops)."""


class Pending:
    """One accepted request; :meth:`result` blocks until the worker has run it."""

    __slots__ = ("feeds", "n", "signature", "enqueued", "done", "_event", "outputs", "error", "_callback")

    def __init__(self, feeds: dict[str, np.ndarray], n: int, signature: tuple):
        self.feeds = feeds
        self.n = n
        self.signature = signature
        self.enqueued = time.monotonic()
        self.done = False
        # Created only when a caller blocks in result(): the API's event loop never does, and an Event
        # per request was a measurable share of the per-request cost.
        self._event: threading.Event | None = None
        self.outputs: dict[str, np.ndarray] | None = None
        self.error: BaseException | None = None
        self._callback = None

    def on_done(self, callback) -> None:
        """Call ``callback()`` once (from the worker thread) when the result is ready; at once if it is."""
        self._callback = callback
        if self.done:
            self._fire()

    def _fire(self) -> None:
        # on_done() and finish() may race: whoever takes the callback first calls it, exactly once.
        with _EVENT_LOCK:
            callback, self._callback = self._callback, None
        if callback is not None:
            try:
                callback()
            except Exception:  # e.g. the server's event loop is already closed: the client is gone
                log.debug("pending result callback failed", exc_info=True)

    def finish(self, outputs: dict[str, np.ndarray] | None = None, error: BaseException | None = None) -> None:
        self.outputs, self.error = outputs, error
        self.done = True
        event = self._event
        if event is not None:
            event.set()
        if self._callback is not None:
            self._fire()

    def result(self, timeout: float | None = None) -> dict[str, np.ndarray]:
        if not self.done:
            with _EVENT_LOCK:
                if self._event is None:
                    self._event = threading.Event()
            # finish() sets `done` before it looks for the event, so checking again here cannot miss it.
            if not self.done and not self._event.wait(timeout):
                raise TimeoutError("inference did not finish in time")
        if self.error is not None:
            raise self.error
        return self.outputs  # type: ignore[return-value]


def batch_signature(feeds: dict[str, np.ndarray]) -> tuple:
    """Requests with equal signatures (input names, dtypes, shapes after the batch dim) can be stacked."""
    return tuple((k, v.dtype.str, v.shape[1:]) for k, v in sorted(feeds.items()))


def has_batch_dim(model: LoadedModel) -> bool:
    """True when every input and output has a dynamic first dimension (so requests can be stacked)."""
    specs = list(model.inputs) + list(model.outputs)
    return bool(specs) and all(s.shape and not (isinstance(s.shape[0], int) and s.shape[0] >= 0) for s in specs)


def run_worker(collect, execute, fail, label: str) -> None:
    """A batching worker's loop: ``collect`` a batch (None: closed and drained), ``execute`` it; a failure
    ``execute`` did not answer itself is given to every request of the batch still open (``fail(p, exc)``)
    and the loop goes on: a dead worker would hang every client."""
    while True:
        batch = collect()
        if batch is None:
            return
        try:
            execute(batch)
        except BaseException as exc:
            log.exception("%s: unexpected failure", label)
            for p in batch:
                if not p.done:
                    fail(p, exc)


class Batcher:
    """Per-model request queue and worker. ``max_batch`` 1 (or a model without a batch dim) runs requests
    one at a time through the same queue, which keeps the busy answer and the metrics identical."""

    def __init__(self, model: LoadedModel, name: str, *, max_batch: int = 1, max_delay_ms: float = 2.0,
                 max_queue: int = 256, metrics: Any = None):
        self.model = model
        self.name = name
        self.metrics = metrics
        self.batchable = has_batch_dim(model)
        self.max_batch = max(1, int(max_batch)) if self.batchable else 1
        self.max_delay = max(0.0, float(max_delay_ms)) / 1000.0
        self.max_queue = max(1, int(max_queue))
        self._queue: collections.deque[Pending] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._queued = 0  # samples in the queue
        # While the worker waits: how many queued samples it needs before it can act, and the signature of
        # the batch it is filling (None: idle, any request will do). None while it runs a batch. submit()
        # wakes it only then, not once per request: each wake-up costs a thread switch and a GIL hand-off.
        self._wake_at: int | None = None
        self._filling: tuple | None = None
        self._last_batch = 1
        self._batch_seconds = 0.001  # moving average of one batch's run time (for Retry-After)
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ client side
    def submit(self, feeds: dict[str, np.ndarray], signature: tuple | None = None) -> Pending:
        """Queue one request (inputs already checked against the model). Raises BusyError or ClosedError.
        ``signature`` is :func:`batch_signature` of ``feeds`` when the caller already has it."""
        first = next(iter(feeds.values()))
        n = int(first.shape[0]) if self.batchable and first.ndim else 1
        if signature is None:
            signature = batch_signature(feeds)
        pending = Pending(feeds, n, signature)
        with self._cond:
            if self._closed:
                raise ClosedError(f"model {self.name!r} is being replaced or stopped")
            if len(self._queue) >= self.max_queue:
                batches_ahead = len(self._queue) / max(1, self.max_batch)
                retry = max(1, math.ceil(batches_ahead * self._batch_seconds))
                raise BusyError(f"model {self.name!r} is busy: {len(self._queue)} requests queued "
                                f"(max_queue {self.max_queue}); retry later", retry)
            self._queue.append(pending)
            self._queued += n
            if self._wake_at is not None and (self._queued >= self._wake_at or signature != self._filling):
                self._cond.notify()
        return pending

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def reconfigure(self, *, max_batch: int | None = None, max_delay_ms: float | None = None,
                    max_queue: int | None = None) -> None:
        """Change limits for the next batches (set-config command)."""
        with self._cond:
            if max_batch is not None:
                self.max_batch = max(1, int(max_batch)) if self.batchable else 1
            if max_delay_ms is not None:
                self.max_delay = max(0.0, float(max_delay_ms)) / 1000.0
            if max_queue is not None:
                self.max_queue = max(1, int(max_queue))
            self._cond.notify_all()  # a worker filling a batch re-checks it against the new limits

    def close(self, timeout: float | None = 30.0) -> bool:
        """Stop accepting, run every request already accepted, stop the worker. True when drained."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ worker side
    def _collect(self) -> list[Pending] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._wake_at, self._filling = 1, None
                self._cond.wait()
            self._wake_at = None
            first = self._queue.popleft()
            self._queued -= first.n
            batch, total = [first], first.n
            if self.max_batch <= 1 or first.n >= self.max_batch:
                return batch
            deadline = first.enqueued + self.max_delay
            while total < self.max_batch:
                while self._queue and self._queue[0].signature == first.signature \
                        and total + self._queue[0].n <= self.max_batch:
                    item = self._queue.popleft()
                    self._queued -= item.n
                    batch.append(item)
                    total += item.n
                if total >= self.max_batch or self._queue or self._closed:
                    break  # full, or the head of the queue cannot join this batch
                # Wait only when more requests are likely: the previous batch was bigger (concurrent
                # clients). A lone client is served at once.
                if total >= self._last_batch:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wake_at = min(self.max_batch, self._last_batch) - total
                self._filling = first.signature
                self._cond.wait(remaining)
            self._wake_at = None
            self._last_batch = total
            return batch

    def _run(self) -> None:
        run_worker(self._collect, self._execute, lambda p, exc: p.finish(error=exc), f"batcher {self.name}")

    def _execute(self, batch: list[Pending]) -> None:
        total = sum(p.n for p in batch)
        start = time.monotonic()
        if len(batch) == 1:
            try:
                batch[0].finish(outputs=self.model.infer(batch[0].feeds))
            except Exception as exc:
                batch[0].finish(error=exc)
        else:
            feeds = {k: np.concatenate([p.feeds[k] for p in batch]) for k in batch[0].feeds}
            try:
                outputs = self.model.infer(feeds)
                bad = [k for k, v in outputs.items() if v.ndim == 0 or v.shape[0] != total]
                if bad:
                    raise EdgeoptError(f"model {self.name!r} output {bad[0]!r} has no batch dimension of {total}")
            except Exception:
                # One request may be the culprit: run them one by one so only it fails.
                for p in batch:
                    try:
                        p.finish(outputs=self.model.infer(p.feeds))
                    except Exception as exc:
                        p.finish(error=exc)
            else:
                offset = 0
                for p in batch:
                    p.finish(outputs={k: v[offset:offset + p.n] for k, v in outputs.items()})
                    offset += p.n
        elapsed = time.monotonic() - start
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
        if self.metrics is not None:
            self.metrics.batch(total)
