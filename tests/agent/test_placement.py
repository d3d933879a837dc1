"""The placement check at install: what the runtime really did with the graph vs the manifest.

The forced case is OpenVINO's silent bf16: an fp32 package without ``INFERENCE_PRECISION_HINT=f32`` runs its
convolutions in bf16 on a CPU that has bf16 (this host: AVX512_BF16). With the hint it runs fp32.
"""
from __future__ import annotations

import pytest

from edgeopt.sdk.errors import UnsupportedError


def _cpu_has_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


needs_bf16 = pytest.mark.skipif(not _cpu_has_bf16(), reason="the CPU has no bf16: OpenVINO cannot switch to it, so "
                                                            "the forced precision change cannot happen here")


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_matching_package_installs_with_placement_in_install_details(installer, events, make_package, runtime):
    installer.install_file(make_package("1.0.0", runtime=runtime))
    assert events.kinds() == [("self_test", True), ("switch", True), ("install", True)]
    placed = events.last("install")["details"]["placement"]
    assert placed["ok"] is True
    device = "CPUExecutionProvider" if runtime == "onnxruntime" else "CPU"
    assert list(placed["devices"]) == [device] and placed["message"].startswith("all ")
    if runtime == "openvino":
        assert placed["precisions"] and set(placed["precisions"]) == {"fp32"}


@needs_bf16
def test_silent_bf16_raises_a_placement_event_and_still_switches_under_warn(installer, events, make_package):
    installer.install_file(make_package("1.0.0", runtime="openvino", runtime_options={}))
    kinds = events.kinds()
    assert kinds[0] == ("placement", False) and kinds[-1] == ("install", True)
    ev = events.last("placement")
    assert "compute layers ran in bf16, the package is fp32" in ev["message"]
    assert ev["details"]["precision_mismatch_count"] >= 3 and ev["details"]["strict"] is False
    assert installer.store.current("digits").version == "1.0.0"
    assert events.last("install")["details"]["placement"]["ok"] is False


@needs_bf16
def test_strict_profile_refuses_to_switch_and_keeps_the_previous_version(installer, events, make_package):
    installer.install_file(make_package("1.0.0", runtime="openvino"))
    events.clear()
    bad = make_package("1.1.0", runtime="openvino", runtime_options={}, placement="strict")
    with pytest.raises(UnsupportedError, match="does not run as its manifest says: .* ran in bf16"):
        installer.install_file(bad)
    assert events.kinds() == [("placement", False), ("install", False)]
    assert events.last("install")["details"]["stage"] == "placement"
    assert "1.0.0 still serving" in events.last("install")["message"]
    assert installer.store.current("digits").version == "1.0.0"


def test_ort_placement_names_every_node_and_its_provider(digits_model):
    import onnx
    import onnxruntime as ort

    from edgeopt.sdk.placement import RECORD_ASSIGNMENT, placement

    so = ort.SessionOptions()
    so.add_session_config_entry(RECORD_ASSIGNMENT, "1")
    sess = ort.InferenceSession(str(digits_model), so, providers=["CPUExecutionProvider"])
    got = placement(sess)
    names = {n.name for n in onnx.load(str(digits_model)).graph.node}
    assert set(got) == names and set(got.values()) == {"CPUExecutionProvider"}
    plain = ort.InferenceSession(str(digits_model), providers=["CPUExecutionProvider"])
    with pytest.raises(UnsupportedError, match="did not record node placement"):
        placement(plain)


def test_check_reports_cpu_fallback_of_a_gpu_package():
    """Unit: nodes ORT left on the CPU under a CUDA package are named (the lead's gpu profile uses this)."""
    from edgeopt.sdk.placement import check

    observed = [{"node": "conv1", "op_type": "Conv", "device": "CUDAExecutionProvider"},
                {"node": "nms", "op_type": "NonMaxSuppression", "device": "CPUExecutionProvider"},
                {"node": "shape", "op_type": "Shape", "device": "CPUExecutionProvider"}]
    r = check(observed, device="CUDAExecutionProvider", precision="fp16")
    assert not r.ok and r.off_device == {"nms": "CPUExecutionProvider", "shape": "CPUExecutionProvider"}
    assert r.message.startswith("2 of 3 nodes not on CUDAExecutionProvider (on CPUExecutionProvider: nms, shape)")
    assert check(observed[:1], device="CUDAExecutionProvider", precision="fp16").ok


def test_check_int8_float_layers_are_allowed_only_where_listed():
    from edgeopt.sdk.placement import check

    observed = [{"node": "a", "op_type": "Convolution", "device": "CPU", "precision": "int8"},
                {"node": "b", "op_type": "Convolution", "device": "CPU", "precision": "fp32",
                 "source_nodes": ["/b/Conv"]},
                {"node": "r", "op_type": "Reorder", "device": "CPU", "precision": "fp32"}]
    assert check(observed, device="CPU", precision="int8", float_layers=["/b/Conv"]).ok
    r = check(observed, device="CPU", precision="int8")
    assert not r.ok and r.precision_mismatch == {"b": "fp32"}
