"""Fixed batch sizes with bound buffers (the gpu profile's path, issue 13), exercised with ONNX Runtime's CPU
provider on real models: padding, splitting, no aliasing between calls, fp16 inputs and outputs, the profile's
rules, and a package built by the real CLI that installs, self-tests and serves through this path.

CUDA graphs themselves need an NVIDIA GPU: benchmarks/gpu_profile.py runs them there (BENCHMARKS.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeopt.agent.loader import load_options
from edgeopt.agent.registry import ModelRegistry
from edgeopt.agent.runtimes import get_runtime
from edgeopt.agent.runtimes.onnxruntime import BoundOnnxRuntimeModel, OnnxRuntimeModel
from edgeopt.sdk.errors import ConfigError, InputError, UnsupportedError
from edgeopt.sdk.package import Manifest, SourceModel, TensorSpec
from edgeopt.sdk.profile import load_profile, load_profile_file

EDGEOPT = str(Path(sys.executable).with_name("edgeopt"))
ORT = get_runtime("onnxruntime")


def _digits_x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)


def test_padding_and_splitting_match_a_plain_session(digits_model):
    plain = ORT.load(Path(digits_model))
    bound = ORT.load(Path(digits_model), options={"batch_sizes": [8, 1, 4, 4]})
    assert isinstance(bound, BoundOnnxRuntimeModel) and bound.batch_sizes == (1, 4, 8)
    for n in (1, 2, 3, 4, 5, 8, 9, 17, 20):  # exact sizes, padded ones, and more than the largest (split)
        x = _digits_x(n, seed=n)
        want = plain.infer({"images": x})["logits"]
        got = bound.infer({"images": x})["logits"]
        assert got.shape == want.shape == (n, 10)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_results_are_not_views_of_buffers_the_next_call_overwrites(digits_model):
    bound = ORT.load(Path(digits_model), options={"batch_sizes": [4]})
    first = bound.infer({"images": _digits_x(3, seed=1)})["logits"]
    kept = first.copy()
    bound.infer({"images": _digits_x(3, seed=2)})
    np.testing.assert_array_equal(first, kept)


def test_padding_rows_do_not_leak_into_a_smaller_batch(digits_model):
    """A batch of 2 after a batch of 4 in the same buffer: its rows are its own, whatever the stale rows held."""
    plain = ORT.load(Path(digits_model))
    bound = ORT.load(Path(digits_model), options={"batch_sizes": [4]})
    bound.infer({"images": _digits_x(4, seed=5) * 100})
    x = _digits_x(2, seed=6)
    np.testing.assert_allclose(bound.infer({"images": x})["logits"], plain.infer({"images": x})["logits"],
                               rtol=1e-5, atol=1e-5)
    slot_input = bound._slots[4][0]["images"]
    assert not slot_input[2:].any()  # the padding rows were zeroed, not left with the previous request


def test_wrong_inputs_are_refused_with_the_usual_errors(digits_model):
    bound = ORT.load(Path(digits_model), options={"batch_sizes": [1, 4]})
    with pytest.raises(InputError, match="expected shape"):
        bound.infer({"images": np.zeros((2, 1, 9, 8), np.float32)})
    with pytest.raises(InputError, match="expected dtype float32, found int64"):
        bound.infer({"images": np.zeros((2, 1, 8, 8), np.int64)})


def _dynamic_width_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "w"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "w"])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_fixed_sizes_need_fixed_shapes_apart_from_the_batch(tmp_path):
    with pytest.raises(UnsupportedError, match=r"fixed shapes apart from the batch dimension; x is \['n', 'w'\]"):
        ORT.load(_dynamic_width_model(tmp_path / "dyn.onnx"), options={"batch_sizes": [1, 2]})
    # without batch_sizes the same model loads as before
    assert type(ORT.load(tmp_path / "dyn.onnx")) is OnnxRuntimeModel


def test_cuda_graph_is_refused_without_the_cuda_provider(digits_model):
    with pytest.raises(UnsupportedError, match="cuda_graph needs CUDAExecutionProvider"):
        ORT.load(Path(digits_model), options={"batch_sizes": [1], "cuda_graph": True})


def _fp16_io(src: Path, out: Path) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=False), str(out))
    return out


def test_fp16_inputs_take_float32_arrays_from_python_callers(tmp_path, digits_model):
    model = _fp16_io(Path(digits_model), tmp_path / "fp16io.onnx")
    ref = ORT.load(Path(digits_model))
    for loaded in (ORT.load(model), ORT.load(model, options={"batch_sizes": [1, 4]})):
        assert loaded.inputs[0].dtype == "float16" and loaded.outputs[0].dtype == "float16"
        x = _digits_x(3, seed=3)
        got = loaded.infer({"images": x})["logits"]  # float32 in: converted on the host
        assert got.dtype == np.float16
        np.testing.assert_allclose(got.astype(np.float32), ref.infer({"images": x})["logits"], atol=0.05, rtol=0.01)
        np.testing.assert_array_equal(loaded.infer({"images": x.astype(np.float16)})["logits"], got)
        with pytest.raises(InputError, match="expected dtype float16, found int32"):
            loaded.infer({"images": np.zeros((1, 1, 8, 8), np.int32)})


def _write_profile(tmp_path: Path, extra: str, providers: str = '["CPUExecutionProvider"]',
                   precision: str = "fp16") -> Path:
    base = Path(__file__).resolve().parents[2] / "hardware_profiles" / "cpu.toml"
    text = base.read_text().replace('name = "cpu"', 'name = "cpu-fixed"')
    text = text.replace('[[runtimes]]\nruntime = "openvino"\ndevice = "CPU"\n\n', "")
    text = text.replace('providers = ["CPUExecutionProvider"]\n', f"providers = {providers}\n{extra}\n")
    text = text.replace('mode = "int8"', f'mode = "{precision}"')
    path = tmp_path / "cpu-fixed.toml"
    path.write_text(text)
    return path


def test_profile_rules(tmp_path):
    p = load_profile_file(_write_profile(tmp_path, "batch_sizes = [8, 1, 4, 4]\nprefer_nhwc = true"))
    block = p.runtimes[0]
    assert block.batch_sizes == (1, 4, 8) and block.prefer_nhwc and not block.cuda_graph
    assert block.cudnn_conv_algo_search == "EXHAUSTIVE"
    with pytest.raises(ConfigError, match="cuda_graph needs batch_sizes"):
        load_profile_file(_write_profile(tmp_path, "cuda_graph = true", '["CUDAExecutionProvider"]'))
    with pytest.raises(ConfigError, match="cuda_graph applies to CUDAExecutionProvider only"):
        load_profile_file(_write_profile(tmp_path, "cuda_graph = true\nbatch_sizes = [1]"))
    with pytest.raises(ConfigError, match="between 1 and 4096"):
        load_profile_file(_write_profile(tmp_path, "batch_sizes = [0, 8]"))
    with pytest.raises(ConfigError, match="cudnn_conv_algo_search"):
        load_profile_file(_write_profile(tmp_path, 'cudnn_conv_algo_search = "FAST"'))
    gpu = load_profile("gpu").runtimes[0]
    assert gpu.cuda_graph and gpu.prefer_nhwc and gpu.fp16_inputs and max(gpu.batch_sizes) == 32


def test_loader_passes_the_gpu_block_and_the_batcher_uses_the_largest_size(tmp_path, digits_model):
    gpu = load_profile("gpu").to_dict()
    m = Manifest(name="m", version="1.0.0", profile=gpu, runtime="onnxruntime", runtime_version="x",
                 device="CUDAExecutionProvider", precision="fp16", model_file="model.onnx",
                 inputs=[TensorSpec(name="images", dtype="float32", shape=["batch", 1, 8, 8])],
                 outputs=[TensorSpec(name="logits", dtype="float32", shape=["batch", 10])],
                 source_model=SourceModel(filename="m.onnx", format="onnx", sha256="0" * 64))
    opts = load_options(m, tmp_path)["options"]
    assert opts["batch_sizes"] == [1, 2, 4, 8, 16, 32] and opts["cuda_graph"] is True
    assert opts["prefer_nhwc"] is True and opts["cudnn_conv_algo_search"] == "EXHAUSTIVE"

    bound = ORT.load(Path(digits_model), options={"batch_sizes": [1, 4, 16]})
    assert ModelRegistry().max_batch_for(bound, m) == 16
    assert ModelRegistry().max_batch_for(ORT.load(Path(digits_model)), m) == gpu["batch_size"]


@pytest.mark.slow
def test_cli_package_with_fixed_sizes_and_fp16_inputs_installs_self_tests_and_serves(
        tmp_path, agent_keys, agent_config_file, digits_model, digits_heldout):
    profile = _write_profile(tmp_path, "batch_sizes = [1, 4, 8]\nfp16_inputs = true")
    pkg = tmp_path / "digits-fixed.eopkg"
    built = subprocess.run([EDGEOPT, "package", str(digits_model), "--profile", str(profile),
                            "--heldout", str(digits_heldout), "--sign-key", str(agent_keys.trusted_private),
                            "--name", "digits", "--version", "3.0.0", "--iterations", "5", "-o", str(pkg), "--json"],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    doc = json.loads(built.stdout)
    assert doc["precision"] == "fp16" and doc["validation"]["passed"]
    done = subprocess.run([EDGEOPT, "agent", "install", str(pkg), "--config", str(agent_config_file), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    events = json.loads(done.stdout)["events"]
    assert [e for e in events if e["event"] == "self_test"][0]["ok"]

    from edgeopt.agent.config import load_config
    from edgeopt.agent.loader import load_serving
    from edgeopt.agent.store import Store

    config = load_config(agent_config_file)
    _, loaded = load_serving(Store(config.state_dir), config)["digits"]
    assert isinstance(loaded, BoundOnnxRuntimeModel) and loaded.inputs[0].dtype == "float16"
    assert loaded.outputs[0].dtype == "float32"
    data = np.load(digits_heldout)
    logits = loaded.infer({"images": data["images"][:11]})["logits"]  # 8 + 3 padded to 4
    assert logits.shape == (11, 10) and logits.dtype == np.float32
    assert (logits.argmax(1) == data["labels"][:11]).mean() >= 0.9


def test_check_feeds_widens_only_the_named_dtype():
    """torch-aoti takes float32 for a float16 input (cast on the GPU); nothing else gets through."""
    from edgeopt.agent.runtimes.base import LoadedModel

    class Model(LoadedModel):
        inputs = [TensorSpec(name="x", dtype="float16", shape=["batch", 3])]
        outputs = []

        def infer(self, feeds):  # pragma: no cover - only check_feeds is asked
            raise NotImplementedError

    m = Model()
    m.check_feeds({"x": np.zeros((2, 3), np.float32)}, widen={"float16": "float32"})
    with pytest.raises(InputError, match="expected dtype float16, found float32"):
        m.check_feeds({"x": np.zeros((2, 3), np.float32)})
    with pytest.raises(InputError, match="expected dtype float16, found float64"):
        m.check_feeds({"x": np.zeros((2, 3), np.float64)}, widen={"float16": "float32"})
