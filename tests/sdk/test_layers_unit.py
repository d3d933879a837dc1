"""Unit: the profile document's arithmetic, the comparison, the trace and the HTML report (no runtime)."""
from __future__ import annotations

import pytest

from edgeopt.sdk.layers import (LayerRun, RawProfile, build_profile, chrome_trace, compare, precision_word,
                                silent_precision, summary)


def _raw(layers, runtime="openvino"):
    return RawProfile(runtime=runtime, runtime_version="1", device="CPU", layers=layers, runs=3, run_ms=[1.0] * 3)


def test_medians_shares_flops_gops_and_peak():
    raw = _raw([LayerRun("conv", "Convolution", "int8", [10.0, 30.0, 20.0], macs=1_000_000, bytes_moved=50_000,
                         source_nodes=["/0/Conv"]),
                LayerRun("pool", "Pooling", "int8", [5.0, 5.0, 500.0]),
                LayerRun("fc", "FullyConnected", "fp32", [5.0, 5.0, 5.0], macs=10_000)])
    peak = {"int8_gops_all": 400.0, "fp32_gops_all": 100.0, "int8_gops_1t": 200.0, "fp32_gops_1t": 50.0}
    doc = build_profile(raw, latency_ms=0.04, peak=peak)
    conv, pool, fc = doc["layers"]
    assert conv["median_us"] == 20.0 and pool["median_us"] == 5.0  # the 500 us outlier is not the median
    assert doc["layer_sum_ms"] == pytest.approx(0.030)
    assert conv["share"] == pytest.approx(20 / 30, abs=1e-4)
    assert conv["flops"] == 2_000_000 and conv["gops"] == pytest.approx(100.0)  # 2 MFLOP in 20 us
    assert conv["peak_gops"] == 400.0 and conv["of_peak"] == pytest.approx(0.25)
    assert fc["peak_gops"] == 100.0  # fp32 layers are held to the fp32 peak
    assert conv["intensity"] == pytest.approx(40.0) and pool["gops"] is None
    assert doc["layer_sum_vs_latency"] == pytest.approx(0.75)
    assert doc["compute_precisions"] == {"fp32": 5.0, "int8": 20.0}
    assert [(g["op_type"], g["layers"]) for g in doc["by_op_type"]] == [("Convolution", 1), ("Pooling", 1),
                                                                      ("FullyConnected", 1)]
    s = summary(doc, top=2)
    assert [r["name"] for r in s["top_layers"]] == ["conv", "pool"] and s["layers"][0]["source_nodes"] == ["/0/Conv"]


@pytest.mark.parametrize("raw_name, word", [("u8", "int8"), ("i8", "int8"), ("f32", "fp32"), ("bf16", "bf16"),
                                            ("f16", "fp16"), ("float", "fp32"), ("uint8", "int8"), (None, "?")])
def test_precision_words(raw_name, word):
    assert precision_word(raw_name) == word


def test_silent_precision_and_comparison():
    new = build_profile(_raw([LayerRun("c1", "Convolution", "bf16", [10.0], source_nodes=["/0/Conv"]),
                              LayerRun("c2", "Convolution", "int8", [4.0], source_nodes=["/3/Conv"]),
                              LayerRun("r", "Reorder", "bf16", [1.0])]), model={"precision": "int8"})
    old = build_profile(_raw([LayerRun("c1", "Convolution", "fp32", [8.0], source_nodes=["/0/Conv"]),
                              LayerRun("c2", "Convolution", "fp32", [8.0], source_nodes=["/3/Conv"])]),
                        model={"precision": "fp32"})
    assert new["silent_precision"] == ["c1: ran in bf16 (package int8)"]  # the Reorder is not a compute layer
    assert silent_precision(old) == []
    c = compare(new, old)
    assert c["faster"] == ["/3/Conv"] and c["slower"] == ["/0/Conv"]
    assert c["precision_changed"] == ["/0/Conv: fp32 -> bf16", "/3/Conv: fp32 -> int8"]
    assert c["stayed_float"] == ["/0/Conv"] and c["only_in_profile"] == ["r"] and c["only_in_baseline"] == []
    assert c["speedup"] == pytest.approx(16 / 15, abs=1e-3)


def test_trace_has_one_event_per_layer_per_run():
    raw = _raw([LayerRun("a", "Conv", "fp32", [1.0, 2.0, 3.0]), LayerRun("b", "Relu", "fp32", [4.0, 5.0, 6.0])],
               runtime="onnxruntime")
    trace = chrome_trace(build_profile(raw), raw)
    layers = [e for e in trace["traceEvents"] if e.get("tid") == 2]
    assert [(e["name"], e["dur"]) for e in layers] == [("a", 1.0), ("b", 4.0), ("a", 2.0), ("b", 5.0), ("a", 3.0),
                                                       ("b", 6.0)]
    assert all(layers[i]["ts"] + layers[i]["dur"] <= layers[i + 1]["ts"] for i in range(len(layers) - 1))


def test_html_escapes_hostile_layer_names():
    from edgeopt.sdk.layers_html import render

    evil = '<script>alert(1)</script>"'
    doc = build_profile(_raw([LayerRun(evil, "Convolution", "int8", [5.0], macs=1000, bytes_moved=100)]),
                        peak={"int8_gops_all": 10.0}, model={"name": evil})
    page = render(doc)
    assert "<script>" not in page and "&lt;script&gt;" in page and page.count("<svg") == 2
