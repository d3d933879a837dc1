"""Backends on generated models: opset upgrade, pre-processing fallback, weight-only, layer probes, registry."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import tiny_models
from edgeopt.sdk.backends import BuildJob, get_backend
from edgeopt.sdk.backends import onnxruntime as ort_backend
from edgeopt.sdk.errors import MissingDependencyError, UnsupportedError
from edgeopt.sdk.pipeline.data import random_samples
from edgeopt.sdk.pipeline.shapes import InputSpec
from edgeopt.sdk.profile import load_profile


def _job(tmp_path, source, precision, float_layers=(), profile="cpu", runtime="onnxruntime"):
    prof = load_profile(profile)
    work = tmp_path / "work" / precision
    work.mkdir(parents=True, exist_ok=True)
    calib = random_samples([InputSpec("input", "float32", (1, 1, 8, 8))], 16, seed=3).samples
    return BuildJob(source=source, source_format="onnx", precision=precision, graph_level="all", workdir=work,
                    profile=prof, runtime_options=next(r for r in prof.runtimes if r.runtime == runtime),
                    calibration=calib, float_layers=list(float_layers))


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def test_opset11_model_is_upgraded_for_per_channel_qdq(tmp_path):
    src = tiny_models.tiny_cnn(tmp_path / "old.onnx", opset=11)
    art = get_backend("onnxruntime").build(_job(tmp_path, src, "int8"))
    model = onnx.load(str(art.model_file))
    opset = next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
    assert opset >= 13
    axes = [a.i for n in model.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]
    assert axes, "per-channel DequantizeLinear expected"
    x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    ref = _run(src, x)
    got = _run(art.model_file, x)  # ONNX Runtime accepts its own quantized graph
    cos = float((ref * got).sum() / (np.linalg.norm(ref) * np.linalg.norm(got)))
    assert cos > 0.99


def test_preprocess_retries_without_symbolic_shape_inference(tmp_path, monkeypatch):
    import onnxruntime.quantization.shape_inference as si

    calls = []
    real = si.quant_pre_process

    def flaky(src, out, skip_optimization=False, skip_symbolic_shape=False, **kw):
        calls.append(skip_symbolic_shape)
        if not skip_symbolic_shape:
            raise Exception("Incomplete symbolic shape inference")
        return real(src, out, skip_optimization=skip_optimization, skip_symbolic_shape=True)

    monkeypatch.setattr(si, "quant_pre_process", flaky)
    src = tiny_models.tiny_cnn(tmp_path / "m.onnx")
    assert ort_backend.preprocess(src, tmp_path / "pre.onnx") == "no-symbolic"
    assert calls == [False, True]
    onnx.checker.check_model(onnx.load(str(tmp_path / "pre.onnx")))


def test_preprocess_gives_up_quietly(tmp_path, monkeypatch):
    import onnxruntime.quantization.shape_inference as si

    def broken(*a, **k):
        raise RuntimeError("nope")

    monkeypatch.setattr(si, "quant_pre_process", broken)
    src = tiny_models.tiny_cnn(tmp_path / "m.onnx")
    assert ort_backend.preprocess(src, tmp_path / "pre.onnx") == "none"
    assert (tmp_path / "pre.onnx").read_bytes() == src.read_bytes()


def test_weight_only_int8_onnxruntime(tmp_path):
    src = tiny_models.tiny_cnn(tmp_path / "m.onnx")
    art = get_backend("onnxruntime").build(_job(tmp_path, src, "int8-weight-only"))
    model = onnx.load(str(art.model_file))
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    assert len(int8) == 3  # conv1, conv2, fc weights
    x = np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(_run(art.model_file, x), _run(src, x), atol=0.05)


def _io_types(path) -> tuple[list[int], list[int]]:
    g = onnx.load(str(path)).graph
    return [i.type.tensor_type.elem_type for i in g.input], [o.type.tensor_type.elem_type for o in g.output]


def test_fp16_keeps_float32_io_unless_the_profile_asks_for_fp16_inputs(tmp_path):
    src = tiny_models.tiny_cnn(tmp_path / "m.onnx")
    x = np.random.default_rng(2).random((1, 1, 8, 8), dtype=np.float32)
    F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16

    job = _job(tmp_path, src, "fp16", profile="gpu")
    job.runtime_options = job.runtime_options.model_copy(update={"fp16_inputs": False})
    plain = get_backend("onnxruntime").build(job)
    assert _io_types(plain.model_file) == ([F32], [F32])
    out = _run(plain.model_file, x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, _run(src, x), atol=0.02)

    # the shipped gpu profile: float16 inputs (no Cast at the input edge), float32 outputs
    job = _job(tmp_path / "g", src, "fp16", profile="gpu")
    assert job.runtime_options.fp16_inputs
    art = get_backend("onnxruntime").build(job)
    assert _io_types(art.model_file) == ([F16], [F32])
    out16 = _run(art.model_file, x.astype(np.float16))
    assert out16.dtype == np.float32
    np.testing.assert_allclose(out16, _run(src, x), atol=0.02)
    assert any("inputs in float16" in n for n in art.notes)


def test_layers_and_probe_onnxruntime(tmp_path):
    src = tiny_models.tiny_cnn(tmp_path / "m.onnx")
    backend = get_backend("onnxruntime")
    layers = {l.name: l for l in backend.layers(src)}
    assert {"conv1", "conv2", "gap", "fc"} <= set(layers)
    assert {"conv1", "relu1", "conv2", "gap", "flatten", "fc"} <= set(layers)
    assert layers["conv2"].upstream == ["relu1"] and layers["fc"].upstream == ["flatten"]
    probe = backend.layer_probe(src, list(layers.values()))
    outs = probe({"input": np.ones((1, 1, 8, 8), np.float32)})
    assert outs["conv1"].shape == (1, 8, 8, 8) and outs["fc"].shape == (1, 10)


def test_openvino_float_layers_are_ignored_by_nncf(tmp_path):
    src = tiny_models.tiny_cnn(tmp_path / "m.onnx")
    backend = get_backend("openvino")
    job = _job(tmp_path, src, "int8", runtime="openvino")
    names = [l.name for l in backend.layers(backend.layer_reference(job))]
    assert names
    job.float_layers = names
    art = backend.build(job)
    import openvino as ov

    model = ov.Core().read_model(str(art.model_file))
    assert not [op for op in model.get_ops() if op.get_type_name() == "FakeQuantize"]
    assert art.runtime_options == {"INFERENCE_PRECISION_HINT": "f32"}


def test_unknown_and_missing_backends(monkeypatch):
    from edgeopt.sdk import backends

    with pytest.raises(UnsupportedError) as err:
        get_backend("tensorrt")
    assert err.value.one_line() == "unknown runtime 'tensorrt'; known: openvino, onnxruntime, tflite, torch-aoti"
    monkeypatch.setitem(backends.REGISTRY, "openvino", ("edgeopt_no_such_module:Backend", "sdk"))
    with pytest.raises(MissingDependencyError) as err:
        get_backend("openvino")
    assert err.value.one_line() == ("runtime 'openvino' is not installed (edgeopt_no_such_module cannot be imported) "
                                    "(install it with: pip install 'edgeopt[sdk]')")


def test_openvino_bypassing_activation_quantizers(tmp_path):
    import openvino as ov

    src = tiny_models.tiny_cnn(tmp_path / "m.onnx")
    backend = get_backend("openvino")
    art = backend.build(_job(tmp_path, src, "int8", runtime="openvino"))
    points = backend.revert_points(art.model_file)
    assert points and all(p.count("/fq_") == 1 for p in points)
    feeds = random_samples([InputSpec("input", "float32", (1, 1, 8, 8))], 2, seed=5).samples
    scores = backend.score_reverts(art.model_file, feeds, lambda outs: float(len(outs)), [[p] for p in points])
    assert scores == [2.0] * len(points)
    out = tmp_path / "reverted"
    out.mkdir()
    reverted = backend.build_reverted(art.model_file, points, out, "int8")
    model = ov.Core().read_model(str(reverted.model_file))
    left = [op for op in model.get_ops() if op.get_type_name() == "FakeQuantize"
            and op.input_value(0).get_node().get_type_name() not in ("Constant", "Convert")]
    assert not left and reverted.float_layers and reverted.runtime_options == {"INFERENCE_PRECISION_HINT": "f32"}


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_bypassing_every_activation_quantizer_moves_outputs_to_fp32(tmp_path, runtime):
    """The bypass takes effect (outputs change) and keeps the network intact: with every activation quantizer
    bypassed (weights stay int8) the error to fp32 stays of the int8 model's order. A bypass that dropped the
    Relu ONNX Runtime's quantizer folds into its uint8 range made it 90x the int8 error."""
    from edgeopt.agent.runtimes import get_runtime

    src = tiny_models.tiny_cnn(tmp_path / "m.onnx")
    backend = get_backend(runtime)
    art = backend.build(_job(tmp_path, src, "int8", runtime=runtime))
    points = backend.revert_points(art.model_file)
    assert len(points) >= 3
    feeds = random_samples([InputSpec("input", "float32", (1, 1, 8, 8))], 4, seed=5).samples
    fp32 = get_runtime("onnxruntime").load(src, device="CPUExecutionProvider")
    ref = [fp32.infer(f) for f in feeds]
    fp32.close()

    def error(outs):
        return float(sum(np.abs(o[k] - r[k]).sum() for o, r in zip(outs, ref) for k in r))

    none, one, every = backend.score_reverts(art.model_file, feeds, error, [[], points[:1], points])
    assert none > 0 and every != none and one != none
    assert every < 3 * none
    layers = backend.revert_layers(art.model_file)
    assert set(layers) >= set(points) and all(layers[p] for p in points)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_revert_consumers_name_the_weighted_layers_a_quantizer_feeds(tmp_path, runtime):
    src = tiny_models.tiny_cnn(tmp_path / "m.onnx")
    backend = get_backend(runtime)
    art = backend.build(_job(tmp_path, src, "int8", runtime=runtime))
    consumers = backend.revert_consumers(art.model_file)
    assert set(consumers) >= set(backend.revert_points(art.model_file))
    fed = sorted({layer for layers in consumers.values() for layer in layers})
    # every Conv/Gemm of the tiny CNN reads some quantized activation
    assert len(fed) == 3, consumers


