"""Integration: the real CLI packages the committed digits CNN for every shipped profile, with real runtimes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgeopt.sdk.package import PackageReader, load_public_key
from edgeopt.sdk.pipeline.golden import read_golden


def _manifest(path, pub):
    with PackageReader(path) as pkg:
        pkg.verify([load_public_key(pub)])
        return pkg.manifest, read_golden(pkg.read("golden.npz")), pkg.names


def test_cpu_int8_within_one_point_and_runtime_choice_recorded(cli, digits_model, digits_calib, digits_heldout,
                                                               digits_metrics, keypair, tmp_path):
    out = tmp_path / "digits-cpu.eopkg"
    code, stdout, err = cli("package", digits_model, "--profile", "cpu", "--calib", digits_calib, "--heldout",
                            digits_heldout, "--heldout-samples", "450", "--sign-key", keypair[0], "-o", out,
                            "--iterations", "20", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    m, golden, names = _manifest(out, keypair[1])
    assert m.precision == "int8" and m.runtime in ("openvino", "onnxruntime")
    v = m.validation
    assert v.samples == 450 and v.metric.name == "accuracy" and v.passed
    assert v.metric.fp32 == pytest.approx(100 * digits_metrics["fp32_heldout_accuracy"], abs=0.01)
    assert v.metric.drop <= 1.0
    # both candidate runtimes measured in the same run; the choice and the loser's reason are recorded
    assert {c["runtime"] for c in summary["candidates"]} == {"openvino", "onnxruntime"}
    assert any(d.startswith(f"runtime {m.runtime} chosen: fastest within the accuracy budget") for d in m.decisions)
    assert any(d.startswith("runtime ") and " lost: " in d for d in m.decisions)
    b = m.benchmark
    assert not b.host_proxy and b.fp32.runtime == "onnxruntime" and b.optimized.iterations == 20
    assert b.speedup == pytest.approx(b.fp32.p50_ms / b.optimized.p50_ms)
    assert m.calibration.source == "npz" and m.calibration.samples == 300 and m.calibration.meaningful
    assert len(golden) == 4 and set(golden[0][0]) == {"images"}
    # int8 weights: about a quarter of fp32 (scales, zero points and int32 biases add a little)
    assert summary["size_bytes"] <= 0.35 * summary["source_size_bytes"]
    # bench: verifies hashes, runs with the package's runtime on this host
    code, stdout, err = cli("bench", out, "--iterations", "10", "--json", "--public-key", keypair[1])
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["runtime"] == m.runtime and rep["latency"]["iterations"] == 10 and not rep["host_proxy"]
    assert rep["signer_key_id"] and rep["latency"]["p50_ms"] > 0
    code, stdout, err = cli("bench", out, "--iterations", "5", "--batch-size", "4", "--json")
    assert code == 0, err
    assert json.loads(stdout)["batch_size"] == 4 and json.loads(stdout)["signer_key_id"] is None


def test_npu_needs_static_shape_then_states_host_proxy(cli, dynamic_model, digits_calib, digits_heldout, keypair,
                                                       tmp_path):
    out = tmp_path / "digits-npu.eopkg"
    code, stdout, err = cli("package", dynamic_model["path"], "-p", "npu", "--calib", digits_calib, "--heldout",
                            digits_heldout, "--sign-key", keypair[0], "-o", out, "--iterations", "10")
    assert code != 0 and "dim 0 (batch)" in err and "--input-shape images:1,1,8,8" in err and not out.exists()
    code, stdout, err = cli("package", dynamic_model["path"], "-p", "npu", "--calib", digits_calib, "--heldout",
                            digits_heldout, "--input-shape", dynamic_model["input_shape_arg"], "--sign-key",
                            keypair[0], "-o", out, "--iterations", "10")
    assert code == 0, err
    m, _, names = _manifest(out, keypair[1])
    assert m.runtime == "openvino" and m.device == "NPU" and m.precision == "int8"
    assert {"model.xml", "model.bin", "golden.npz"} <= set(m.files)
    assert m.inputs[0].shape == [1, 1, 8, 8]
    assert m.benchmark.host_proxy and m.benchmark.target_device == "NPU"
    assert "measured on the host CPU as a proxy: the package targets NPU" in m.benchmark.note
    assert ("measured on the host CPU as a proxy: the package targets NPU (intel-npu), which this host does not "
            "have") in " ".join(stdout.split())
    assert m.validation.passed and m.validation.metric.drop <= 1.0
    code, stdout, err = cli("bench", out, "--iterations", "5")
    assert code == 0, err
    assert "measured on the host CPU as a proxy: the package targets NPU" in " ".join(stdout.split())


def test_igpu_fp16_openvino(cli, digits_model, digits_heldout, keypair, tmp_path):
    out = tmp_path / "digits-igpu.eopkg"
    code, stdout, err = cli("package", digits_model, "-p", "igpu", "--heldout", digits_heldout, "--sign-key",
                            keypair[0], "-o", out, "--iterations", "10", "--json")
    assert code == 0, err
    m, _, _ = _manifest(out, keypair[1])
    assert (m.runtime, m.device, m.precision) == ("openvino", "GPU", "fp16")
    assert m.benchmark.host_proxy and m.calibration.source == "none"
    assert m.validation.min_cosine > 0.999 and m.validation.metric.drop <= 1.0
    # fp16 weights: the .bin is about half the fp32 weights
    assert m.files["model.bin"].size < 0.6 * digits_model.stat().st_size


def test_gpu_fp16_onnxruntime_host_proxy(cli, digits_model, digits_heldout, keypair, tmp_path):
    out = tmp_path / "digits-gpu.eopkg"
    code, stdout, err = cli("package", digits_model, "-p", "gpu", "--heldout", digits_heldout, "--sign-key",
                            keypair[0], "-o", out, "--iterations", "10", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    m, golden, _ = _manifest(out, keypair[1])
    assert (m.runtime, m.device, m.precision) == ("onnxruntime", "CUDAExecutionProvider", "fp16")
    assert m.benchmark.host_proxy and m.benchmark.batch_size == 8
    assert summary["benchmark"]["note"].startswith("measured on the host CPU as a proxy: the package targets "
                                                   "CUDAExecutionProvider (nvidia-gpu)")
    assert m.validation.passed


def test_arm_int8_onnxruntime_records_why_not_tflite(cli, digits_model, digits_calib, digits_heldout, keypair,
                                                     tmp_path):
    out = tmp_path / "digits-arm.eopkg"
    code, stdout, err = cli("package", digits_model, "-p", "arm", "--calib", digits_calib, "--heldout",
                            digits_heldout, "--input-shape", "images:1,1,8,8", "--sign-key", keypair[0], "-o", out,
                            "--iterations", "10")
    assert code == 0, err
    m, _, _ = _manifest(out, keypair[1])
    assert (m.runtime, m.precision) == ("onnxruntime", "int8")
    import platform

    # this x86 host is only a stand-in for the ARM CPU the profile targets
    assert m.benchmark.host_proxy == (platform.machine() not in ("aarch64", "armv7l"))
    assert any(d.startswith("runtime tflite: skipped, it does not take onnx models") for d in m.decisions)
    assert m.validation.metric.drop <= 1.0
    # int8 QDQ: the file holds int8 weights
    import onnx

    with PackageReader(out) as pkg:
        model = onnx.load_from_string(pkg.read("model.onnx"))
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) >= 4


def test_arm_tflite_model_as_exported(cli, tflite_model, tflite_inputs, keypair, tmp_path):
    out = tmp_path / "face-arm.eopkg"
    code, stdout, err = cli("package", tflite_model, "-p", "arm", "--heldout", tflite_inputs["heldout"],
                            "--sign-key", keypair[0], "-o", out, "--iterations", "10", "--json")
    assert code == 0, err
    m, golden, _ = _manifest(out, keypair[1])
    assert m.runtime == "tflite" and m.model_file == "model.tflite" and m.source_model.format == "tflite"
    assert m.validation.min_cosine == pytest.approx(1.0)
    assert {o.name for o in m.outputs} == set(golden[0][1])
    # The gpu profile runs ONNX Runtime only, which cannot read TFLite (cpu/npu/igpu take it through OpenVINO).
    code, _, err = cli("package", tflite_model, "-p", "gpu", "--no-sign", "-o", tmp_path / "x.eopkg")
    assert code != 0 and "a .tflite model can only be packaged for a profile with the tflite or openvino runtime" in err


def test_random_calibration_is_recorded_as_meaningless(cli, digits_model, keypair, tmp_path):
    out = tmp_path / "r.eopkg"
    code, stdout, err = cli("package", digits_model, "--calib", "random", "--runtime", "onnxruntime",
                            "--sign-key", keypair[0], "-o", out, "--iterations", "5")
    assert code == 0, err
    assert "--calib random: calibration uses random inputs, so the accuracy check is meaningless" in " ".join(err.split())
    m, _, _ = _manifest(out, keypair[1])
    assert m.calibration.source == "random" and not m.calibration.meaningful
    assert "calibration: random inputs (--calib random); the accuracy check is meaningless" in m.decisions


def test_weight_only_int8(cli, digits_model, digits_heldout, keypair, tmp_path):
    for runtime in ("onnxruntime", "openvino"):
        out = tmp_path / f"w-{runtime}.eopkg"
        code, stdout, err = cli("package", digits_model, "--weight-only", "--runtime", runtime, "--heldout",
                                digits_heldout, "--sign-key", keypair[0], "-o", out, "--iterations", "5", "--json")
        assert code == 0, err
        s = json.loads(stdout)
        assert s["precision"] == "int8-weight-only" and s["validation"]["passed"]
        assert s["size_bytes"] < 0.45 * s["source_size_bytes"], s


def test_openvino_ir_input_for_npu(cli, digits_model, digits_calib, digits_heldout, keypair, tmp_path):
    import openvino as ov

    ir = tmp_path / "ir" / "digits.xml"
    ir.parent.mkdir()
    ov.save_model(ov.convert_model(str(digits_model)), str(ir), compress_to_fp16=False)
    out = tmp_path / "ir-npu.eopkg"
    code, stdout, err = cli("package", ir, "-p", "npu", "--input-shape", "images:1,1,8,8", "--calib", digits_calib,
                            "--heldout", digits_heldout, "--sign-key", keypair[0], "-o", out, "--iterations", "5",
                            "--json")
    assert code == 0, err
    s = json.loads(stdout)
    assert s["runtime"] == "openvino" and s["precision"] == "int8" and s["validation"]["passed"]
    m, _, _ = _manifest(out, keypair[1])
    assert m.source_model.format == "openvino-ir" and m.inputs[0].shape == [1, 1, 8, 8]
    assert m.benchmark.fp32.runtime == "openvino"  # fp32 reference of an IR is OpenVINO itself
    # the cpu profile's ONNX Runtime cannot take an IR: the decision says so
    code, stdout, err = cli("package", ir, "-p", "cpu", "--calib", digits_calib, "--no-sign", "-o",
                            tmp_path / "ir-cpu.eopkg", "--iterations", "5", "--json")
    assert code == 0, err
    assert "runtime onnxruntime: skipped, it does not take openvino-ir models" in json.loads(stdout)["decisions"]


def test_image_folder_calibration(cli, tmp_path, keypair):
    """A folder of images with preprocessing options calibrates a model with an NCHW RGB input."""
    from PIL import Image

    import tiny_models

    model = tiny_models.tiny_cnn(tmp_path / "rgb.onnx", size=16)
    # the tiny model has 1 channel: images are converted to grayscale by the channel count
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    out = tmp_path / "img.eopkg"
    code, stdout, err = cli("package", model, "--calib", folder, "--mean", "0.5", "--std", "0.25", "--runtime",
                            "onnxruntime", "--sign-key", keypair[0], "-o", out, "--iterations", "5", "--json")
    assert code == 0, err
    s = json.loads(stdout)
    assert s["calibration"]["source"] == "images" and s["calibration"]["samples"] == 10
    m, _, _ = _manifest(out, keypair[1])
    assert m.preprocessing["mean"] == [0.5] and m.preprocessing["layout"] == "NCHW"
    assert m.inputs[0].layout == "NCHW"
    code, _, err = cli("package", model, "--calib", folder, "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
                       "--no-sign", "-o", tmp_path / "x.eopkg")
    assert code != 0 and "--mean/--std give 3 values, but input 'input' has 1 channels" in err


def test_torch_module_through_python_api(tmp_path, keypair):
    torch = pytest.importorskip("torch", reason="torch is an optional extra")
    from edgeopt.sdk.pipeline import PackageRequest, build_package, export_torch

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 8 * 8, 10))
    path = export_torch(net, torch.randn(1, 1, 8, 8), tmp_path / "net.onnx", input_names=["images"],
                        output_names=["logits"])
    # An untrained net's logits are near ties: top-1 agreement on random inputs means nothing (fp16 or bf16
    # flips a few), so it is judged per output (task generic), as the random-weight ResNet-18 is.
    res = build_package(PackageRequest(model=path, profile="igpu", sign_key=keypair[0], output=tmp_path / "t.eopkg",
                                       bench_iterations=5, task="generic"))
    assert res.manifest.precision == "fp16" and res.validation.passed
    assert [t.name for t in res.manifest.inputs] == ["images"]


def test_graph_level_none_keeps_the_graph(cli, tmp_path, keypair):
    import tiny_models

    model = tiny_models.tiny_cnn(tmp_path / "t.onnx")
    code, stdout, err = cli("package", model, "-p", "igpu", "--graph-level", "none", "--sign-key", keypair[0],
                            "-o", tmp_path / "t.eopkg", "--iterations", "5", "--json")
    assert code == 0, err
    assert "graph (none): 7 -> 7 nodes (simplifier off)" in json.loads(stdout)["decisions"]
