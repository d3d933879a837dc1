"""The sequence batcher on its own (a fake stateful model through the runtime interface): per-sequence
state, batching across sequences with the state gathered on its batch axis, order within a sequence, the idle
timeout and the cap on live sequences with their errors; and the HTTP API's sequence parameters."""
from __future__ import annotations

import json
import threading
import urllib.request

import numpy as np
import pytest

from edgeopt.agent.batcher import BusyError
from edgeopt.agent.metrics import ModelMetrics
from edgeopt.agent.registry import BatchLimits, ModelRegistry
from edgeopt.agent.runtimes.base import LoadedModel
from edgeopt.agent.sequences import SequenceBatcher, SequenceError, sequence_params
from edgeopt.agent.server import InferenceServer
from edgeopt.sdk.package import TensorSpec
from edgeopt.sdk.stateful import StatePair

PAIRS = [StatePair(input="state", output="stateN", batch_axis=1)]


class Accumulator(LoadedModel):
    """y = x + state[0] + 10 * state[1]; stateN = [state[0] + x, state[1] + 1] (the step count). State on axis 1.
    ``gate`` (optional) holds the first call until set, and ``entered`` marks that the call started."""

    def __init__(self, gate: threading.Event | None = None):
        self.inputs = [TensorSpec(name="x", dtype="float32", shape=["n", 3]),
                       TensorSpec(name="state", dtype="float32", shape=[2, "n", 3])]
        self.outputs = [TensorSpec(name="y", dtype="float32", shape=["n", 3]),
                        TensorSpec(name="stateN", dtype="float32", shape=[2, "n", 3])]
        self.gate, self.entered, self.calls = gate, threading.Event(), []

    def infer(self, feeds):
        self.check_feeds(feeds)
        self.calls.append(len(feeds["x"]))
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
            self.gate = None
        x, s = feeds["x"], feeds["state"]
        if not np.isfinite(x).all():
            raise ValueError("x holds NaN")
        return {"y": x + s[0] + 10 * s[1], "stateN": np.stack([s[0] + x, s[1] + 1])}


def _alone(xs):
    """What one stream gets from the model run by itself."""
    s, out = np.zeros((2, 1, 3), np.float32), []
    for x in xs:
        out.append(x + s[0] + 10 * s[1])
        s = np.stack([s[0] + x, s[1] + 1])
    return out


class Metrics:
    def __init__(self):
        self.sizes = []

    def batch(self, n):
        self.sizes.append(n)


def _x(v):
    return np.full((1, 3), v, np.float32)


def test_steps_of_different_sequences_share_a_batch_and_keep_their_own_state():
    gate = threading.Event()
    model, metrics = Accumulator(gate), Metrics()
    seqs = SequenceBatcher(model, "acc", PAIRS, max_batch=8, metrics=metrics)
    try:
        first = seqs.submit({"x": _x(1)}, "a", True, False)
        assert model.entered.wait(30)  # the worker is inside the first call: the rest queue up
        queued = [("b", 2, True), ("c", 3, True), ("d", 4, True), ("a", 5, False), ("a", 6, False), ("b", 7, False)]
        pend = [(sid, v, seqs.submit({"x": _x(v)}, sid, start, False)) for sid, v, start in queued]
        gate.set()
        got = {"a": [first.result(30)["y"]]}
        for sid, _, p in pend:
            out = p.result(30)
            assert set(out) == {"y"}  # the state stays on the agent
            got.setdefault(sid, []).append(out["y"])
        # a's second step joined b, c, d; its third step (and b's second) waited for the next batch
        assert metrics.sizes == [1, 4, 2] and model.calls == [1, 4, 2]
        sent = {"a": [1, 5, 6], "b": [2, 7], "c": [3], "d": [4]}
        for sid, values in sent.items():
            for want, have in zip(_alone([_x(v) for v in values]), got[sid]):
                np.testing.assert_array_equal(have, want)
        assert seqs.live == 4
    finally:
        seqs.close()


