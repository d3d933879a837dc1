"""Sequence batcher: stateful models served per stream, as Triton's sequence batcher does.

A stateful model (a voice-activity or keyword-spotting model, a tracker) takes back on each call the state it
returned on the previous one. Clients send the Open Inference Protocol's sequence parameters with each
request (``sequence_id``, ``sequence_start``, ``sequence_end``, as Triton and ``tritonclient`` send them) and
only the model's other inputs; the agent keeps each sequence's state, starts it at zeros on
``sequence_start`` and drops it after ``sequence_end``.

Requests of different sequences run in one batch: their inputs are stacked along axis 0 and their states
gathered along the state's batch axis (``state`` [2, ?, 128] -> axis 1); after the call outputs and new states
are scattered back. Two requests of one sequence never share a batch, and run in the order they came.

Streams are closed loops (a client sends its next chunk once it has the answer to the last), so the worker
waits, up to ``max_delay_ms`` from the first queued step, for the sequences of its previous batch that have not
sent their next step yet ("awaited"), and is woken once all of them have, not by each one: every wake-up is a
thread switch and a GIL hand-off. From ``max_batch`` 4 on it goes as soon as half a batch is queued, so with
many streams two half batches are in flight: one in the model while the event loop answers the other and parses
its next steps (the model call releases the GIL; lock-step, each waited for the other). The submit that wakes
the worker also hands it the GIL (see :meth:`SequenceBatcher._wake_worker`). Sequences nobody waits for (a lone
stream, streams that went quiet) are served at once. The bookkeeping after a batch (in-flight counts, ended
sequences, who is awaited) takes the lock once per batch, and each sequence's new state is a view of the batched
output, not a copy.

Bounds: a sequence idle for ``idle_timeout_s`` is ended; at ``max_sequences`` live sequences a new one evicts
the longest-idle sequence (never one with a request in flight). The next request of an ended or evicted
sequence is answered with an error saying so (400), not with a silently fresh state.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

import numpy as np

from ..sdk.stateful import StatePair
from .batcher import BusyError, ClosedError, Pending, batch_signature, run_worker
from .caches import BoundedCache
from .runtimes.base import LoadedModel

log = logging.getLogger(__name__)

MAX_REMEMBERED = 4096  # ended/evicted sequence ids remembered for their next request's error
OVERLAP_MIN_BATCH = 4  # from this max_batch on, half a batch goes while the other half is being answered
COMPACT_AFTER_S = 1.0  # a sequence idle this long gets its own copy of its state (see _expire)


class SequenceError(Exception):
    """A request that does not fit its sequence (not started, ended, evicted); answered 400."""


class _Stream:
    __slots__ = ("id", "state", "last_used", "in_flight")

    def __init__(self, seq_id: Any, now: float):
        self.id = seq_id
        self.state: dict[str, np.ndarray] | None = None  # None: zeros at the first step
        self.last_used = now
        self.in_flight = 0


class _Step(Pending):
    __slots__ = ("stream", "end")

    def __init__(self, feeds, n, signature, stream: _Stream, end: bool):
        super().__init__(feeds, n, signature)
        self.stream, self.end = stream, end


def _overlap_at(max_batch: int) -> int:
    """Queued steps at which a batch goes while other sequences of the previous one are still being answered."""
    return max_batch // 2 if max_batch >= OVERLAP_MIN_BATCH else max_batch


def sequence_params(parameters: dict) -> tuple[Any, bool, bool] | None:
    """(sequence_id, start, end) from a request's parameters, or None when it has no sequence_id.
    Raises SequenceError for malformed values."""
    if "sequence_id" not in parameters:
        return None
    seq_id = parameters["sequence_id"]
    if isinstance(seq_id, bool) or not isinstance(seq_id, (int, str)) or seq_id in (0, ""):
        raise SequenceError(f"sequence_id must be a non-zero integer or a non-empty string, found {seq_id!r}")
    if isinstance(seq_id, str) and len(seq_id) > 256:
        raise SequenceError("sequence_id strings are limited to 256 characters")
    flags = []
    for key in ("sequence_start", "sequence_end"):
        value = parameters.get(key, False)
        if not isinstance(value, bool):
            raise SequenceError(f"{key} must be true or false, found {value!r}")
        flags.append(value)
    return seq_id, flags[0], flags[1]


class SequenceBatcher:
    """Per-sequence state and cross-sequence batching for one stateful model (see the module docstring)."""

    def __init__(self, model: LoadedModel, name: str, pairs: list[StatePair], *, max_batch: int = 8,
                 max_delay_ms: float = 2.0, max_queue: int = 256, idle_timeout_s: float = 60.0,
                 max_sequences: int = 1024, metrics: Any = None, clock=time.monotonic):
        self.model, self.name, self.pairs, self.metrics = model, name, list(pairs), metrics
        self._clock = clock  # idle time is measured on it (tests pass their own)
        state_in = {p.input for p in self.pairs}
        state_out = {p.output for p in self.pairs}
        self.inputs = [s for s in model.inputs if s.name not in state_in]  # what a sequence request carries
        self.outputs = [s for s in model.outputs if s.name not in state_out]  # what it gets back
        self._specs = {s.name: s for s in model.inputs}
        self._state_outputs = {p.output: p for p in self.pairs}
        # Without a batch axis on every state, sequences run one at a time.
        self.batchable = all(p.batch_axis is not None for p in self.pairs)
        self.max_batch = max(1, int(max_batch)) if self.batchable else 1
        self._overlap_at = _overlap_at(self.max_batch)
        self.max_delay = max(0.0, float(max_delay_ms)) / 1000.0
        self.max_queue = max(1, int(max_queue))
        self.idle_timeout = float(idle_timeout_s)
        self.max_sequences = max(1, int(max_sequences))
        self._streams: dict[Any, _Stream] = {}
        self._gone: collections.OrderedDict[Any, str] = collections.OrderedDict()
        self.evicted = self.expired = 0
        self._queue: collections.deque[_Step] = collections.deque()
        # A plain lock, not the default RLock: it is taken on every request.
        lock = threading.Lock()
        self._cond = threading.Condition(lock)
        self._closed = False
        # Ids of the previous batch's sequences that have not sent their next step yet (see the module doc).
        self._awaited: set[Any] = set()
        # While the worker waits: submit() wakes it once this many steps are queued, or (``_wake_on_awaited``)
        # once the last awaited sequence has sent its step. None while it runs a batch.
        self._wake_at: int | None = None
        self._wake_on_awaited = False
        # A submitter waits on this (same lock) until the worker it woke is inside the model call.
        self._dispatching = threading.Condition(lock)
        self._handoff = False
        self._next_sweep = 0.0
        # batch_signature -> (names of the scalar inputs, name of an input with a batch axis), per request kind
        self._kinds = BoundedCache(256)
        self._thread = threading.Thread(target=self._run, name=f"sequences-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ client side
    @property
    def live(self) -> int:
        return len(self._streams)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def submit(self, feeds: dict[str, np.ndarray], seq_id: Any, start: bool, end: bool,
               signature: tuple | None = None) -> Pending:
        """Queue one step of sequence ``seq_id``. Raises SequenceError, BusyError or ClosedError.
        ``signature`` is :func:`batch_signature` of ``feeds`` when the caller already has it."""
        if signature is None:
            signature = batch_signature(feeds)
        kind = self._kinds.get(signature)
        if kind is None:
            names = sorted(feeds)
            kind = (tuple(k for k in names if not feeds[k].ndim), next((k for k in names if feeds[k].ndim), None))
            self._kinds.put(signature, kind)
        scalars, batched = kind
        n = int(feeds[batched].shape[0]) if batched is not None else 1
        if scalars:  # scalars (a sample rate) must be equal to share a batch: their value joins the signature
            signature = (signature, tuple(feeds[k].tobytes() for k in scalars))
        now = self._clock()
        with self._cond:
            if self._closed:
                raise ClosedError(f"model {self.name!r} is being replaced or stopped")
            if len(self._queue) >= self.max_queue:
                raise BusyError(f"model {self.name!r} is busy: {len(self._queue)} requests queued "
                                f"(max_queue {self.max_queue}); retry later", 1)
            if now >= self._next_sweep:
                self._expire(now)
            stream = self._streams.get(seq_id)
            if start:
                if stream is None and len(self._streams) >= self.max_sequences:
                    self._evict_for(seq_id)
                stream = self._streams[seq_id] = _Stream(seq_id, now)  # a restart begins from zeros too
                self._gone.pop(seq_id, None)
            elif stream is None:
                why = self._gone.get(seq_id)
                if why:
                    raise SequenceError(f"sequence {seq_id!r} of model {self.name!r} {why}; start it again with "
                                        f"sequence_start=true")
                raise SequenceError(f"sequence {seq_id!r} of model {self.name!r} is not active: send "
                                    f"sequence_start=true with its first request")
            stream.in_flight += 1
            stream.last_used = now
            step = _Step(feeds, n, signature, stream, end)
            self._queue.append(step)
            awaited = self._awaited
            if awaited and seq_id in awaited:
                awaited.discard(seq_id)
                if not awaited and self._wake_on_awaited:
                    self._wake_worker()
                    return step
            if self._wake_at is not None and len(self._queue) >= self._wake_at:
                self._wake_worker()
        return step

    def _wake_worker(self) -> None:
        """Wake the waiting worker (under the lock). While it waits for a batch's sequences, hand it the GIL too:
        the caller (the API's event loop) sleeps until the worker is inside the model call (which releases the
        GIL), bounded by max_delay. Without the hand-off the loop, which releases the GIL only for short
        syscalls and takes it straight back, keeps it until it has parsed every request it has read, and the
        batch meant to overlap with that work starts after it (measured: batches stayed whole)."""
        self._cond.notify()
        if self._wake_on_awaited:
            self._wake_at, self._wake_on_awaited = None, False
            self._handoff = True
            self._dispatching.wait_for(lambda: not self._handoff, self.max_delay)
            self._handoff = False

    def _dispatched(self) -> None:
        """The worker is about to call the model: a submitter waiting in :meth:`_wake_worker` goes on."""
        if self._handoff:
            with self._cond:
                self._release_submitter()

    def _release_submitter(self) -> None:
        # Under the lock. Also when the woken worker goes back to waiting (the step that woke it could not
        # join its batch): the submitter must not sleep through that wait.
        if self._handoff:
            self._handoff = False
            self._dispatching.notify_all()

    def _forget(self, seq_id: Any, why: str) -> None:
        self._streams.pop(seq_id, None)
        self._awaited.discard(seq_id)  # an expired or evicted sequence is not waited for
        self._gone[seq_id] = why
        while len(self._gone) > MAX_REMEMBERED:
            self._gone.popitem(last=False)

    def _expire(self, now: float) -> None:
        """End sequences idle longer than the timeout, compact the state of sequences idle for a second
        (called under the lock, about once a second)."""
        self._next_sweep = now + min(1.0, self.idle_timeout / 4)
        for s in [s for s in self._streams.values() if not s.in_flight and now - s.last_used > self.idle_timeout]:
            self._forget(s.id, f"was ended by the agent after {self.idle_timeout:g} s without a request")
            self.expired += 1
        # A state scattered from a batch is a view that keeps the whole batch's output alive: copy it once the
        # sequence is idle, so idle sequences hold their own state only. Safe here: with nothing in flight
        # the worker does not touch the state, and a new step needs this lock to be queued.
        for s in self._streams.values():
            if s.state is not None and not s.in_flight and now - s.last_used > COMPACT_AFTER_S \
                    and any(a.base is not None for a in s.state.values()):
                s.state = {k: a.copy() for k, a in s.state.items()}

    def _evict_for(self, newcomer: Any) -> None:
        idle = [s for s in self._streams.values() if not s.in_flight]
        if not idle:
            raise BusyError(f"model {self.name!r} has {len(self._streams)} live sequences (max_sequences "
                            f"{self.max_sequences}), each with a request in flight; retry later", 1)
        victim = min(idle, key=lambda s: s.last_used)
        self._forget(victim.id, f"was evicted to make room for sequence {newcomer!r} (max_sequences "
                                f"{self.max_sequences}, it was the longest idle)")
        self.evicted += 1
        log.info("model %s: sequence %r evicted for %r (max_sequences %d)", self.name, victim.id, newcomer,
                 self.max_sequences)

    def reconfigure(self, *, max_batch: int | None = None, max_delay_ms: float | None = None,
                    max_queue: int | None = None) -> None:
        with self._cond:
            if max_batch is not None:
                self.max_batch = max(1, int(max_batch)) if self.batchable else 1
                self._overlap_at = _overlap_at(self.max_batch)
            if max_delay_ms is not None:
                self.max_delay = max(0.0, float(max_delay_ms)) / 1000.0
            if max_queue is not None:
                self.max_queue = max(1, int(max_queue))
            self._cond.notify_all()

    def close(self, timeout: float | None = 30.0) -> bool:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._dispatching.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ worker side
    def _take(self, first: _Step, batch: list[_Step], total: int) -> int:
        """Move queued steps that can join ``batch`` (other sequences, same signature) into it, in order."""
        members = {id(p.stream) for p in batch}
        keep: list[_Step] = []
        while self._queue and total < self.max_batch:
            item = self._queue.popleft()
            if id(item.stream) in members or item.signature != first.signature or total + item.n > self.max_batch:
                keep.append(item)  # a later step of a batched sequence waits for the next batch, in order
                continue
            batch.append(item)
            members.add(id(item.stream))
            total += item.n
        self._queue.extendleft(reversed(keep))
        return total

    def _collect(self) -> list[_Step] | None:
        with self._cond:
            waited = False
            while not self._queue:
                if self._closed:
                    return None
                if self._awaited and not waited and self.max_batch > 1:
                    # The previous batch's sequences will be back soon: sleep until all of them are (or half
                    # a batch is queued, see _overlap_at), not until the first one is.
                    self._wake_at, self._wake_on_awaited = self._overlap_at, True
                    self._release_submitter()
                    self._cond.wait(self.max_delay)
                    waited = True
                else:
                    # Idle, or the awaited sequences did not come back within max_delay: they went quiet.
                    self._awaited.clear()
                    self._wake_at, self._wake_on_awaited = 1, False
                    self._cond.wait()
            first = self._queue.popleft()
            batch, total = [first], first.n
            if self.max_batch > 1:
                deadline = first.enqueued + self.max_delay
                while True:
                    total = self._take(first, batch, total)
                    # Wait only for sequences expected soon (served in the previous batch, no step sent yet):
                    # a lone stream is served at once.
                    if total >= self._overlap_at or not self._awaited or self._closed:
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._wake_at = len(self._queue) + self._overlap_at - total
                    self._wake_on_awaited = True
                    self._release_submitter()
                    self._cond.wait(remaining)
            self._wake_at, self._wake_on_awaited = None, False
            return batch

    def _run(self) -> None:
        run_worker(self._collect, self._execute, lambda p, exc: self._finish(p, error=exc),
                   f"sequence batcher {self.name}")

    def _state_of(self, step: _Step) -> dict[str, np.ndarray]:
        if step.stream.state is not None:
            return step.stream.state
        out = {}
        for p in self.pairs:  # a sequence starts at zeros, its batch axis sized like the request
            spec = self._specs[p.input]
            shape = [d if isinstance(d, int) and d >= 0 else (step.n if i == p.batch_axis else 1)
                     for i, d in enumerate(spec.shape)]
            out[p.input] = np.zeros(shape, np.dtype(spec.dtype))
        return out

    def _execute(self, batch: list[_Step]) -> None:
        start = time.monotonic()
        total = sum(p.n for p in batch)
        if len(batch) == 1:
            self._run_one(batch[0], whole_batch=True)
        else:
            try:
                feeds = self._gather(batch)
                self._dispatched()
                outputs = self.model.infer(feeds)
                parts = self._scatter(batch, outputs)
            except Exception:
                self._dispatched()
                for p in batch:  # one request may be the culprit: run them one by one so only it fails
                    self._run_one(p)
                with self._cond:
                    self._awaited = set()  # after a failure, wait for nobody
            else:
                for p, (_, state) in zip(batch, parts):
                    p.stream.state = state
                self._settle(batch, [public for public, _ in parts], whole_batch=True)
        if self.metrics is not None:
            self.metrics.batch(total)
        log.debug("sequences %s: batch of %d in %.2f ms", self.name, total, (time.monotonic() - start) * 1e3)

    def _run_one(self, step: _Step, whole_batch: bool = False) -> None:
        # A state scattered from a batch is a view of it: contiguous for runtimes that want their buffers so.
        state = {k: np.ascontiguousarray(v) for k, v in self._state_of(step).items()}
        self._dispatched()
        try:
            outputs = self.model.infer({**step.feeds, **state})
        except Exception as exc:
            self._settle([step], error=exc, whole_batch=whole_batch)  # the sequence keeps its state
            return
        step.stream.state = {p.input: outputs[p.output] for p in self.pairs}
        self._settle([step], [{k: v for k, v in outputs.items() if k not in self._state_outputs}],
                     whole_batch=whole_batch)

    def _gather(self, batch: list[_Step]) -> dict[str, np.ndarray]:
        feeds = {}
        for name, arr in batch[0].feeds.items():
            feeds[name] = np.concatenate([p.feeds[name] for p in batch]) if arr.ndim else arr
        states = [self._state_of(p) for p in batch]
        for pair in self.pairs:
            feeds[pair.input] = np.concatenate([s[pair.input] for s in states], axis=pair.batch_axis)
        return feeds

    def _scatter(self, batch: list[_Step], outputs: dict[str, np.ndarray]):
        """Each step's public outputs and new state, as views of the batched outputs (nothing is copied: the
        next batch's gather copies the states it concatenates, and a view keeps its batch alive only until
        the sequence's next step replaces it)."""
        total = sum(p.n for p in batch)
        state_out = self._state_outputs
        for name, arr in outputs.items():
            axis = state_out[name].batch_axis if name in state_out else 0
            if arr.ndim <= axis or arr.shape[axis] != total:
                raise ValueError(f"output {name!r} has no batch of {total} on axis {axis}")
        public_items = [(k, v) for k, v in outputs.items() if k not in state_out]
        # (state input, batched state output, the index before the batch axis)
        states = [(p.input, outputs[p.output], (slice(None),) * p.batch_axis) for p in self.pairs]
        parts, offset = [], 0
        for p in batch:
            rows = slice(offset, offset + p.n)
            parts.append(({k: v[rows] for k, v in public_items},
                          {name: arr[lead + (rows,)] for name, arr, lead in states}))
            offset += p.n
        return parts

    def _settle(self, steps: list[_Step], outputs: list[dict] | None = None, error=None,
                whole_batch: bool = False) -> None:
        """Account for finished steps under one lock acquisition (in flight, last use, sequence_end and, when
        ``steps`` is a whole batch, which sequences the next batch waits for), then answer them outside it."""
        with self._cond:
            now = self._clock()
            awaited = set()
            for step in steps:
                stream = step.stream
                stream.in_flight -= 1
                stream.last_used = now
                live = self._streams.get(stream.id) is stream
                if step.end and live:
                    del self._streams[stream.id]
                    self._gone[stream.id] = "has ended (sequence_end was sent)"
                    while len(self._gone) > MAX_REMEMBERED:
                        self._gone.popitem(last=False)
                if not stream.in_flight and (live or step.end):
                    # Its next step is not queued yet: expect it (an ended stream is often started again at
                    # once under the same id; the wait is bounded by max_delay either way).
                    awaited.add(stream.id)
            if whole_batch and self.max_batch > 1:
                self._awaited = awaited
        if outputs is None:
            for step in steps:
                step.finish(error=error)
        else:
            for step, out in zip(steps, outputs):
                step.finish(outputs=out)

    def _finish(self, step: _Step, outputs=None, error=None) -> None:
        """One step, finished outside a batch (run_worker's fallback for a failure)."""
        self._settle([step], None if outputs is None else [outputs], error)
