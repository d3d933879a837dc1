"""Dynamic batcher: grouping, splitting, bounded queue, per-request errors, drain on close.

Grouping and splitting run on the real digits CNN (ONNX Runtime); the timing-controlled cases use a
small fake model (a unit test may fake the runtime) so they never depend on machine speed.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edgeopt.agent.batcher import Batcher, BusyError, ClosedError, has_batch_dim
from edgeopt.agent.runtimes import get_runtime
from edgeopt.agent.runtimes.base import LoadedModel
from edgeopt.sdk.errors import InputError
from edgeopt.sdk.package import TensorSpec


class FakeModel(LoadedModel):
    """y = x * 2, with a gate that holds every call until released, and a poison value that fails."""

    def __init__(self, batch_dim: str | int = "batch"):
        self.inputs = [TensorSpec(name="x", dtype="float32", shape=[batch_dim, 3])]
        self.outputs = [TensorSpec(name="y", dtype="float32", shape=[batch_dim, 3])]
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def infer(self, feeds):
        self.entered.set()
        self.gate.wait(10)
        x = feeds["x"]
        self.calls.append(x.shape[0])
        if np.any(x < 0):
            raise InputError("negative values are not allowed")
        return {"y": x * 2}


@pytest.fixture(scope="module")
def digits(digits_model):
    return get_runtime("onnxruntime").load(digits_model, device="CPUExecutionProvider", threads=1)


def test_batched_results_match_single_requests(digits, digits_heldout):
    images = np.load(digits_heldout)["images"][:24]
    direct = [digits.infer({"images": images[i:i + 1]})["logits"] for i in range(len(images))]
    batcher = Batcher(digits, "digits", max_batch=8, max_delay_ms=50, max_queue=64)
    try:
        results: dict[int, np.ndarray] = {}
        barrier = threading.Barrier(len(images))

        def client(i: int) -> None:
            barrier.wait()
            results[i] = batcher.submit({"images": images[i:i + 1]}).result(30)["logits"]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(images))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for i, want in enumerate(direct):
            np.testing.assert_allclose(results[i], want, rtol=1e-4, atol=1e-5)
    finally:
        batcher.close()


def test_queued_requests_are_grouped_up_to_max_batch():
    model = FakeModel()
    model.gate.clear()
    batcher = Batcher(model, "fake", max_batch=4, max_delay_ms=0, max_queue=64)
    first = batcher.submit({"x": np.ones((1, 3), np.float32)})
    assert model.entered.wait(5)
    # While the model is busy with the first request, 6 more queue up: they run as batches of 4 and 2.
    pending = [batcher.submit({"x": np.full((1, 3), i, np.float32)}) for i in range(6)]
    model.gate.set()
    first.result(5)
    for i, p in enumerate(pending):
        np.testing.assert_array_equal(p.result(5)["y"], np.full((1, 3), 2 * i, np.float32))
    batcher.close()
    assert model.calls == [1, 4, 2]


def test_full_queue_raises_busy_with_retry_after():
    model = FakeModel()
    model.gate.clear()
    batcher = Batcher(model, "fake", max_batch=1, max_queue=2)
    running = batcher.submit({"x": np.ones((1, 3), np.float32)})
    assert model.entered.wait(5)
    queued = [batcher.submit({"x": np.ones((1, 3), np.float32)}) for _ in range(2)]
    with pytest.raises(BusyError, match=r"model 'fake' is busy: 2 requests queued \(max_queue 2\)") as info:
        batcher.submit({"x": np.ones((1, 3), np.float32)})
    assert info.value.retry_after_s >= 1
    model.gate.set()
    for p in [running, *queued]:
        p.result(5)
    batcher.close()


def test_bad_request_fails_alone_in_a_merged_batch():
    model = FakeModel()
    model.gate.clear()
    batcher = Batcher(model, "fake", max_batch=8, max_delay_ms=0, max_queue=64)
    head = batcher.submit({"x": np.ones((1, 3), np.float32)})
    assert model.entered.wait(5)
    good1 = batcher.submit({"x": np.ones((1, 3), np.float32)})
    bad = batcher.submit({"x": -np.ones((1, 3), np.float32)})
    good2 = batcher.submit({"x": np.ones((2, 3), np.float32)})
    model.gate.set()
    head.result(5)
    assert good1.result(5)["y"].shape == (1, 3)
    assert good2.result(5)["y"].shape == (2, 3)
    with pytest.raises(InputError, match="negative values are not allowed"):
        bad.result(5)
    batcher.close()


def test_close_drains_accepted_requests_then_refuses_new_ones():
    model = FakeModel()
    model.gate.clear()
    batcher = Batcher(model, "fake", max_batch=1, max_queue=64)
    pending = [batcher.submit({"x": np.ones((1, 3), np.float32)}) for _ in range(5)]
    closer = threading.Thread(target=batcher.close)
    closer.start()
    _wait(lambda: batcher._closed, "close() to mark the batcher closed")  # close() is now draining
    with pytest.raises(ClosedError, match="model 'fake' is being replaced or stopped"):
        batcher.submit({"x": np.ones((1, 3), np.float32)})
    model.gate.set()
    closer.join(10)
    assert all(p.result(1)["y"].shape == (1, 3) for p in pending)


def test_static_batch_model_is_never_batched():
    model = FakeModel(batch_dim=1)
    assert not has_batch_dim(model)
    batcher = Batcher(model, "static", max_batch=16)
    assert batcher.max_batch == 1
    batcher.close()


def test_lone_client_does_not_wait_for_the_delay():
    """With a 60 s max delay a single client is still served at once: the wait is adaptive. (A batcher
    that always waited would exceed the 10 s result timeout by far.)"""
    model = FakeModel()
    batcher = Batcher(model, "fake", max_batch=16, max_delay_ms=60_000, max_queue=8)
    for _ in range(3):
        batcher.submit({"x": np.ones((1, 3), np.float32)}).result(10)
    assert model.calls == [1, 1, 1]
    batcher.close()


def test_reconfigure_changes_limits():
    batcher = Batcher(FakeModel(), "fake", max_batch=4, max_queue=8)
    batcher.reconfigure(max_batch=2, max_delay_ms=1, max_queue=3)
    assert (batcher.max_batch, batcher.max_queue) == (2, 3)
    batcher.close()


def _wait(pred, what: str, timeout: float = 10.0) -> None:
    """Poll ``pred`` until true (a generous deadline, no fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def _wait_filling(batcher: Batcher, missing: int) -> None:
    """The marker that the worker took the queued requests and now waits for ``missing`` more to fill its
    batch (what the tests below used to assume after a sleep)."""
    _wait(lambda: batcher._filling is not None and batcher._wake_at == missing and not batcher._queue,
          f"the worker to wait for {missing} more request(s)")


def _primed(max_batch: int = 4) -> tuple[FakeModel, Batcher]:
    """A batcher whose previous batch was full (as under concurrent load), with a 60 s max delay: it now
    waits for a full batch, so any test that relied on the delay would hit its 10 s result timeout."""
    model = FakeModel()
    model.gate.clear()
    batcher = Batcher(model, "fake", max_batch=max_batch, max_delay_ms=60_000, max_queue=64)
    head = batcher.submit({"x": np.ones((1, 3), np.float32)})
    assert model.entered.wait(5)
    queued = [batcher.submit({"x": np.ones((1, 3), np.float32)}) for _ in range(max_batch)]
    model.gate.set()
    for p in [head, *queued]:
        p.result(10)
    assert model.calls == [1, max_batch]
    return model, batcher


def test_filling_batch_runs_as_soon_as_it_is_full():
    """submit() wakes a worker that is filling a batch only once the batch can be completed (not once per
    request); the full batch then runs at once, long before the max delay."""
    model, batcher = _primed(4)
    pending = [batcher.submit({"x": np.full((1, 3), i, np.float32)}) for i in range(3)]
    _wait_filling(batcher, missing=1)  # the worker holds the three and waits for one more
    assert model.calls == [1, 4]  # still waiting for the fourth request
    pending.append(batcher.submit({"x": np.full((1, 3), 3, np.float32)}))
    for i, p in enumerate(pending):
        np.testing.assert_array_equal(p.result(10)["y"], np.full((1, 3), 2 * i, np.float32))
    assert model.calls == [1, 4, 4]
    batcher.close()


def test_request_that_cannot_join_ends_the_wait():
    """A request of another per-sample shape wakes the worker at once: the partial batch runs, then it."""
    model, batcher = _primed(4)
    waiting = batcher.submit({"x": np.ones((1, 3), np.float32)})
    _wait_filling(batcher, missing=3)
    other = batcher.submit({"x": np.ones((1, 5), np.float32)})
    assert waiting.result(10)["y"].shape == (1, 3)
    assert other.result(10)["y"].shape == (1, 5)
    assert model.calls == [1, 4, 1, 1]
    batcher.close()


def test_reconfigure_wakes_a_worker_filling_a_batch():
    """Lowering max_batch while the worker waits for a bigger batch lets the smaller batch run at once."""
    model, batcher = _primed(4)
    waiting = batcher.submit({"x": np.ones((1, 3), np.float32)})
    _wait_filling(batcher, missing=3)
    batcher.reconfigure(max_batch=2)
    second = batcher.submit({"x": np.ones((1, 3), np.float32)})
    assert waiting.result(10)["y"].shape == (1, 3) and second.result(10)["y"].shape == (1, 3)
    assert model.calls == [1, 4, 2]
    batcher.close()


def test_the_worker_survives_a_failure_outside_the_model():
    """A bug in the batch path (not the model's own error) fails that batch's requests; the next request is served."""
    class Broken(Batcher):
        failures = 1

        def _execute(self, batch):
            if Broken.failures:
                Broken.failures -= 1
                raise RuntimeError("bug in the batch path")
            super()._execute(batch)

    batcher = Broken(FakeModel(), "fake", max_batch=4, max_delay_ms=0, max_queue=64)
    with pytest.raises(RuntimeError, match="bug in the batch path"):
        batcher.submit({"x": np.ones((1, 3), np.float32)}).result(5)
    assert batcher.submit({"x": np.ones((1, 3), np.float32)}).result(5)["y"].shape == (1, 3)
    assert batcher.close()