def test_a_failing_step_fails_alone_and_its_sequence_keeps_its_state():
    gate = threading.Event()
    model = Accumulator(gate)
    seqs = SequenceBatcher(model, "acc", PAIRS, max_batch=8)
    try:
        p0 = seqs.submit({"x": _x(1)}, 1, True, False)
        assert model.entered.wait(30)
        bad = seqs.submit({"x": _x(np.nan)}, 2, True, False)
        good = seqs.submit({"x": _x(2)}, 1, False, False)
        gate.set()
        p0.result(30)
        with pytest.raises(ValueError, match="x holds NaN"):
            bad.result(30)
        np.testing.assert_array_equal(good.result(30)["y"], _alone([_x(1), _x(2)])[1])
        # sequence 2 failed on its first step: it is live, still at zeros
        np.testing.assert_array_equal(seqs.submit({"x": _x(3)}, 2, False, False).result(30)["y"], _x(3))
    finally:
        seqs.close()


def test_idle_timeout_cap_end_and_their_errors():
    now = [100.0]
    seqs = SequenceBatcher(Accumulator(), "acc", PAIRS, max_batch=4, idle_timeout_s=10, max_sequences=2,
                           clock=lambda: now[0])
    try:
        with pytest.raises(SequenceError, match="sequence 7 of model 'acc' is not active: send sequence_start=true"):
            seqs.submit({"x": _x(1)}, 7, False, False)
        seqs.submit({"x": _x(1)}, 1, True, False).result(30)
        now[0] += 1
        seqs.submit({"x": _x(1)}, 2, True, False).result(30)
        now[0] += 1
        seqs.submit({"x": _x(1)}, 1, False, False).result(30)  # 1 used last: 2 is now the longest idle
        seqs.submit({"x": _x(1)}, 3, True, False).result(30)  # at the cap: evicts 2
        assert seqs.live == 2 and seqs.evicted == 1
        with pytest.raises(SequenceError, match=r"sequence 2 of model 'acc' was evicted to make room for sequence 3 "
                                                r"\(max_sequences 2, it was the longest idle\); start it again"):
            seqs.submit({"x": _x(1)}, 2, False, False)
        seqs.submit({"x": _x(1)}, 3, False, True).result(30)  # sequence_end frees it
        with pytest.raises(SequenceError, match="sequence 3 of model 'acc' has ended"):
            seqs.submit({"x": _x(1)}, 3, False, False)
        now[0] += 11  # past the idle timeout
        with pytest.raises(SequenceError, match="sequence 1 of model 'acc' was ended by the agent after 10 s"):
            seqs.submit({"x": _x(1)}, 1, False, False)
        assert seqs.expired == 1 and seqs.live == 0
        # a restart of an ended sequence begins at zeros
        np.testing.assert_array_equal(seqs.submit({"x": _x(4)}, 1, True, False).result(30)["y"], _x(4))
    finally:
        seqs.close()


def test_cap_with_every_sequence_in_flight_answers_busy():
    gate = threading.Event()
    model = Accumulator(gate)
    seqs = SequenceBatcher(model, "acc", PAIRS, max_batch=1, max_sequences=1)
    try:
        p = seqs.submit({"x": _x(1)}, 1, True, False)
        assert model.entered.wait(30)
        with pytest.raises(BusyError, match="1 live sequences \\(max_sequences 1\\), each with a request in flight"):
            seqs.submit({"x": _x(1)}, 2, True, False)
        gate.set()
        p.result(30)
    finally:
        seqs.close()


@pytest.mark.parametrize("params, message", [
    ({"sequence_id": True}, "sequence_id must be a non-zero integer or a non-empty string, found True"),
    ({"sequence_id": 0}, "found 0"),
    ({"sequence_id": [1]}, "found [1]"),
    ({"sequence_id": "x" * 300}, "limited to 256 characters"),
    ({"sequence_id": 3, "sequence_start": "yes"}, "sequence_start must be true or false, found 'yes'"),
])
def test_malformed_sequence_parameters(params, message):
    with pytest.raises(SequenceError) as info:
        sequence_params(params)
    assert message in str(info.value)
    assert sequence_params({"x": 1}) is None and sequence_params({"sequence_id": "s1"}) == ("s1", False, False)


