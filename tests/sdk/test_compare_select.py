"""Unit tests of compare's candidate enumeration and selection, with fake candidates (no runtime)."""
from __future__ import annotations

import pytest

from edgeopt.sdk.compare import (CompareReport, auto_iterations, compare_profile, enumerate_candidates,
                                 explain, host_proxy_note, select)
from edgeopt.sdk.errors import EdgeoptError, UnsupportedError
from edgeopt.sdk.package import LatencyStats, LayerError, ValidationReport
from edgeopt.sdk.pipeline.types import Candidate, CandidateResult
from edgeopt.sdk.profile import load_profile


def _lat(ms: float) -> LatencyStats:
    return LatencyStats(p50_ms=ms, p90_ms=ms * 1.1, p99_ms=ms * 1.2, mean_ms=ms, throughput_ips=1000 / ms,
                        iterations=20)


def fake(runtime="openvino", precision="int8", p50=1.0, size=1000, passed=True, ok=True, cosine=0.999,
         aa=False, fp32_ms=2.0, cand: Candidate | None = None) -> CandidateResult:
    cand = cand or Candidate(runtime, precision, accuracy_aware=aa)
    if not ok:
        return CandidateResult(candidate=cand, ok=False, passed=False, error="backend exploded")
    val = ValidationReport(samples=16, max_abs_error=0.01, min_cosine=cosine, mean_cosine=cosine,
                           top1_agreement=1.0 if passed else 0.9, passed=passed,
                           failures=[] if passed else [f"min cosine {cosine} < 0.99"],
                           sensitive_layers=[] if passed else [LayerError(layer="/conv1/Conv", error=0.2)])
    return CandidateResult(candidate=cand, ok=True, passed=passed, validation=val, fp32=_lat(fp32_ms),
                           optimized=_lat(p50), speedup=fp32_ms / p50, size_bytes=size, source_size_bytes=4000,
                           device="CPU", run_device="CPU")


def test_picks_fastest_within_budget():
    slow = fake(precision="fp32", p50=2.0, size=4000)
    fast = fake(precision="int8", p50=1.0, size=1000)
    mid = fake(runtime="onnxruntime", precision="int8", p50=1.5, size=1000)
    assert select([slow, mid, fast]) is fast


def test_ignores_over_budget_and_failed_even_when_faster():
    over = fake(precision="int8", p50=0.5, passed=False, cosine=0.89)
    broken = fake(precision="fp16", ok=False)
    good = fake(precision="fp32", p50=1.7, size=4000)
    assert select([over, broken, good]) is good
    assert explain(over, good, [over, broken, good]).startswith("over budget: min cosine 0.89 < 0.99")
    assert "/conv1/Conv" in explain(over, good, [over, broken, good])
    assert explain(broken, good, [over, broken, good]) == "failed: backend exploded"


def test_tie_within_noise_goes_to_smaller_package():
    big = fake(precision="fp32", p50=1.00, size=4000)
    small = fake(precision="int8", p50=1.02, size=1000)  # 2% slower: a tie at the default 3% noise
    results = [big, small]
    assert select(results) is small
    assert explain(small, small, results) == "picked: smallest of those within 3% of the fastest"
    assert explain(big, small, results) == "tied within 3% of the fastest; larger package than the pick"


def test_outside_noise_the_faster_wins_even_if_larger():
    big = fake(precision="fp32", p50=1.00, size=4000)
    small = fake(precision="int8", p50=1.10, size=1000)
    assert select([big, small]) is big
    assert select([big, small], noise=0.2) is small
    assert explain(small, big, [big, small]) == "slower: 1.10x the pick's latency"
    assert explain(big, big, [big, small]) == "picked: fastest within budget"


def test_explain_counts_float_layers_of_accuracy_aware_results():
    aa = fake(precision="int8", p50=1.0, aa=True)
    aa.validation = aa.validation.model_copy(update={"float_layers": ["/conv1/Conv", "/fc/Gemm"]})
    assert explain(aa, aa, [aa]) == "picked: fastest within budget; 2 layer(s) kept in float"


def test_nothing_within_budget_picks_nothing():
    assert select([fake(passed=False, cosine=0.5), fake(ok=False)]) is None
    assert select([]) is None


def test_enumerates_cpu_candidates_in_order():
    labels = [p.candidate.label for p in enumerate_candidates(load_profile("cpu"))]
    assert labels == [
        "openvino/fp32/all", "openvino/int8/all", "openvino/int8/all+aa", "openvino/int8-weight-only/all",
        "onnxruntime/fp32/all", "onnxruntime/fp32/basic", "onnxruntime/int8/all", "onnxruntime/int8/all+aa",
        "onnxruntime/int8-weight-only/all",
    ]


def test_arm_lists_litert_as_not_run_for_an_onnx_model_and_runs_it_for_tflite():
    plan = enumerate_candidates(load_profile("arm"))
    skipped = [p for p in plan if p.skip]
    assert [p.candidate.runtime for p in skipped] == ["tflite"]
    assert "LiteRT runs .tflite models only" in skipped[0].skip
    tfl = enumerate_candidates(load_profile("arm"), model_format="tflite")
    assert [(p.candidate.label, p.skip is None) for p in tfl][0] == ("tflite/as-exported/all", True)
    assert tfl[1].skip == "onnxruntime does not take tflite models"


