"""The agent loads a package with the runtime options it was validated with (manifest.runtime_options)."""
from pathlib import Path

from edgeopt.agent.loader import load_options
from edgeopt.agent.runtimes import get_runtime
from edgeopt.sdk.package import Manifest, SourceModel, TensorSpec
from edgeopt.sdk.profile import load_profile


def _manifest(runtime: str, device: str, options: dict) -> Manifest:
    return Manifest(name="m", version="1.0.0", profile=load_profile("cpu").to_dict(), runtime=runtime,
                    runtime_version="x", device=device, precision="int8", model_file="model.xml",
                    inputs=[TensorSpec(name="images", dtype="float32", shape=[1, 1, 8, 8])],
                    outputs=[TensorSpec(name="logits", dtype="float32", shape=[1, 10])],
                    source_model=SourceModel(filename="m.onnx", format="onnx", sha256="0" * 64),
                    runtime_options=options)


def test_openvino_precision_hint_reaches_the_compiled_model(tmp_path, digits_model):
    m = _manifest("openvino", "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    kwargs = load_options(m, tmp_path / "cache")
    assert kwargs["options"] == {"INFERENCE_PRECISION_HINT": "f32"}
    assert kwargs["cache_dir"] == tmp_path / "cache" / "openvino"
    loaded = get_runtime("openvino").load(Path(digits_model), **kwargs)
    # the real compiled model reports the precision it runs its float parts at
    assert str(loaded.compiled.get_property("INFERENCE_PRECISION_HINT")) in ("f32", "<Type: 'float32'>")


def test_onnxruntime_options_are_providers_only(tmp_path):
    kwargs = load_options(_manifest("onnxruntime", "CPUExecutionProvider", {}), tmp_path)
    assert kwargs["options"]["providers"] == ["CPUExecutionProvider"]


def _spinning(loaded) -> str | None:
    try:
        return loaded.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:  # not set: ONNX Runtime's default, which spins
        return None


def test_onnxruntime_threads_do_not_spin_on_the_device_unless_the_profile_asks(tmp_path, digits_model):
    """Spin-waiting intra-op threads take a core from the agent's API (BENCHMARKS.md): off by default."""
    m = _manifest("onnxruntime", "CPUExecutionProvider", {})
    kwargs = load_options(m, tmp_path)
    assert kwargs["options"]["intra_op_spinning"] is False
    assert _spinning(get_runtime("onnxruntime").load(Path(digits_model), **kwargs)) == "0"

    profile = m.profile
    for block in profile["runtimes"]:
        if block["runtime"] == "onnxruntime":
            block["intra_op_spinning"] = True
    kwargs = load_options(m.model_copy(update={"profile": profile}), tmp_path)
    assert kwargs["options"]["intra_op_spinning"] is True
    loaded = get_runtime("onnxruntime").load(Path(digits_model), **kwargs)
    assert _spinning(loaded) is None  # ONNX Runtime's own default (spinning) is left alone
