"""`edgeopt compare` end to end on the real digits model (real OpenVINO / ONNX Runtime), and its error lines."""
from __future__ import annotations

import json

import pytest

from edgeopt.sdk.cli import cli, run_cli


def _run(capsys, *args: str) -> tuple[int, str, str]:
    rc = run_cli(cli, ["compare", *args], prog_name="edgeopt")
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.slow
def test_compare_digits_cpu_arm_json_and_html(capsys, tmp_path, digits_model, digits_calib, digits_heldout):
    html = tmp_path / "report.html"
    rc, out, err = _run(capsys, str(digits_model), "--profiles", "cpu,arm", "--calib", str(digits_calib),
                        "--heldout", str(digits_heldout), "--input-shape", "images:1,1,8,8", "--iterations", "20",
                        "--json", "--html", str(html))
    assert rc == 0, err
    doc = json.loads(out)  # stdout is only the JSON document (quantizer chatter goes to stderr)
    assert doc["model"] == str(digits_model)
    assert doc["flops"]["macs"] > 0
    assert [p["profile"] for p in doc["profiles"]] == ["cpu", "arm"]
    cpu, arm = doc["profiles"]
    assert cpu["host_proxy"] is False and arm["host_proxy"] is True
    assert "no ARM CPU here" in arm["proxy_note"]
    for prof in (cpu, arm):
        rows = {r["candidate"]: r for r in prof["candidates"]}
        picked = [r for r in prof["candidates"] if r["picked"]]
        assert len(picked) == 1 and prof["pick"] == picked[0]["candidate"]
        pick, budget = picked[0], prof["budget"]
        # The pick holds the profile's budget on the held-out digits.
        assert pick["status"] == "measured" and pick["passed"] is True
        assert pick["min_cosine"] >= budget["min_cosine"]
        assert pick["top1_agreement"] >= budget["min_top1_agreement"]
        assert pick["metric_drop"] <= budget["max_metric_drop"]
        assert pick["p50_ms"] > 0 and pick["speedup"] > 0 and pick["size_bytes"] > 0
        # ... and no measured candidate within budget is faster beyond the tie margin (same ranking as compare).
        measured = [r for r in prof["candidates"] if r["status"] == "measured"]
        assert {"onnxruntime/fp32/all", "onnxruntime/int8/all"} <= {r["candidate"] for r in measured}
        assert rows["onnxruntime/int8/all"]["size_bytes"] < rows["onnxruntime/fp32/all"]["size_bytes"]
        assert prof["baseline"]["p50_ms"] > 0
        for r in prof["candidates"]:
            assert r["reason"], r
    cpu_rows = {r["candidate"] for r in cpu["candidates"]}
    assert {"openvino/fp32/all", "openvino/int8/all"} <= cpu_rows
    tfl = [r for r in arm["candidates"] if r["runtime"] == "tflite"]
    assert tfl and tfl[0]["status"] == "skipped" and "LiteRT runs .tflite models only" in tfl[0]["reason"]
    text = html.read_text()
    assert "<svg" in text and "<table>" in text and cpu["pick"] in text


@pytest.mark.parametrize("args, message, code", [
    (["--profiles", "cpx"], "error: unknown profile 'cpx' (did you mean 'cpu'?)", 3),
    (["--profiles", ","], "error: --profiles is empty (for example --profiles cpu,arm)", 3),
    (["--input-shape", "images=1,1,8,8"],
     "error: --input-shape 'images=1,1,8,8' is not NAME:D1,D2,... (e.g. --input-shape images:1,3,224,224)", 3),
    (["--input-shape", "images:1,1,8,8", "--input-shape", "images:2,1,8,8"],
     "error: --input-shape given twice for input 'images'", 3),
    (["--image-size", "224"], "error: --image-size '224': expected H,W (for example --image-size 224,224)", 3),
    (["--mean", "0.5,a"], "error: --mean '0.5,a': expected comma-separated numbers", 3),
    (["--mean", "0.5,0.5,0.5", "--std", "1,1"],
     "error: image preprocessing options: Value error, mean has 3 values but std has 2; give one per channel", 3),
    (["--precisions", "int4"],
     "error: unknown precision(s) int4 (choose from fp32, fp16, int8, int8-aa, int8-weight-only, as-exported)", 3),
])
def test_bad_arguments_one_line(capsys, digits_model, args, message, code):
    rc, out, err = _run(capsys, str(digits_model), *args)
    assert rc == code
    assert err.strip().splitlines()[-1] == message
    assert out == ""


def test_missing_model_and_html_folder(capsys, tmp_path, digits_model):
    rc, out, err = _run(capsys, str(tmp_path / "nope.onnx"))
    assert (rc, err.strip()) == (3, f"error: {tmp_path / 'nope.onnx'}: model file not found")
    rc, out, err = _run(capsys, str(digits_model), "--html", str(tmp_path / "no" / "r.html"))
    assert (rc, err.strip()) == (3, f"error: --html {tmp_path / 'no' / 'r.html'}: folder {tmp_path / 'no'} does "
                                    "not exist (create it first)")
    assert not (tmp_path / "no").exists()


def test_dynamic_model_for_a_static_profile_fails_before_measuring(capsys, tmp_path, digits_model):
    html = tmp_path / "r.html"
    rc, out, err = _run(capsys, str(digits_model), "--profiles", "cpu,arm", "--html", str(html))
    assert rc == 4  # ExitCode.UNSUPPORTED
    assert err.strip().splitlines()[-1] == (
        "error: profile 'arm' needs static shapes, but the model has dynamic dims: input 'images' [batch,1,8,8]: "
        "dim 0 (batch) (fix them with --input-shape images:1,1,8,8)")
    assert out == "" and not html.exists()