def test_int8_static_is_listed_as_not_run_without_calibration():
    plan = enumerate_candidates(load_profile("cpu"), calibration=False, precisions=["int8", "int8-aa", "fp32"])
    skipped = {p.candidate.label: p.skip for p in plan if p.skip}
    assert skipped == {label: "int8 static needs calibration data: pass --calib" for label in (
        "openvino/int8/all", "openvino/int8/all+aa", "onnxruntime/int8/all", "onnxruntime/int8/all+aa")}


def test_a_runtime_that_is_not_installed_is_listed_not_run():
    plan = enumerate_candidates(load_profile("cpu"), accepts=lambda rt: None if rt == "openvino" else ("onnx",))
    assert plan[0].skip == "runtime openvino is not installed here"
    assert all(p.skip is None for p in plan[1:])


def test_ranking_is_by_the_candidates_own_p50_not_by_a_noisy_baseline_ratio():
    # The same model measured beside a baseline that a load burst slowed to 4 ms: its speedup looks 2x,
    # but its own p50 is what a device will see. A ratio to a noisy baseline must not reorder candidates.
    a = fake(precision="fp32", p50=1.76, fp32_ms=3.5, size=4000)
    b = fake(precision="int8", p50=1.50, fp32_ms=1.6, size=1000)
    assert a.speedup > b.speedup
    assert select([a, b]) is b
    assert explain(a, b, [a, b]) == "slower: 1.17x the pick's latency"


def test_fp16_only_where_the_device_computes_in_fp16_and_filter():
    igpu = [p.candidate.label for p in enumerate_candidates(load_profile("igpu"))]
    assert "openvino/fp16/all" in igpu
    cpu = [p.candidate.label for p in enumerate_candidates(load_profile("cpu"))]
    assert not any("fp16" in c for c in cpu)
    only = [p.candidate.label for p in enumerate_candidates(load_profile("cpu"), precisions=["int8"])]
    assert only == ["openvino/int8/all", "onnxruntime/int8/all"]
    with pytest.raises(EdgeoptError) as exc:
        enumerate_candidates(load_profile("cpu"), precisions=["int4"])
    assert exc.value.one_line() == (
        "unknown precision(s) int4 (choose from fp32, fp16, int8, int8-aa, int8-weight-only, as-exported)")


def _runner(table):
    calls = []

    def evaluate(cand: Candidate) -> CandidateResult:
        calls.append(cand.label)
        value = table[cand.label]
        if isinstance(value, Exception):
            raise value
        return value

    return evaluate, calls


def test_compare_profile_skips_accuracy_aware_when_plain_int8_holds():
    prof = load_profile("cpu")
    table = {
        "openvino/fp32/all": fake("openvino", "fp32", p50=2.0, size=4000),
        "openvino/int8/all": fake("openvino", "int8", p50=1.0, size=1000),
        "openvino/int8/all+aa": fake("openvino", "int8", p50=1.0, aa=True),
        "openvino/int8-weight-only/all": fake("openvino", "int8-weight-only", p50=1.9, size=1100),
        "onnxruntime/fp32/all": fake("onnxruntime", "fp32", p50=2.1, size=4000),
        "onnxruntime/fp32/basic": UnsupportedError("graph level basic refused"),
        "onnxruntime/int8/all": fake("onnxruntime", "int8", p50=0.6, passed=False, cosine=0.7),
        "onnxruntime/int8/all+aa": fake("onnxruntime", "int8", p50=1.2, size=1500, aa=True),
        "onnxruntime/int8-weight-only/all": fake("onnxruntime", "int8-weight-only", p50=2.0),
    }
    evaluate, calls = _runner(table)
    seen = []
    pc = compare_profile(prof, evaluate, progress=lambda *a: seen.append(a), devices={})
    assert "openvino/int8/all+aa" not in calls  # plain OpenVINO int8 held the budget
    assert "onnxruntime/int8/all+aa" in calls  # plain ONNX Runtime int8 did not
    assert pc.pick is table["openvino/int8/all"]
    assert pc.proxy_note is None
    assert seen[-1] == ("cpu", "done", 9, 9)
    doc = CompareReport(model="m.onnx", profiles=[pc]).to_dict()
    prof_doc = doc["profiles"][0]
    assert prof_doc["pick"] == "openvino/int8/all"
    rows = {r["candidate"]: r for r in prof_doc["candidates"]}
    assert rows["openvino/int8/all"]["picked"] is True
    assert rows["onnxruntime/fp32/basic"]["status"] == "failed"
    assert rows["onnxruntime/fp32/basic"]["reason"] == "failed: graph level basic refused"
    assert rows["openvino/int8/all+aa"]["status"] == "skipped"
    assert rows["onnxruntime/int8/all"]["reason"].startswith("over budget")
    assert prof_doc["baseline"]["p50_ms"] == 2.0


