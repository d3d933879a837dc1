"""`edgeopt bench --layers`: per-layer profiles of real packages with the runtimes' own profilers.

Packages are built once per session with the real `edgeopt package` (digits CNN int8 and fp32 on ONNX
Runtime and OpenVINO, ResNet-18 int8 on ONNX Runtime); each test profiles them for real.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

COMMON = ["--iterations", "5", "--no-sign"]


@pytest.fixture(scope="session")
def digits_packages(tmp_path_factory, digits_model, digits_calib, digits_heldout):
    """{(runtime, precision): path} of real digits packages."""
    from edgeopt.sdk.cli import cli as group, run_cli

    root = tmp_path_factory.mktemp("layer-pkgs")
    out = {}
    for runtime in ("onnxruntime", "openvino"):
        for precision in ("int8", "fp32"):
            path = root / f"digits-{runtime}-{precision}.eopkg"
            code = run_cli(group, ["package", str(digits_model), "--calib", str(digits_calib), "--heldout",
                                   str(digits_heldout), "--runtime", runtime, "--precision", precision, "--name",
                                   "digits", "-o", str(path), *COMMON], prog_name="edgeopt")
            assert code == 0
            out[(runtime, precision)] = path
    return out


def _without_precision_hint(src, dst):
    """The same package with the manifest's runtime_options removed (unsigned: only file hashes are checked)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin.getmembers():
            data = tin.extractfile(member).read()
            if member.name == "manifest.json":
                doc = json.loads(data)
                doc["runtime_options"] = {}
                data = json.dumps(doc).encode()
                member.size = len(data)
            tout.addfile(member, io.BytesIO(data))
    return dst


def _layers(cli, *args):
    code, out, err = cli("bench", *args, "--layers", "--runs", "10", "--no-peak", "--json")
    assert code == 0, err
    return json.loads(out)


def test_ort_int8_layers_precision_flops_and_source_names(cli, digits_packages):
    doc = _layers(cli, digits_packages[("onnxruntime", "int8")])
    assert doc["runtime"] == "onnxruntime" and doc["runs"] == 10
    convs = [r for r in doc["layers"] if r["op_type"] == "QLinearConv"]
    assert len(convs) == 3 and {r["precision"] for r in convs} == {"int8"}
    # ORT renames the fused int8 convs (/0/Conv_token_1); the source node is named again.
    assert [r["source_nodes"][0] for r in convs] == ["/0/Conv", "/3/Conv", "/7/Conv"]
    # FLOPs from edgeopt.sdk.flops (2 x MACs): conv 1 is 8x8x16 outputs x 1x3x3 MACs.
    assert convs[0]["flops"] == 2 * 8 * 8 * 16 * 9 and all(r["gops"] > 0 for r in convs)
    assert sum(r["share"] for r in doc["layers"]) == pytest.approx(1.0, abs=1e-3)
    assert doc["latency_ms"] > 0 and doc["layer_sum_ms"] > 0
    groups = {g["op_type"]: g for g in doc["by_op_type"]}
    assert groups["QLinearConv"]["layers"] == 3
    assert doc["compute_precisions"].keys() == {"int8"} and doc["silent_precision"] == []


def test_openvino_reports_executed_precision_and_the_silent_bf16(cli, digits_packages, tmp_path):
    import openvino as ov

    pinned = _layers(cli, digits_packages[("openvino", "fp32")])
    convs = [r for r in pinned["layers"] if r["op_type"] == "Convolution"]
    assert len(convs) == 3 and {r["precision"] for r in convs} == {"fp32"} and pinned["silent_precision"] == []
    assert "/0/Conv" in convs[0]["source_nodes"]  # OpenVINO's originalLayersNames: the fused layers
    assert convs[1]["flops"] == 2 * 8 * 8 * 32 * 16 * 9
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16: OpenVINO keeps fp32 without the hint too")
    loose = _without_precision_hint(digits_packages[("openvino", "fp32")], tmp_path / "loose.eopkg")
    doc = _layers(cli, loose)
    assert {r["precision"] for r in doc["layers"] if r["op_type"] == "Convolution"} == {"bf16"}
    assert any(s.endswith("ran in bf16 (package fp32)") for s in doc["silent_precision"])
    code, out, _ = cli("bench", loose, "--layers", "--runs", "5", "--no-peak")
    assert code == 0 and "precision differs from the package" in out


def test_against_names_precision_changes_and_writes_trace_and_html(cli, digits_packages, tmp_path):
    trace, html = tmp_path / "trace.json", tmp_path / "report.html"
    doc = _layers(cli, digits_packages[("onnxruntime", "int8")], "--against", digits_packages[("onnxruntime", "fp32")],
                  "--trace", trace, "--html", html)
    c = doc["against"]["comparison"]
    assert "/0/Conv: fp32 -> int8" in c["precision_changed"]
    assert {r["layer"] for r in c["layers"] if r["speedup"]} >= {"/0/Conv", "/3/Conv", "/7/Conv"}
    assert c["total_ms"] == doc["layer_sum_ms"] and c["baseline_total_ms"] == doc["against"]["layer_sum_ms"]
    events = json.loads(trace.read_text())["traceEvents"]
    layer_events = [e for e in events if e.get("ph") == "X" and e.get("tid") == 2]
    assert len(layer_events) == 10 * len(doc["layers"])  # every layer of every run
    assert {e["name"] for e in layer_events} == {r["name"] for r in doc["layers"]}
    page = html.read_text()
    assert page.count("<svg") == 2 and "/0/Conv_token_1" in page and "fp32 -&gt; int8" in page


