"""Unit tests for the pipeline stages (shapes, data, accuracy, golden, benchmark, graph optimization)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgeopt.sdk.errors import InputError, UnsupportedError
from edgeopt.sdk.package import LatencyStats
from edgeopt.sdk.pipeline import accuracy, benchmark, data, golden, shapes
from edgeopt.sdk.pipeline.optimize import simplify
from edgeopt.sdk.pipeline.types import ImagePreprocessing
from edgeopt.sdk.profile import AccuracyBudget, load_profile

SPEC = shapes.InputSpec("input", "float32", ("N", 1, 8, 8))


# ----------------------------------------------------------------------------- shapes


def test_parse_input_shape():
    assert shapes.parse_input_shape("images:1,3,224,224") == ("images", [1, 3, 224, 224])
    assert shapes.parse_input_shape("a:b:1,2") == ("a:b", [1, 2])
    for bad in ("images", "images:1,x", ":1,2", "images:0,3"):
        with pytest.raises(InputError) as err:
            shapes.parse_input_shape(bad)
        assert err.value.one_line() == (f"--input-shape {bad!r} is not NAME:D1,D2,... "
                                        "(e.g. --input-shape images:1,3,224,224)")


def test_fix_onnx_shapes_sets_dims_and_checks(tiny_model):
    model = onnx.load(str(tiny_model))
    notes = shapes.fix_onnx_shapes(model, {"input": [2, 1, 8, 8]}, "tiny.onnx")
    assert notes == ["input input fixed to [2,1,8,8]"]
    assert shapes.onnx_input_specs(model)[0].shape == (2, 1, 8, 8)
    with pytest.raises(InputError, match=r"--input-shape names input 'x', but tiny.onnx has inputs 'input'"):
        shapes.fix_onnx_shapes(onnx.load(str(tiny_model)), {"x": [1, 1, 8, 8]}, "tiny.onnx")
    with pytest.raises(InputError, match=r"gives 3 dims, but the input has rank 4 \(shape \[N,1,8,8\]\)"):
        shapes.fix_onnx_shapes(onnx.load(str(tiny_model)), {"input": [1, 8, 8]}, "tiny.onnx")
    with pytest.raises(InputError) as err:
        shapes.fix_onnx_shapes(onnx.load(str(tiny_model)), {"input": [1, 1, 9, 8]}, "tiny.onnx")
    assert err.value.one_line() == "--input-shape input: dim 2 is fixed to 8 in the model, found 9 (use input:N,1,8,8)"


def test_static_policy_names_each_dynamic_dim():
    spec = shapes.InputSpec("images", "float32", ("batch", 3, "height", "width"))
    with pytest.raises(UnsupportedError) as err:
        shapes.enforce_policy([spec], load_profile("npu"))
    assert err.value.one_line() == (
        "profile 'npu' needs static shapes, but the model has dynamic dims: input 'images' [batch,3,height,width]: "
        "dim 0 (batch), dim 2 (height), dim 3 (width) (fix them with --input-shape images:1,3,HEIGHT,WIDTH)")
    assert shapes.enforce_policy([spec], load_profile("cpu")) == [
        "input images keeps dynamic dims [batch,3,height,width] (profile cpu allows them)"]


# ----------------------------------------------------------------------------- data


def test_npz_samples_split_along_axis0(tmp_path):
    x = np.random.default_rng(0).random((10, 1, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "c.npz", input=x, labels=np.arange(10))
    s = data.load_npz(tmp_path / "c.npz", [SPEC], "calibration")
    assert len(s) == 10 and s.samples[3]["input"].shape == (1, 1, 8, 8)
    np.testing.assert_array_equal(s.samples[3]["input"][0], x[3])
    assert s.labels.tolist() == list(range(10)) and len(s.sha256) == 64
    calib, held = data.split_heldout(s, 64)
    assert len(calib) == 8 and len(held) == 2 and held.labels.tolist() == [8, 9]
    np.testing.assert_array_equal(held.samples[0]["input"][0], x[8])


def test_npz_float64_is_cast_but_ints_are_refused(tmp_path):
    np.savez(tmp_path / "c.npz", input=np.zeros((4, 1, 8, 8)))
    assert data.load_npz(tmp_path / "c.npz", [SPEC], "calibration").samples[0]["input"].dtype == np.float32
    np.savez(tmp_path / "u8.npz", input=np.zeros((4, 1, 8, 8), np.uint8))
    with pytest.raises(InputError) as err:
        data.load_npz(tmp_path / "u8.npz", [SPEC], "calibration")
    assert err.value.one_line() == ("calibration array 'input' has dtype uint8, but the input takes float32 "
                                    "(convert it with array.astype('float32') after your preprocessing)")


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((4, 1, 8, 8), np.float32)},
     "calibration file c.npz has arrays ['x'], but the model's inputs are ['input'] (missing ['input']) "
     "(unexpected ['x']) (key each array by the model input name (plus optional 'labels'))"),
    ({"input": np.zeros((4, 1, 9, 8), np.float32)},
     "calibration array 'input' has shape [4, 1, 9, 8], but the input needs [?,1,8,8] (dim 2: expected 8, found 9) "
     "(preprocess the samples to the model's input shape (samples along axis 0), or fix a dynamic dim with "
     "--input-shape)"),
    ({"input": np.zeros((4, 8, 8), np.float32)},
     "calibration array 'input' has shape [4, 8, 8], but the input has rank 4 (shape [?,1,8,8]); "
     "samples go along axis 0 (for inputs whose batch is not on axis 0 (or scalars), key one feed per sample as "
     "'<i>/<input>' (or '<seq>/<step>/<input>' for sequences))"),
])
def test_npz_mismatch_messages(tmp_path, arrays, message):
    np.savez(tmp_path / "c.npz", **arrays)
    with pytest.raises(InputError) as err:
        data.load_npz(tmp_path / "c.npz", [SPEC], "calibration")
    assert err.value.one_line() == message


def test_not_an_npz(tmp_path):
    (tmp_path / "c.npz").write_text("hello")
    with pytest.raises(InputError, match=r"calibration file c.npz is not a readable .npz"):
        data.load_npz(tmp_path / "c.npz", [SPEC], "calibration")


def test_image_folder_preprocessing(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[..., 0] = 255  # pure red
    for i in range(3):
        Image.fromarray(pixels).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("ignored")
    spec = shapes.InputSpec("images", "float32", ("N", 3, 10, 12))
    s = data.load_images(folder, [spec], ImagePreprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)), "calibration")
    assert len(s) == 3 and s.samples[0]["images"].shape == (1, 3, 10, 12)
    np.testing.assert_allclose(s.samples[0]["images"][0, :, 5, 5], [1.0, -1.0, -1.0])
    bgr = data.load_images(folder, [spec], ImagePreprocessing(channel_order="BGR"), "calibration")
    np.testing.assert_allclose(bgr.samples[0]["images"][0, :, 5, 5], [0.0, 0.0, 1.0])
    nhwc = shapes.InputSpec("images", "float32", (1, 10, 12, 3))
    s2 = data.load_images(folder, [nhwc], None, "calibration")
    assert s2.samples[0]["images"].shape == (1, 10, 12, 3)
    with pytest.raises(InputError, match="holds no images"):
        data.load_images(tmp_path, [spec], None, "calibration")


def test_random_samples_follow_specs():
    s = data.random_samples([SPEC, shapes.InputSpec("ids", "int64", (1, 5))], 3, seed=1)
    assert len(s) == 3 and s.samples[0]["input"].shape == (1, 1, 8, 8) and s.samples[0]["ids"].dtype == np.int64


# ----------------------------------------------------------------------------- accuracy


def _outs(rows):
    return [{"logits": np.asarray([r], np.float32)} for r in rows]


def test_compare_identical_passes_and_perturbed_fails():
    budget = AccuracyBudget()
    ref = _outs([[1, 2, 3], [3, 1, 0], [0, 5, 1]])
    same = accuracy.compare(ref, ref, budget)
    assert same.passed and same.min_cosine == pytest.approx(1.0) and same.top1_agreement == 1.0
    bad = accuracy.compare(ref, _outs([[1, 2, 3], [0, 1, 3], [0, 5, 1]]), budget)
    assert not bad.passed and bad.top1_agreement == pytest.approx(2 / 3) and bad.task == "classify"
    assert bad.failures == ["top-1 agreement 0.6667 < 0.99"]  # a classifier is judged by its top-1, not cosine
    assert bad.min_cosine < 0.9
    assert bad.max_abs_error == pytest.approx(3.0)


def test_compare_with_labels_uses_task_metric():
    ref = _outs([[1, 0], [0, 1], [1, 0], [0, 1]])
    opt = _outs([[1, 0], [0, 1], [1, 0], [1, 0.9]])
    r = accuracy.compare(ref, opt, AccuracyBudget(), labels=np.array([0, 1, 0, 1]))
    assert r.metric.fp32 == 100.0 and r.metric.optimized == 75.0 and r.metric.drop == 25.0
    assert r.failures == ["accuracy dropped 25 (100 -> 75), budget 1"] and not r.passed


def test_compare_nan_fails():
    ref = _outs([[1, 2]])
    r = accuracy.compare(ref, _outs([[np.nan, 2]]), AccuracyBudget())
    assert "the optimized model produced NaN or infinite values" in r.failures


def test_layer_errors_rank_by_added_error():
    from edgeopt.sdk.backends.base import Layer

    layers = [Layer("a", "a", []), Layer("b", "b", ["a"]), Layer("c", "c", ["b"])]
    base = {"a": np.array([1.0, 0.0]), "b": np.array([1.0, 0.0]), "c": np.array([1.0, 0.0])}
    # a adds a little error, b a lot, c none beyond b
    noisy = {"a": np.array([1.0, 0.05]), "b": np.array([1.0, 0.8]), "c": np.array([1.0, 0.8])}
    ranked = accuracy.layer_errors(layers, lambda f: base, lambda f: noisy, [{}])
    assert [e.layer for e in ranked][0] == "b" and ranked[-1].layer == "c" and ranked[-1].error == pytest.approx(0.0)


# ----------------------------------------------------------------------------- golden, benchmark


def test_golden_roundtrip():
    inputs = [{"input": np.ones((1, 1, 8, 8), np.float32) * i} for i in range(3)]
    outputs = [{"logits": np.arange(10, dtype=np.float32)[None] + i} for i in range(3)]
    blob, spec = golden.make_golden(inputs, outputs, max_abs_error=0.01, min_cosine=0.99)
    assert spec.count == 3 and spec.atol == pytest.approx(0.02) and spec.file == "golden.npz"
    back = golden.read_golden(blob)
    assert len(back) == 3
    np.testing.assert_array_equal(back[2][0]["input"], inputs[2]["input"])
    np.testing.assert_array_equal(back[1][1]["logits"], outputs[1]["logits"])


class _FakeModel:
    def __init__(self):
        self.calls = 0

    def infer(self, feeds):
        self.calls += 1
        return {"y": feeds["x"]}


def test_measure_interleaves_and_counts():
    a, b = _FakeModel(), _FakeModel()
    feeds = {"x": np.zeros((2, 3), np.float32)}
    stats = benchmark.measure({"a": a, "b": b}, {"a": feeds, "b": feeds}, batch=2, iterations=20, warmup=2, rounds=4)
    assert a.calls == b.calls == 22
    assert isinstance(stats["a"], LatencyStats) and stats["a"].iterations == 20
    assert stats["a"].p50_ms <= stats["a"].p90_ms <= stats["a"].p99_ms


def test_batch_feeds_repeats_rows_unless_static():
    f = {"x": np.arange(3, dtype=np.float32).reshape(1, 3)}
    assert benchmark.batch_feeds(f, 4, static_batch=False)["x"].shape == (4, 3)
    assert benchmark.batch_feeds(f, 4, static_batch=True)["x"].shape == (1, 3)


def test_threads_policy(tmp_path):
    assert benchmark.profile_threads(load_profile("cpu")) is None


# ----------------------------------------------------------------------------- graph


def test_simplify_folds_constants(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    # y = x + (a * b): the product of two constants folds away.
    nodes = [helper.make_node("Mul", ["a", "b"], ["ab"], name="mul"),
             helper.make_node("Add", ["x", "ab"], ["y"], name="add"),
             helper.make_node("Identity", ["y"], ["z"], name="id")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
                          [numpy_helper.from_array(np.ones(2, np.float32), "a"),
                           numpy_helper.from_array(np.ones(2, np.float32) * 2, "b")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    slim, report = simplify(model, "all")
    assert report.nodes_before == 3 and report.nodes_after == 1
    assert report.line() == "graph (all): 3 -> 1 nodes"
    _, none = simplify(model, "none")
    assert none.nodes_after == 3 and none.note == "simplifier off"


def test_layer_errors_keep_unmeasured_layers_last():
    from edgeopt.sdk.backends.base import Layer

    layers = [Layer("a", "a", []), Layer("gone", "gone", ["a"])]
    ranked = accuracy.layer_errors(layers, lambda f: {"a": np.ones(2)}, lambda f: {"a": np.array([1.0, 0.5])}, [{}])
    assert [e.layer for e in ranked] == ["a", "gone"] and ranked[1].error == 0.0


def test_public_functions_are_not_shadowed_by_submodules():
    """A submodule named like a public function would replace it on the package once imported."""
    import importlib
    import pkgutil

    import edgeopt.sdk.pipeline as pipeline

    for info in pkgutil.iter_modules(pipeline.__path__):
        importlib.import_module(f"edgeopt.sdk.pipeline.{info.name}")
    for name in ("prepare", "candidates_for", "evaluate", "pick", "build_package", "export_torch"):
        assert callable(getattr(pipeline, name)), name


def test_module_groups_follow_the_exporters_module_paths():
    from edgeopt.sdk.pipeline.evaluation import module_groups

    points = ["/model.0/conv/Conv/fq_output_0", "/model.22/cv3.0/act/Mul/fq_output_0", "/model.22/Sub/fq_output_0",
              "/model.0/act/Mul/fq_output_0", "input/fq_output_0", "/model.9/Add/fq_output_0"]
    assert module_groups(points) == [["/model.0/conv/Conv/fq_output_0", "/model.0/act/Mul/fq_output_0"],
                                     ["/model.22/cv3.0/act/Mul/fq_output_0", "/model.22/Sub/fq_output_0"]]
    assert module_groups(points, min_size=1)[-1] == ["/model.9/Add/fq_output_0"]


def test_sibling_groups_join_the_same_layer_of_sibling_modules():
    from edgeopt.sdk.pipeline.evaluation import sibling_groups

    points = [f"/model.22/cv3.{i}/cv3.{i}.{j}/Conv/WithoutBiases" for i in range(3) for j in range(3)]
    points += ["/model.1/conv/Conv/WithoutBiases", "/model.22/dfl/conv/Conv"]
    groups = sibling_groups(points)
    assert ["/model.22/cv3.0/cv3.0.2/Conv/WithoutBiases", "/model.22/cv3.1/cv3.1.2/Conv/WithoutBiases",
            "/model.22/cv3.2/cv3.2.2/Conv/WithoutBiases"] in groups
    assert len(groups) == 3 and all(len(g) == 3 for g in groups)