def test_host_proxy_notes_for_absent_devices():
    assert "no Intel NPU on this host" in host_proxy_note(load_profile("npu"), {"openvino": ["CPU"]})
    assert "host-CPU proxies" in host_proxy_note(load_profile("igpu"), {"openvino": ["CPU"]})
    assert host_proxy_note(load_profile("igpu"), {"openvino": ["CPU", "GPU.0"]}) is None
    assert "no NVIDIA GPU" in host_proxy_note(load_profile("gpu"), {"onnxruntime": ["CPUExecutionProvider"]})
    assert host_proxy_note(load_profile("cpu"), {}) is None


def test_no_pick_is_said_plainly():
    prof = load_profile("cpu")
    pc = compare_profile(prof, lambda c: fake(c.runtime, c.precision, passed=False, cosine=0.5), devices={},
                         precisions=["int8"])
    assert pc.pick is None
    assert pc.notes == ["no candidate holds the accuracy budget: nothing would be packaged for this profile"]


def test_auto_iterations_time_about_a_second_within_bounds():
    assert auto_iterations(0.03) == 2000  # a 30 us model: capped
    assert auto_iterations(10.0) == 100
    assert auto_iterations(150.0) == 20  # a slow model: at least 20 samples for a median
    assert auto_iterations(0.0) == 2000


def test_runoff_figures_decide_the_pick_when_given():
    prof = load_profile("cpu")
    table = {"openvino/int8/all": fake("openvino", "int8", p50=3.0, size=1000),  # slowed by its own benchmark
             "onnxruntime/int8/all": fake("onnxruntime", "int8", p50=1.0, size=1000)}
    evaluate, _ = _runner(table)
    seen = []

    def runoff(results):
        seen.append(sorted(r.candidate.label for r in results))
        return {"openvino/int8/all": 0.6, "onnxruntime/int8/all": 1.0}

    pc = compare_profile(prof, evaluate, precisions=["int8"], devices={}, runoff=runoff)
    assert seen == [["onnxruntime/int8/all", "openvino/int8/all"]]  # only in-budget candidates take part
    assert pc.pick is table["openvino/int8/all"]
    doc = CompareReport(model="m.onnx", profiles=[pc]).to_dict()["profiles"][0]
    rows = {r["candidate"]: r for r in doc["candidates"]}
    assert rows["openvino/int8/all"]["runoff_p50_ms"] == 0.6
    assert rows["onnxruntime/int8/all"]["reason"] == "slower: 1.67x the pick's latency"


def test_a_failed_runoff_falls_back_to_each_candidates_own_benchmark():
    prof = load_profile("cpu")
    table = {"openvino/int8/all": fake("openvino", "int8", p50=3.0),
             "onnxruntime/int8/all": fake("onnxruntime", "int8", p50=1.0)}
    evaluate, _ = _runner(table)

    def runoff(results):
        raise UnsupportedError("device vanished")

    pc = compare_profile(prof, evaluate, precisions=["int8"], devices={}, runoff=runoff)
    assert pc.pick is table["onnxruntime/int8/all"]
    assert pc.notes == ["run-off skipped (device vanished); picked on each candidate's own benchmark"]


def test_merge_pruned_names_rows_by_ratio_and_picks_across_ratios():
    from edgeopt.sdk.compare import Planned, ProfileComparison, merge_pruned

    profile = load_profile("cpu")
    unpruned = ProfileComparison(profile, results=[fake(precision="int8", p50=1.0, size=1000)],
                                 skipped=[Planned(Candidate("openvino", "fp16"), skip="not here")],
                                 notes=["no candidate holds the accuracy budget: nothing would be packaged"])
    half = ProfileComparison(profile, results=[fake(precision="int8", p50=0.6, size=500),
                                               fake(precision="fp32", p50=0.3, passed=False, cosine=0.5)])
    seen: list[list[str]] = []

    def runoff(results):
        seen.append([r.candidate.label for r in results])
        return {label: 1.0 for label in seen[-1]} | {"prune0.5/openvino/int8/all": 0.5}

    pc = merge_pruned(profile, [(0.0, unpruned), (0.5, half)], runoff=runoff)
    assert [r.candidate.label for r in pc.results] == [
        "openvino/int8/all", "prune0.5/openvino/int8/all", "prune0.5/openvino/fp32/all"]
    assert [p.candidate.label for p in pc.skipped] == ["openvino/fp16/all"]
    # one run-off over the in-budget rows of both ratios; the pick is made across ratios, on the run-off figures
    assert seen == [["openvino/int8/all", "prune0.5/openvino/int8/all"]]
    assert pc.pick.candidate.label == "prune0.5/openvino/int8/all" and pc.pick.candidate.prune_ratio == 0.5
    # a ratio with nothing in budget does not say so for the whole profile
    assert pc.notes == []
    assert unpruned.results[0].candidate.prune_ratio is None  # the groups themselves are left as they were