def test_flags_need_layers_and_bad_inputs_fail_in_one_line(cli, digits_packages, tmp_path):
    code, _, err = cli("bench", digits_packages[("onnxruntime", "int8")], "--trace", tmp_path / "t.json")
    assert code == 2 and "--trace needs --layers" in err
    pkg = digits_packages[("onnxruntime", "int8")]
    code, _, err = cli("bench", pkg, "--layers", "--against", pkg)
    assert code == 2 and "cannot be used together" in err
    junk = tmp_path / "junk.eopkg"
    junk.write_bytes(b"not a tar")
    code, _, err = cli("bench", junk, "--layers", "--trace", tmp_path / "t.json")
    assert code != 0 and err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t.json").exists()


def test_resnet18_layer_sum_is_close_to_whole_model_latency(cli, resnet18_onnx, resnet18_inputs, tmp_path):
    """A real network: 20 convolutions, every one mapped back to its source node, with FLOPs."""
    out = tmp_path / "r18.eopkg"
    code, _, err = cli("package", resnet18_onnx, "--calib", resnet18_inputs["calib"], "--heldout",
                       resnet18_inputs["heldout"], "--runtime", "onnxruntime", "--name", "r18", "-o", out,
                       "--calib-samples", "8", "--heldout-samples", "4", *COMMON)
    assert code == 0, err
    doc = _layers(cli, out)
    convs = [r for r in doc["layers"] if r["flops"] and r["op_type"] in ("QLinearConv", "Conv", "FusedConv")]
    assert len(convs) == 20 and all(r["source_nodes"] for r in convs)
    assert sum(r["flops"] for r in doc["layers"]) == pytest.approx(2 * 1.82e9, rel=0.05)
    # The layers account for each profiled run's wall time (the median over runs of layer sum / run time):
    # unlike the ratio of medians, this does not move with the load of a shared host (BENCHMARKS.md).
    assert doc["accounted_share"] > 0.9
    assert doc["latency_ms"] > 0 and doc["layer_sum_vs_latency"] > 0


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_manifest_carries_the_host_profile_summary(digits_packages, runtime):
    from edgeopt.sdk.package import PackageReader

    with PackageReader(digits_packages[(runtime, "int8")]) as pkg:
        hp = pkg.manifest.host_profile
    assert hp is not None and hp["runtime"] == runtime and hp["runs"] == 20 and hp["layer_sum_ms"] > 0
    assert hp["compute_precisions"].keys() == {"int8"}
    assert hp["top_layers"] and hp["layers_total"] == len(hp["layers"])
    assert {r["op_type"] for r in hp["layers"]} & {"QLinearConv", "Convolution"}


def test_accuracy_aware_float_layers_pass_the_placement_check_and_show_in_the_profile(cli, tmp_path):
    """A real OpenVINO int8 package whose --accuracy-aware search kept layers in float: the executed graph's
    fp32 convolutions are exactly the manifest's float_layers, so the agent's check passes; without the list
    it would flag them. The near-exact budget (1 - 1e-6) forces the search (tests/sdk/test_float_search.py)."""
    import re

    from edgeopt.agent.loader import placement_check
    from edgeopt.agent.runtimes import get_runtime
    from edgeopt.sdk.package import PackageReader
    from edgeopt.sdk.placement import check
    from tiny_models import calib_npz, tiny_cnn

    root = Path(__file__).resolve().parents[2]
    text = (root / "hardware_profiles" / "cpu.toml").read_text().replace('name = "cpu"', 'name = "search"')
    profile = tmp_path / "search.toml"
    profile.write_text(re.sub(r"(?m)^min_cosine = [0-9.]+", "min_cosine = 0.999999", text))
    out = tmp_path / "aa.eopkg"
    code, _, err = cli("package", tiny_cnn(tmp_path / "tiny.onnx"), "-p", profile, "--runtime", "openvino",
                       "--precision", "int8", "--accuracy-aware", "--task", "generic", "--calib",
                       calib_npz(tmp_path / "calib.npz", n=40), "-o", out, *COMMON)
    assert code == 0, err
    with PackageReader(out) as pkg:
        manifest = pkg.manifest
        root_dir = pkg.extract_to(tmp_path / "x")
    floats = manifest.validation.float_layers
    assert manifest.precision == "int8" and floats
    loaded = get_runtime("openvino").load(root_dir / manifest.model_file, device="CPU",
                                          options=dict(manifest.runtime_options))
    try:
        report = placement_check(loaded, manifest)
        observed = loaded.placement()
    finally:
        loaded.close()
    assert report["ok"] and report["checked"], report["message"]
    float_convs = [o for o in observed if o["op_type"] == "Convolution" and o["precision"] == "fp32"]
    assert float_convs and all(set(o["source_nodes"]) & set(floats) for o in float_convs)
    bare = check(observed, device="CPU", precision="int8")
    assert not bare.ok and set(bare.precision_mismatch) >= {o["node"] for o in float_convs}
    doc = _layers(cli, out)
    assert "fp32" in doc["compute_precisions"] and doc["silent_precision"] == []
    assert doc["model"]["float_layers"] == floats
