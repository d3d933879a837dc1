"""The real voice-activity model (Silero VAD, from the silero-vad wheel) packaged from speech-like sequences
made in the test, judged per frame and per segment; its If/LSTM graph through --input-shape; a second real
stateful export (two fixed-batch LSTM states) from the same wheel."""
from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest

from edgeopt.sdk.package import PackageReader
from edgeopt.sdk.pipeline import PackageRequest, build_package, prepare
from edgeopt.sdk.pipeline.golden import read_golden
from edgeopt.sdk.stateful import StatePair


def test_vad_packaged_from_sequences_and_judged_per_frame(vad_package):
    summary, manifest = vad_package["summary"], vad_package["manifest"]
    v = summary["validation"]
    assert v["task"] == "vad" and v["passed"], v["failures"]
    names = [c["name"] for c in v["checks"]]
    assert "frame decision agreement (output >= 0.5)" in names and "speech segment F1" in names
    agreement = next(c for c in v["checks"] if c["name"].startswith("frame decision"))
    assert agreement["optimized"] >= 0.99 and agreement["bound"] == 0.99
    # the held-out streams really hold speech the fp32 model finds, and silence around it
    assert v["figures"]["fp32_segments"] >= 4 and v["figures"]["frames"] == 2 * 187
    assert manifest.state == [StatePair(input="state", output="stateN", batch_axis=1)]
    assert any("held out the last 2 of 12 calibration sequences" in d for d in summary["decisions"])
    # ONNX Runtime's quantizer does not enter the If's sub-graphs: the "int8" package says it computes in float
    assert any(re.search(r"no tensor was quantized \(ONNX Runtime's quantizer leaves the \d+ control-flow "
                         r"sub-graph\(s\) in float\): this int8 package computes in float", d)
               for d in summary["decisions"]), summary["decisions"]
    assert summary["calibration"]["samples"] == 10 * 187  # the steps of the 10 calibration sequences
    with PackageReader(vad_package["path"]) as pkg:
        golden = read_golden(pkg.read("golden.npz"))
    assert len(golden) == 2  # the first step of each held-out sequence (their state is the data's own)
    assert all(not g[0]["state"].any() for g in golden)


def test_vad_input_shape_that_breaks_its_if_graph_is_undone(cli, tmp_path, vad_model, vad_sequences):
    code, out, err = cli("package", vad_model, "--profile", "cpu", "--calib", vad_sequences, "--precision", "fp32",
                         "--input-shape", "input:1,576", "--input-shape", "state:2,1,128", "--no-sign",
                         "--iterations", "5", "-o", tmp_path / "vad.eopkg")
    assert code == 0, err
    flat = " ".join(err.split())
    assert ("--input-shape for input undone: ONNX Runtime refuses the model with it fixed (Node (If_0) Op (If) "
            "[TypeInferenceError]") in flat
    assert "First input tensor must have rank 3" in flat and "its If sub-graphs keep their dynamic dims" in flat
    assert "input state fixed to [2,1,128]" in flat
    with PackageReader(tmp_path / "vad.eopkg") as pkg:
        assert [s.shape for s in pkg.manifest.inputs if s.name == "state"][0][1] == 1
        ort.InferenceSession(pkg.read(pkg.manifest.model_file))  # the packaged model loads


def test_vad_random_data_grows_to_a_length_the_model_runs(vad_model):
    req = PackageRequest(model=vad_model, profile="cpu", calib="random", runtime="onnxruntime", precision="fp32",
                         heldout_samples=4)
    with prepare(req) as prep:
        assert prep.heldout.samples[0]["input"].shape == (1, 256)
        assert prep.heldout.samples[0]["state"].shape == (2, 1, 128)
        assert any("dynamic dims set to 256, the smallest size the fp32 model runs (tried 1, 16, 64, 256)" in d
                   for d in prep.decisions)


@pytest.fixture(scope="module")
def hc_sequences(tmp_path_factory):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("speech_assets", Path(__file__).parents[1] / "assets" / "speech.py")
    speech = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speech)
    arrays = {}
    for s in range(6):
        audio, _ = speech.speech_like(3.0, 50 + s)
        for t, frame in enumerate(speech.frames(audio)):
            arrays[f"{s}/{t}/input"] = frame[None, :]  # sequence_length 1: one frame per step
    path = tmp_path_factory.mktemp("hc") / "hc.npz"
    np.savez(path, **arrays)
    return path


def test_second_real_stateful_model_with_two_fixed_states(vad_hc_model, hc_sequences, tmp_path):
    result = build_package(PackageRequest(model=vad_hc_model, profile="cpu", calib=hc_sequences,
                                          runtime="onnxruntime", unsigned=True, bench_iterations=5,
                                          output=tmp_path / "hc.eopkg"))
    m = result.manifest
    assert [(p.input, p.output, p.batch_axis) for p in m.state] == [("h", "hn", None), ("c", "cn", None)]
    assert m.validation.task == "vad" and m.validation.passed, m.validation.failures
    # state carried by the fp32 reference over a whole stream equals running the model step by step
    sess = ort.InferenceSession(str(vad_hc_model))
    data = np.load(hc_sequences)
    h = c = np.zeros((1, 1, 128), np.float32)
    probs = []
    for t in range(93):
        p, h, c = sess.run(None, {"input": data[f"5/{t}/input"], "h": h, "c": c})
        probs.append(float(p.reshape(-1)[0]))
    assert max(probs) > 0.5 > min(probs)  # speech and silence in the stream
