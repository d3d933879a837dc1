"""The text engine (agent/textgen.py) over a fake continuous-batching pipeline: stop strings held back across
token boundaries, cancellation freeing the request, the bounded queue, a step that raises (the thread lives on),
half of a multi-byte character. The real pipeline (OpenVINO GenAI) is tested in
tests/integration/test_llm_serving.py."""
from __future__ import annotations

import threading
import time

import pytest

from edgeopt.agent.batcher import BusyError, ClosedError
from edgeopt.agent.metrics import TextMetrics
from edgeopt.agent.textgen import Generation, TextEngine, _hold_back


class _Out:
    def __init__(self, ids, reason="NONE"):
        self.generated_ids = ids
        self.finish_reason = f"GenerationFinishReason.{reason}"


class _Handle:
    def __init__(self, tokens, max_new):
        self.tokens, self.max_new = list(tokens), max_new
        self.pos = self.read_to = 0
        self.status = "RUNNING"
        self.cancelled = False

    def can_read(self):
        return self.pos > self.read_to

    def read(self):
        ids, self.read_to = self.tokens[self.read_to:self.pos], self.pos
        reason = "LENGTH" if self.status == "FINISHED" and self.pos >= self.max_new else (
            "STOP" if self.status == "FINISHED" else "NONE")
        return {0: _Out(ids, reason)}

    def get_status(self):
        return f"GenerationStatus.{self.status}"

    def cancel(self):
        self.cancelled = True
        self.status = "DROPPED_BY_HANDLE"


class FakePipe:
    """One token per request per step, from a script of token ids; token id i decodes to VOCAB[i]."""

    def __init__(self, script, fail_at=None, step_s=0.0):
        self.script, self.fail_at, self.step_s = script, fail_at, step_s
        self.handles: list[_Handle] = []
        self.steps = 0

    def add_request(self, rid, ids, cfg):
        h = _Handle(self.script, cfg)
        self.handles.append(h)
        return h

    def has_non_finished_requests(self):
        return any(h.status == "RUNNING" for h in self.handles)

    def step(self):
        self.steps += 1
        if self.fail_at is not None and self.steps == self.fail_at:
            raise RuntimeError("device lost")
        time.sleep(self.step_s)
        for h in self.handles:
            if h.status == "RUNNING":
                h.pos += 1
                if h.pos >= min(len(h.tokens), h.max_new):
                    h.status = "FINISHED"

    def get_metrics(self):
        class M:
            cache_usage, scheduled_requests, requests = 12.5, 1, 1
        return M()


VOCAB = ["Hello", ",", " wor", "ld", ".", " EN", "D", " more", " text", "\u00e9"]


def decode(ids):
    return "".join(VOCAB[i] for i in ids)


def engine(pipe, **kw):
    metrics = TextMetrics()
    eng = TextEngine(pipe, lambda g: g.max_tokens, decode, "fake", metrics=metrics, **kw)
    metrics.engine = eng
    return eng, metrics


def collect(gen, timeout=10.0):
    assert gen.wait(timeout), "the generation did not finish"
    events = gen.drain()
    assert events[-1] == ("", True)
    return [d for d, _ in events[:-1]]


def test_stop_string_split_over_tokens_is_never_sent_and_ends_the_request():
    eng, metrics = engine(FakePipe([0, 1, 2, 3, 4, 5, 6, 7, 8]))
    try:
        gen = eng.admit(Generation([1, 2, 3], 50, stop=[" END"]))
        deltas = collect(gen)
        assert "".join(deltas) == "Hello, world." == gen.text
        assert all("E" not in d for d in deltas) and gen.finish_reason == "stop"
        assert gen.ids[:7] == [0, 1, 2, 3, 4, 5, 6]
    finally:
        eng.close(5)
    assert metrics.total_generated >= 7 and metrics.total_prompt == 3


def test_hold_back_is_the_longest_stop_prefix_at_the_end():
    assert _hold_back("abc wo", ["world"]) == 2 and _hold_back("abc", ["x"]) == 0
    assert _hold_back("say E", [" EN", "E!"]) == 2


def test_length_and_the_per_token_figures():
    eng, metrics = engine(FakePipe([0, 1, 2, 3, 4, 7, 8, 7, 8]))
    try:
        gen = eng.admit(Generation([1], 4))
        assert "".join(collect(gen)) == "Hello, world" and gen.finish_reason == "length"
    finally:
        eng.close(5)
    stats = metrics.snapshot(1.0)
    assert stats.generated_tokens == 4 and stats.ttft.keys and stats.tpot.keys and stats.kv_cache_usage == 0.125


def test_cancel_drops_the_request_from_the_pipeline():
    pipe = FakePipe([7] * 10_000, step_s=0.002)
    eng, metrics = engine(pipe)
    try:
        gen = eng.admit(Generation([1], 10_000))
        time.sleep(0.05)
        gen.cancel()
        assert gen.wait(5) and gen.finish_reason == "cancelled"
        assert pipe.handles[0].cancelled and len(gen.ids) < 10_000
    finally:
        eng.close(5)
    assert metrics.total_cancelled == 1


def test_the_queue_is_bounded_and_a_closed_engine_refuses():
    eng, _ = engine(FakePipe([7] * 1000, step_s=0.01), max_queue=2)
    try:
        a, b = eng.admit(Generation([1], 1000)), eng.admit(Generation([1], 1000))
        with pytest.raises(BusyError, match="2 requests in flight"):
            eng.admit(Generation([1], 10))
        a.cancel(), b.cancel()
        assert a.wait(5) and b.wait(5)
        eng.admit(Generation([1], 1)).wait(5)  # room again
    finally:
        eng.close(5)
    with pytest.raises(ClosedError):
        eng.admit(Generation([1], 1))


def test_a_failing_step_fails_its_requests_and_the_thread_lives_on():
    """Break it on purpose: the pipeline raises on its 3rd step."""
    pipe = FakePipe([0, 1, 2, 3, 4], fail_at=3)
    eng, _ = engine(pipe)
    try:
        gen = eng.admit(Generation([1], 5))
        assert gen.wait(5) and gen.finish_reason == "error" and "device lost" in gen.error
        assert eng.failures == 1 and eng._thread.is_alive()
        again = eng.admit(Generation([1], 2))
        assert again.wait(5) and again.finish_reason == "length" and eng.healthy
    finally:
        eng.close(5)


def test_half_a_character_is_held_until_complete():
    gen = Generation([1], 10)
    gen._advance("caf\ufffd", final=False)
    assert gen.drain() == [] and gen.sent == 0
    gen._advance("caf\u00e9", final=False)
    assert gen.drain() == [("caf\u00e9", False)]


def test_on_done_and_subscribe_are_called_once_each_event():
    gen = Generation([1], 10)
    calls, done = [], threading.Event()
    gen.subscribe(lambda: calls.append(1))
    gen.on_done(done.set)
    gen._advance("hi", final=False)
    gen._end("stop")
    assert done.is_set() and len(calls) == 2 and gen.drain() == [("hi", False), ("", True)]
