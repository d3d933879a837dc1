"""Graphs with control flow (If, Loop) survive every SDK step; a step ONNX Runtime would refuse is undone."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort

import tiny_models
from edgeopt.sdk.package import PackageReader
from edgeopt.sdk.pipeline import PackageRequest, prepare


def _run(path_or_bytes, feed):
    return ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_if_and_loop_model_keeps_loading_after_every_step(cli, tmp_path):
    model = tiny_models.control_flow_model(tmp_path / "cf.onnx")
    rng = np.random.default_rng(0)
    per_sample = {}
    for i in range(12):
        per_sample[f"{i}/x"] = rng.standard_normal((2, 8)).astype(np.float32)
        per_sample[f"{i}/flag"] = np.array(bool(i % 2))
    np.savez(tmp_path / "calib.npz", **per_sample)
    # shapes fixed (--input-shape), simplified (graph level all), quantized (int8), packed: each step's output
    # must still load and compute what the original computes, through both branches of the If
    code, out, err = cli("package", model, "--profile", "cpu", "--runtime", "onnxruntime", "--calib",
                         tmp_path / "calib.npz", "--input-shape", "x:2,8", "--no-sign", "--iterations", "5",
                         "-o", tmp_path / "cf.eopkg", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["validation"]["passed"]
    with PackageReader(tmp_path / "cf.eopkg") as pkg:
        packed = pkg.read(pkg.manifest.model_file)
    kinds = {n.op_type for n in onnx.load_from_string(packed).graph.node}
    assert {"If", "Loop"} <= kinds, kinds
    for flag in (True, False):
        feed = {"x": per_sample["0/x"], "flag": np.array(flag)}
        np.testing.assert_allclose(_run(packed, feed), _run(str(model), feed), rtol=0.1, atol=0.1)


def test_a_simplification_onnx_runtime_refuses_is_undone(tmp_path, monkeypatch):
    from edgeopt.sdk.pipeline import prepared as prepared_module
    from edgeopt.sdk.pipeline.optimize import GraphReport

    model = tiny_models.control_flow_model(tmp_path / "cf.onnx")

    def broken_simplify(m, level):
        # Passes the ONNX checker, but the If's branches now disagree on their output type: ONNX Runtime
        # refuses to load it (what a shape-inference bug in a sub-graph looks like).
        bad = onnx.ModelProto()
        bad.CopyFrom(m)
        node = next(n for n in bad.graph.node if n.op_type == "If")
        then = next(a for a in node.attribute if a.name == "then_branch").g
        then.node.append(onnx.helper.make_node("Cast", ["t_out"], ["t_int"], to=onnx.TensorProto.INT64))
        then.output[0].name = "t_int"
        return bad, GraphReport(level, len(m.graph.node), len(bad.graph.node))

    monkeypatch.setattr(prepared_module, "simplify", broken_simplify)
    req = PackageRequest(model=model, profile="cpu", calib="random", runtime="onnxruntime", precision="fp32")
    with prepare(req) as prep:
        path, report = prep.fp32_model("all")
        assert any("graph simplification (all) undone: ONNX Runtime refuses the simplified model" in d
                   for d in prep.decisions), prep.decisions
        assert "kept as is" in report.note
        feed = {"x": np.ones((2, 8), np.float32), "flag": np.array(True)}
        np.testing.assert_allclose(_run(str(path), feed), _run(str(model), feed), rtol=1e-6)
