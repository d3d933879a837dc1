"""`edgeopt compare MODULE:FACTORY --prune-ratios`: pruning ratios as candidates on the real digits ResNet
(trained here), real recovery, real ONNX Runtime; every row judged against the unpruned fp32 model."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_compare_prune_ratios_on_one_frontier(cli, digits_resnet, tmp_path):
    html = tmp_path / "compare.html"
    code, out, err = cli(
        "compare", digits_resnet["factory"], "--weights", digits_resnet["weights"], "--profiles", "cpu",
        "--input-shape", digits_resnet["input_shape_arg"], "--prune-ratios", "0,0.5", "--recover", "10",
        "--calib", digits_resnet["calib"], "--heldout", digits_resnet["heldout"],
        "--precisions", "fp32,int8", "--iterations", "10", "--json", "--html", html)
    assert code == 0, err
    (cpu,) = json.loads(out)["profiles"]
    rows = {r["candidate"]: r for r in cpu["candidates"]}
    # each ratio brings the usual runtime/precision candidates, named by the ratio
    assert {"onnxruntime/int8/all", "prune0.5/onnxruntime/int8/all", "prune0.5/openvino/fp32/all"} <= set(rows)
    assert rows["prune0.5/onnxruntime/int8/all"]["prune_ratio"] == 0.5
    assert rows["onnxruntime/int8/all"]["prune_ratio"] is None
    pruned = rows["prune0.5/onnxruntime/fp32/all"]
    unpruned = rows["onnxruntime/fp32/all"]
    # the pruned model is smaller, and the accuracy gate's fp32 side is the UNPRUNED model: 10 recovery steps
    # leave the pruned fp32 model measurably below it, while the unpruned fp32 export matches it
    assert pruned["source_size_bytes"] < unpruned["source_size_bytes"]
    assert pruned["size_bytes"] < unpruned["size_bytes"]
    assert unpruned["metric_drop"] == pytest.approx(0.0, abs=0.25)
    assert pruned["metric_drop"] > 1.0, pruned
    # one pick over both ratios, with the usual rule and a reason on every row
    picked = [r for r in cpu["candidates"] if r["picked"]]
    assert len(picked) == 1 and cpu["pick"] == picked[0]["candidate"] and picked[0]["passed"]
    assert all(r["reason"] for r in cpu["candidates"])
    text = html.read_text()
    assert "prune0.5/onnxruntime/int8/all" in text and "<svg" in text


@pytest.mark.parametrize("args, message", [
    (["--prune-ratios", "0,1.5"], "error: --prune-ratios value 1.5 is outside (0, 1) "
                                  "(give the fraction of channels to remove, e.g. 0.4 removes 40%)"),
    (["--prune-ratios", "0,x"], "error: --prune-ratios '0,x': 'x' is not a number"),
    (["--prune-ratios", "0.3,0.3"], "error: --prune-ratios '0.3,0.3': expected distinct ratios (for example 0,0.3,0.5)"),
    (["--prune-ratios", "0.3", "--heldout", "h.npz"],
     "error: recovery by distillation needs calibration images and none were given "
     "(pass --calib IMAGE_FOLDER or .npz, or --no-recover)"),
    (["--prune-ratios", "0.3", "--calib", "c.npz"],
     "error: --prune-ratios needs --heldout: recovery trains on --calib, and the accuracy check must judge other "
     "samples (pass a separate --heldout .npz or image folder)"),
])
def test_prune_ratio_errors_one_line(cli, tmp_path, args, message):
    code, out, err = cli("compare", "tests/sdk/prune_models.py:build", "--input-shape", "x:1,3,16,16", *args,
                         "--html", tmp_path / "r.html")
    assert code == 3, err
    assert err.strip().splitlines()[-1] == message
    assert out == "" and not (tmp_path / "r.html").exists()


def test_prune_ratios_need_a_torch_model(cli, tiny_model):
    code, out, err = cli("compare", tiny_model, "--prune-ratios", "0.3")
    assert code != 0 and out == ""
    assert err.strip().splitlines()[-1].startswith(
        f"error: --prune-ratios needs a PyTorch model given as MODULE:FACTORY, found {tiny_model}")