def _post(url, doc):
    req = urllib.request.Request(url, json.dumps(doc).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_http_sequence_parameters_config_metrics_and_telemetry():
    registry = ModelRegistry(limits=BatchLimits(max_batch=4, max_sequences=8))
    registry.swap("acc", "1.0.0", Accumulator())
    server = InferenceServer(registry, "127.0.0.1", 0).start()
    url = f"{server.url}/v2/models/acc"
    x = {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}
    try:
        status, doc = _post(url + "/infer", {"inputs": [x]})
        assert status == 400 and "model 'acc' is stateful: send parameters sequence_id" in doc["error"]
        for step in range(3):
            status, doc = _post(url + "/infer", {"inputs": [x], "parameters": {"sequence_id": 42,
                                                                            "sequence_start": step == 0}})
            assert status == 200, doc
        assert [o["name"] for o in doc["outputs"]] == ["y"]
        assert doc["outputs"][0]["data"] == [3 + 20, 6 + 20, 9 + 20]  # x + 2x + 10 * 2 steps
        # every input, state included, without sequence_id: a plain stateless call
        state = {"name": "state", "datatype": "FP32", "shape": [2, 1, 3], "data": [0] * 6}
        status, doc = _post(url + "/infer", {"inputs": [x, state]})
        assert status == 200 and doc["outputs"][0]["data"] == [1, 2, 3]
        status, doc = _post(url + "/infer", {"inputs": [x, state], "parameters": {"sequence_id": 1}})
        assert status == 400 and "a sequence request carries the inputs besides the state (x)" in doc["error"]
        status, doc = _post(url + "/infer", {"inputs": [x], "parameters": {"sequence_id": 9}})
        assert status == 400 and "sequence 9 of model 'acc' is not active" in doc["error"]
        with urllib.request.urlopen(url + "/config", timeout=30) as resp:
            config = json.loads(resp.read())
        assert config["sequence_batching"]["state"] == [{"input_name": "state", "output_name": "stateN"}]
        assert config["sequence_batching"]["max_candidate_sequences"] == 8
        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as resp:
            text = resp.read().decode()
        assert 'edgeopt_sequences_live{model="acc"} 1' in text
        stats = registry.metrics.model("acc").snapshot()
        assert stats.live_sequences == 1 and stats.model_dump()["live_sequences"] == 1
    finally:
        server.stop()
        registry.close()


def _steps_alone(seqs, pending_by_seq, sent):
    """Each sequence's answers equal the model run alone on its inputs."""
    for sid, values in sent.items():
        for want, p in zip(_alone([_x(v) for v in values]), pending_by_seq[sid]):
            np.testing.assert_array_equal(p.result(30)["y"], want)


def test_next_batch_waits_for_the_sequences_of_the_previous_one():
    # The wait is bounded by max_delay (a minute here, so only arrivals decide): the worker holds a batch
    # until every sequence of the previous batch has sent its next step, whatever else is queued (short of
    # half a batch: see the next test).
    gate = threading.Event()
    model, metrics = Accumulator(gate), Metrics()
    seqs = SequenceBatcher(model, "acc", PAIRS, max_batch=8, max_delay_ms=60_000, metrics=metrics)
    try:
        got = {"a": [seqs.submit({"x": _x(1)}, "a", True, False)]}
        assert model.entered.wait(30)
        got["b"] = [seqs.submit({"x": _x(2)}, "b", True, False)]  # queued behind a's first step
        gate.set()
        got["a"][0].result(30)
        # b's step is queued, a (served in the previous batch) is awaited: b waits for it instead of running alone
        got["a"].append(seqs.submit({"x": _x(3)}, "a", False, False))
        got["b"][0].result(30)
        # a newcomer and a's next step do not complete the batch: b is still awaited
        got["c"] = [seqs.submit({"x": _x(4)}, "c", True, False)]
        got["a"].append(seqs.submit({"x": _x(5)}, "a", False, False))
        got["b"].append(seqs.submit({"x": _x(6)}, "b", False, False))
        _steps_alone(seqs, got, {"a": [1, 3, 5], "b": [2, 6], "c": [4]})
        assert metrics.sizes == [1, 2, 3]
    finally:
        seqs.close()


def test_half_a_batch_goes_while_the_rest_of_the_previous_batch_is_still_being_answered():
    # max_batch 8: once 4 steps are queued the batch goes without a's step (a is still being answered), so
    # with many streams one half batch is in the model while the other half is answered; a's step is in the
    # next batch, never in two at once.
    model, metrics = Accumulator(), Metrics()
    seqs = SequenceBatcher(model, "acc", PAIRS, max_batch=8, max_delay_ms=60_000, metrics=metrics)
    try:
        got = {"a": [seqs.submit({"x": _x(1)}, "a", True, False)]}
        got["a"][0].result(30)
        assert seqs._awaited == {"a"}
        for sid, v in (("b", 2), ("c", 3), ("d", 4), ("e", 5)):
            got[sid] = [seqs.submit({"x": _x(v)}, sid, True, False)]
        for sid in "bcde":
            got[sid][0].result(10)  # lock-step would hold them for a (a minute)
        assert metrics.sizes == [1, 4]
        seqs.reconfigure(max_delay_ms=0)  # a's next step would wait for b..e (up to a minute)
        got["a"].append(seqs.submit({"x": _x(6)}, "a", False, False))
        _steps_alone(seqs, got, {"a": [1, 6], "b": [2], "c": [3], "d": [4], "e": [5]})
    finally:
        seqs.close()


class SlowGather(SequenceBatcher):
    """Gathering takes a while, so a worker that has been woken is visibly not yet in the model."""

    def _gather(self, batch):
        threading.Event().wait(0.2)
        return super()._gather(batch)


def test_the_submit_that_completes_a_batch_returns_once_the_worker_is_in_the_model():
    # The event loop hands the GIL to the worker it wakes: otherwise it keeps the GIL (it releases it only for
    # short syscalls) until it has parsed every request it read, and the half batch meant to overlap with that
    # work starts after it.
    model = Accumulator()
    seqs = SlowGather(model, "acc", PAIRS, max_batch=8, max_delay_ms=60_000)
    try:
        seqs.submit({"x": _x(1)}, "a", True, False).result(30)
        pending = [seqs.submit({"x": _x(v)}, sid, True, False) for sid, v in (("b", 2), ("c", 3))]
        assert model.calls == [1]  # b and c wait for a
        pending.append(seqs.submit({"x": _x(4)}, "a", False, False))  # the last awaited one: the batch goes
        assert model.calls == [1, 3]  # already inside the model call when submit returned
        for p, want in zip(pending, (_x(2), _x(3), _alone([_x(1), _x(4)])[1])):
            np.testing.assert_array_equal(p.result(30)["y"], want)
    finally:
        seqs.close()


def test_sequences_that_went_quiet_are_not_waited_for_again():
    seqs = SequenceBatcher(Accumulator(), "acc", PAIRS, max_batch=8, max_delay_ms=20)
    try:
        seqs.submit({"x": _x(1)}, "a", True, False).result(30)
        for v in (2, 3, 4):  # b never comes back: a is served after at most one max_delay, then alone
            np.testing.assert_array_equal(seqs.submit({"x": _x(v)}, "a", False, False).result(30)["y"],
                                          _alone([_x(u) for u in range(1, v + 1)])[-1])
        assert seqs._awaited <= {"a"}
    finally:
        seqs.close()


def test_states_are_views_of_the_batch_until_the_sequence_goes_idle():
    gate = threading.Event()
    now = [100.0]
    model = Accumulator(gate)
    seqs = SequenceBatcher(model, "acc", PAIRS, max_batch=8, clock=lambda: now[0])
    try:
        first = seqs.submit({"x": _x(1)}, "z", True, False)
        assert model.entered.wait(30)
        a = seqs.submit({"x": _x(2)}, "a", True, False)
        b = seqs.submit({"x": _x(3)}, "b", True, False)
        gate.set()
        first.result(30), a.result(30), b.result(30)
        state_a, state_b = seqs._streams["a"].state["state"], seqs._streams["b"].state["state"]
        assert model.calls == [1, 2]
        # both views of the one batched output, not copies
        assert state_a.base is not None and state_a.base is state_b.base
        now[0] += 2  # idle past COMPACT_AFTER_S: the next sweep gives each its own copy
        seqs.submit({"x": _x(9)}, "c", True, False).result(30)
        compact = seqs._streams["a"].state["state"]
        assert compact.base is None
        np.testing.assert_array_equal(compact, state_a)
        np.testing.assert_array_equal(seqs.submit({"x": _x(5)}, "a", False, False).result(30)["y"],
                                      _alone([_x(2), _x(5)])[1])
    finally:
        seqs.close()


def test_a_batch_is_accounted_for_before_any_of_its_answers():
    # One lock acquisition settles the whole batch: when the first client hears back, the ended sequence of
    # its batch neighbour is already gone and nothing of the batch is counted in flight.
    gate = threading.Event()
    model = Accumulator(gate)
    seqs = SequenceBatcher(model, "acc", PAIRS, max_batch=8)
    try:
        first = seqs.submit({"x": _x(1)}, "z", True, False)
        assert model.entered.wait(30)
        a = seqs.submit({"x": _x(2)}, "a", True, False)
        b = seqs.submit({"x": _x(3)}, "b", True, True)  # b starts and ends in one step
        seen = []
        a.on_done(lambda: seen.append((seqs.live, seqs._streams["a"].in_flight)))
        gate.set()
        first.result(30), a.result(30), b.result(30)
        assert seen == [(2, 0)]  # z and a live; b already ended; a not in flight
    finally:
        seqs.close()


class ScaledAccumulator(Accumulator):
    """The accumulator with a scalar input ``k`` (like a sample rate): y = k * x + state[0] + 10 * state[1]."""

    def __init__(self, gate: threading.Event | None = None):
        super().__init__(gate)
        self.inputs = self.inputs + [TensorSpec(name="k", dtype="int64", shape=[])]

    def infer(self, feeds):
        self.check_feeds(feeds)
        self.calls.append(len(feeds["x"]))
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
            self.gate = None
        x, s, k = feeds["x"], feeds["state"], feeds["k"]
        return {"y": int(k) * x + s[0] + 10 * s[1], "stateN": np.stack([s[0] + x, s[1] + 1])}


def test_steps_with_different_scalar_inputs_never_share_a_batch():
    from edgeopt.agent.batcher import batch_signature

    gate = threading.Event()
    model, metrics = ScaledAccumulator(gate), Metrics()
    seqs = SequenceBatcher(model, "acc", PAIRS, max_batch=8, metrics=metrics)
    try:
        first = seqs.submit({"x": _x(1), "k": np.array(1, np.int64)}, "z", True, False)
        assert model.entered.wait(30)
        steps = []
        for sid, k in (("a", 2), ("b", 3), ("c", 2)):
            feeds = {"x": _x(1), "k": np.array(k, np.int64)}
            steps.append((k, seqs.submit(feeds, sid, True, False, batch_signature(feeds))))
        gate.set()
        first.result(30)
        for k, p in steps:
            np.testing.assert_array_equal(p.result(30)["y"], _x(k))
        assert sorted(metrics.sizes) == [1, 1, 2]  # a and c (k=2) together, b (k=3) alone
    finally:
        seqs.close()


def test_binary_sequence_steps_check_their_header_once_and_keep_their_own_ids(monkeypatch):
    from edgeopt.agent import api as api_module

    calls = []
    real = api_module.sequence_params
    monkeypatch.setattr(api_module, "sequence_params", lambda params: calls.append(1) or real(params))
    registry = ModelRegistry(limits=BatchLimits(max_batch=4, max_sequences=8))
    registry.swap("acc", "1.0.0", Accumulator())
    server = InferenceServer(registry, "127.0.0.1", 0).start()

    def step(seq_id, start, value):
        x = np.full((1, 3), value, np.float32)
        head = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3],
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
                           "parameters": {"sequence_id": seq_id, "sequence_start": start}}).encode()
        req = urllib.request.Request(f"{server.url}/v2/models/acc/infer", head + x.tobytes(),
                                     {"Inference-Header-Content-Length": str(len(head))})
        with urllib.request.urlopen(req, timeout=30) as resp:
            n = int(resp.headers["Inference-Header-Content-Length"])
            return np.frombuffer(resp.read()[n:], np.float32)

    try:
        for seq_id in (1, 2):
            step(seq_id, True, seq_id)
        for _ in range(4):
            for seq_id in (1, 2):
                step(seq_id, False, seq_id)
        # each sequence's answers are its own (x + 5 earlier x + 10 * 5 steps)
        np.testing.assert_array_equal(step(1, False, 1), np.full(3, 1 + 5 + 50, np.float32))
        np.testing.assert_array_equal(step(2, False, 2), np.full(3, 2 + 10 + 50, np.float32))
        assert len(calls) == 4  # one per distinct header: (1, start), (2, start), (1, next), (2, next)
    finally:
        server.stop()
        registry.close()