def test_openvino_reverting_every_layer_with_reference_weights_is_fp32(tmp_path):
    """Layer revert points: the layer's fp32 weights come back from the reference IR and its input quantizer is
    bypassed. With every point reverted the int8 IR computes what fp32 does."""
    from edgeopt.agent.runtimes import get_runtime

    src = tiny_models.tiny_cnn(tmp_path / "m.onnx")
    backend = get_backend("openvino")
    job = _job(tmp_path, src, "int8", runtime="openvino")
    art = backend.build(job)
    layers = [p for p in backend.revert_points(art.model_file, layers=True)
              if p not in backend.revert_points(art.model_file)]
    assert len(layers) == 3 and backend.revert_consumers(art.model_file)[layers[0]] == [layers[0]]
    feeds = random_samples([InputSpec("input", "float32", (1, 1, 8, 8))], 4, seed=5).samples
    fp32 = get_runtime("onnxruntime").load(src, device="CPUExecutionProvider")
    ref = [fp32.infer(f) for f in feeds]
    fp32.close()

    def error(outs):
        return float(sum(np.abs(o[k] - r[k]).sum() for o, r in zip(outs, ref) for k in r))

    everything = backend.revert_points(art.model_file, layers=True)
    int8, restored = backend.score_reverts(art.model_file, feeds, error, [[], everything],
                                           backend.layer_reference(job))
    assert restored < 1e-3 < int8
    out = tmp_path / "rev"
    out.mkdir()
    reverted = backend.build_reverted(art.model_file, layers, out, "int8", backend.layer_reference(job))
    assert sorted(reverted.float_layers) == sorted(layers)
