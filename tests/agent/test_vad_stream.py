"""The real voice-activity model end to end on the agent: the package made from per-sample sequences is
installed (hashes, signature, golden self-test), served, and streamed by 16 concurrent tritonclient
clients with sequence ids; each stream's decisions equal running the model alone on that stream."""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np
import pytest

from edgeopt.agent.installer import Installer
from edgeopt.agent.registry import BatchLimits, ModelRegistry
from edgeopt.agent.runtimes import get_runtime
from edgeopt.agent.server import InferenceServer
from edgeopt.agent.store import Store

STREAMS = 16
SECONDS = 2.5  # 78 chunks of 32 ms per stream


def _speech():
    spec = importlib.util.spec_from_file_location("speech_assets", Path(__file__).parents[1] / "assets" / "speech.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _alone(model_path: Path, frames: np.ndarray) -> np.ndarray:
    """The model by itself on one stream (its own session, state carried step by step)."""
    model = get_runtime("onnxruntime").load(model_path, device="CPUExecutionProvider", threads=1)
    try:
        state, probs = np.zeros((2, 1, 128), np.float32), []
        for frame in frames:
            out = model.infer({"input": frame[None, :], "state": state, "sr": np.array(16000, np.int64)})
            state = out["stateN"]
            probs.append(out["output"][0, 0])
        return np.array(probs)
    finally:
        model.close()


def test_sixteen_tritonclient_streams_each_equal_the_model_alone(tmp_path, agent_config, events, vad_package):
    import tritonclient.http as httpclient  # in the `test` extra

    config = agent_config(trusted_keys=[str(vad_package["public_key"])])
    registry = ModelRegistry(limits=BatchLimits(max_batch=16, max_delay_ms=2, max_sequences=64))
    installer = Installer(Store(config.state_dir), config, on_event=events,
                          on_switch=lambda m, loaded: registry.swap(m.name, m.version, loaded, m.manifest))
    installed = installer.install_file(vad_package["path"])
    assert ("self_test", True) in events.kinds()
    entry = registry.get("vad")
    assert entry.sequences is not None and entry.sequences.max_batch == 16
    server = InferenceServer(registry, "127.0.0.1", 0).start()
    host, port = server.address
    speech = _speech()
    streams = [speech.frames(speech.speech_like(SECONDS, 500 + k)[0]) for k in range(STREAMS)]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    ready = threading.Barrier(STREAMS)

    def client(k: int) -> None:
        try:
            c = httpclient.InferenceServerClient(f"{host}:{port}")
            ready.wait(30)
            probs = []
            for t, frame in enumerate(streams[k]):
                audio = httpclient.InferInput("input", [1, frame.size], "FP32")
                audio.set_data_from_numpy(frame[None, :], binary_data=True)
                rate = httpclient.InferInput("sr", [], "INT64")
                rate.set_data_from_numpy(np.array(16000, np.int64), binary_data=True)
                r = c.infer("vad", [audio, rate], sequence_id=1000 + k, sequence_start=t == 0,
                            sequence_end=t == len(streams[k]) - 1)
                probs.append(r.as_numpy("output")[0, 0])
            results[k] = np.array(probs)
            c.close()
        except BaseException as exc:  # reported below with the stream's number
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(STREAMS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors[:3]
        model_file = Store(config.state_dir).current("vad").path / installed.manifest.model_file
        speech_frames = 0
        for k in range(STREAMS):
            alone = _alone(model_file, streams[k])
            # the decision of every frame equals the model's alone; probabilities within float rounding
            np.testing.assert_array_equal(results[k] >= 0.5, alone >= 0.5, err_msg=f"stream {k}")
            np.testing.assert_allclose(results[k], alone, atol=1e-4, err_msg=f"stream {k}")
            speech_frames += int((alone >= 0.5).sum())
        assert speech_frames > 0.2 * STREAMS * len(streams[0])  # the streams hold speech, not only silence
        mm = registry.metrics.model("vad")
        assert max(mm.total_batches) > 1, mm.total_batches  # the streams were batched together
        assert entry.sequences.live == 0  # every stream sent sequence_end
    finally:
        server.stop()
        registry.close()
