"""The float-layer searches of ``sdk/pipeline/evaluation.py`` on stand-ins (issue 15, mutation testing).

A fake ``build_and_check`` (or ``_load_reverted``) says PASS once at least ``need`` layers are in float, so each
search's sequence of tries, its bisection limit, what it closes and what it returns are exact. The real searches
on a real model are in test_float_search.py (seconds each); this file runs in well under a second.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from edgeopt.sdk.errors import InputError
from edgeopt.sdk.package import LayerError, LatencyStats, MetricResult, ValidationReport
from edgeopt.sdk.pipeline import evaluation
from edgeopt.sdk.pipeline.progress import NullProgress
from edgeopt.sdk.pipeline.types import Candidate, CandidateResult


class _Loaded:
    def __init__(self, k):
        self.k, self.closed = k, 0

    def close(self):
        self.closed += 1


def _report(passed, float_layers=(), **kw):
    return ValidationReport(samples=1, max_abs_error=0.0, min_cosine=0.5, mean_cosine=0.5, passed=passed,
                            float_layers=list(float_layers), task="generic", **kw)


FIRST = _report(False, sensitive_layers=[LayerError(layer="x", error=0.5)], sensitivity_basis="basis")


class _Builder:
    """build_and_check: PASS from ``need`` layers on; keeps every attempt."""

    def __init__(self, need):
        self.need, self.tries, self.loaded = need, [], []

    def __call__(self, names):
        self.tries.append(len(names))
        loaded = _Loaded(len(names))
        self.loaded.append(loaded)
        return "art", loaded, "outs", _report(len(names) >= self.need, names)


def _ranking(n):
    return [LayerError(layer=f"l{i}", error=1.0 - i / 100) for i in range(n)]


def _closed(builder):
    return [l.k for l in builder.loaded if l.closed]


# ------------------------------------------------------------------ _float_search


def test_float_search_doubles_then_bisects():
    b, progress = _Builder(7), NullProgress()
    art, loaded, outs, report = evaluation._float_search(None, _ranking(7), b, progress, FIRST)
    assert b.tries == [1, 2, 4, 7, 5, 6]
    assert loaded.k == 7 and loaded.closed == 0 and report.passed and (art, outs) == ("art", "outs")
    assert _closed(b) == [1, 2, 4, 5, 6]
    assert report.sensitive_layers == FIRST.sensitive_layers and report.sensitivity_basis == "basis"
    assert report.float_layers == [f"l{i}" for i in range(7)]  # the best-ranked first
    assert progress.notes[0] == "1 layer(s) in float: FAIL [generic]: min output cosine 0.5000, 1 layers in float"
    assert progress.notes[-1].startswith("6 layer(s) in float: FAIL") and len(progress.notes) == 6
    assert progress.warnings == []


def test_float_search_bisect_keeps_the_smaller_passing_set():
    b = _Builder(3)
    _, loaded, _, report = evaluation._float_search(None, _ranking(10), b, NullProgress(), FIRST)
    assert b.tries == [1, 2, 4, 3] and loaded.k == 3
    assert _closed(b) == [1, 2, 4]  # the 4-layer set is closed once 3 holds


def test_float_search_bisects_three_times_at_most():
    b = _Builder(33)
    _, loaded, _, _ = evaluation._float_search(None, _ranking(64), b, NullProgress(), FIRST)
    assert b.tries == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36] and loaded.k == 36


def test_float_search_first_try_holds():
    b = _Builder(1)
    _, loaded, _, _ = evaluation._float_search(None, _ranking(5), b, NullProgress(), FIRST)
    assert b.tries == [1] and loaded.k == 1 and _closed(b) == []


def test_float_search_nothing_holds():
    b, progress = _Builder(99), NullProgress()
    _, loaded, _, report = evaluation._float_search(None, _ranking(5), b, progress, FIRST)
    assert b.tries == [1, 2, 4, 5, 5] and loaded.k == 5 and loaded.closed == 0 and not report.passed
    assert _closed(b) == [1, 2, 4, 5]
    assert report.sensitive_layers == FIRST.sensitive_layers and report.sensitivity_basis == "basis"
    assert progress.warnings == ["no float fallback set met the budget; even all quantizable layers in float missed it"]


# ------------------------------------------------------------------ _revert_search and _greedy_search


@pytest.fixture
def reverted(monkeypatch):
    """_load_reverted replaced: PASS from ``need[0]`` points on (or when ``accept`` says so); calls recorded."""
    state = SimpleNamespace(need=3, tries=[], loaded=[], folders=[], accept=None)

    def fake(prep, backend, job, base, runtime, run_device, hint, folder, names, first_report):
        assert folder.is_dir()
        state.folders.append(folder.name)
        state.tries.append(list(names))
        loaded = _Loaded(len(names))
        state.loaded.append(loaded)
        ok = state.accept(names) if state.accept else len(names) >= state.need
        return "art", loaded, "outs", _report(ok, names)

    monkeypatch.setattr(evaluation, "_load_reverted", fake)
    return state


def _search(kind, tmp_path, ranked, backend=None, prep=None):
    args = (prep or _greedy_prep(), backend or SimpleNamespace(), None, SimpleNamespace(model_file="m"), None, "CPU", "hint",
            tmp_path, NullProgress(), FIRST, ranked)
    return getattr(evaluation, kind)(*args)


def test_revert_search_doubles_bisects_four_times(reverted, tmp_path):
    reverted.need = 33
    found = _search("_revert_search", tmp_path, [f"p{i}" for i in range(64)])
    assert [len(t) for t in reverted.tries] == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 34]
    assert found[1].k == 34 and found[1].closed == 0
    assert reverted.folders == [f"revert{i}" for i in range(11)]
    assert [l.k for l in reverted.loaded if l.closed] == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36]
    assert reverted.tries[0] == ["p0"]


def test_revert_search_edges(reverted, tmp_path):
    assert _search("_revert_search", tmp_path, []) is None and reverted.tries == []
    reverted.need = 99
    (tmp_path / "a").mkdir()
    assert _search("_revert_search", tmp_path / "a", ["a", "b", "c"]) is None
    assert [len(t) for t in reverted.tries] == [1, 2, 3]
    assert all(l.closed for l in reverted.loaded)
    reverted.tries.clear()
    reverted.need = 1
    (tmp_path / "b").mkdir()
    found = _search("_revert_search", tmp_path / "b", ["a", "b", "c"])
    assert reverted.tries == [["a"]] and found[1].closed == 0


class _Scorer:
    """backend.score_reverts: the score of a set of points is ``value(set)``."""

    def __init__(self, value):
        self.value, self.calls = value, []

    def score_reverts(self, model_file, feeds, score, sets, reference):
        self.references = getattr(self, "references", []) + [reference]
        self.models = getattr(self, "models", []) + [model_file]
        self.calls.append([list(s) for s in sets])
        return [self.value(set(s)) for s in sets]

    def layer_reference(self, job):
        return "ref"


def _greedy_prep():
    return SimpleNamespace(heldout=SimpleNamespace(samples=["f"], labels=None), reference_outputs=["r"],
                           profile=SimpleNamespace(accuracy=None), evaluator=None)


def test_greedy_without_score_reverts_is_none(tmp_path):
    assert _search("_greedy_search", tmp_path, ["a"], backend=SimpleNamespace(), prep=_greedy_prep()) is None


def test_greedy_picks_the_best_lift_then_the_smallest_holding_set(reverted, tmp_path):
    # b helps most alone; {b, d} holds (slack >= 0); so does {b, c, d} but it adds more
    values = {frozenset("b"): -0.2, frozenset("bd"): 0.0, frozenset("bcd"): 0.5}
    scorer = _Scorer(lambda s: values.get(frozenset(s), -1.0))
    reverted.accept = lambda names: set(names) == set("bd")
    found = _search("_greedy_search", tmp_path, ["a", "b", "c", "d"], backend=scorer, prep=_greedy_prep())
    assert reverted.tries == [["b"], ["b", "d"]] and found[1].closed == 0
    assert reverted.folders == ["greedy1", "greedy2"]
    assert reverted.loaded[0].closed == 1
    assert scorer.calls[0] == [["a"], ["b"], ["c"], ["d"]]
    assert scorer.calls[1] == [["b", "a"], ["b", "c"], ["b", "d"]]  # chosen points first, b itself left out


def test_greedy_prefers_fewest_points_among_holding_then_higher_score(reverted, tmp_path):
    # module groups join the candidates: "/m.1/x" and "/m.1/y" form one
    ranked = ["/m.1/x", "/m.1/y", "/m.2/z"]
    values = {frozenset(["/m.1/x"]): 0.1, frozenset(["/m.2/z"]): 0.2, frozenset(["/m.1/x", "/m.1/y"]): 0.9}
    scorer = _Scorer(lambda s: values.get(frozenset(s), -1.0))
    reverted.accept = lambda names: True
    _search("_greedy_search", tmp_path, ranked, backend=scorer, prep=_greedy_prep())
    assert scorer.calls[0] == [["/m.1/x"], ["/m.1/y"], ["/m.2/z"], ["/m.1/x", "/m.1/y"]]
    assert reverted.tries == [["/m.2/z"]]  # one point, and of the one-point sets the higher score


def test_greedy_gives_up_after_eight_steps_or_when_nothing_is_left(reverted, tmp_path):
    ranked = [f"p{i}" for i in range(30)]
    scorer = _Scorer(lambda s: -100.0 + len(s))
    reverted.need = 99
    assert _search("_greedy_search", tmp_path, ranked, backend=scorer, prep=_greedy_prep()) is None
    assert len(reverted.tries) == 8 and all(l.closed == 1 for l in reverted.loaded)
    assert len(scorer.calls[0]) == 24  # the pool: the 24 best-ranked points
    assert reverted.tries[-1] == [f"p{i}" for i in range(8)]  # ties: the first
    reverted.tries.clear()
    (tmp_path / "two").mkdir()
    assert _search("_greedy_search", tmp_path / "two", ["a", "b"], backend=scorer, prep=_greedy_prep()) is None
    assert reverted.tries == [["a"], ["a", "b"]]


# ------------------------------------------------------------------ grouping of revert points


def test_module_groups():
    points = ["/model.22/cv3.0/Conv", "/model.1/Conv", "/model.22/cv2.0/Conv", "short", "/a", "/model.1/Act"]
    assert evaluation.module_groups(points) == [["/model.22/cv3.0/Conv", "/model.22/cv2.0/Conv"],
                                                ["/model.1/Conv", "/model.1/Act"]]
    assert evaluation.module_groups(points, min_size=3) == []
    assert evaluation.module_groups(points, min_size=1)[-1] == ["/model.1/Conv", "/model.1/Act"]
    assert evaluation.module_groups(["/m/x", "/m/y"]) == [["/m/x", "/m/y"]]  # exactly three components


def test_sibling_groups():
    points = ["/model.22/cv3.0/cv3.0.2/Conv", "/model.22/cv3.1/cv3.1.2/Conv", "/model.22/cv3.2/cv3.2.2/Conv",
              "/model.22/cv3.0/cv3.0.1/Conv", "/model.21/cv3.0/cv3.0.2/Conv", "/plain/Conv", "/model.5/Conv"]
    groups = evaluation.sibling_groups(points)
    assert groups == [["/model.22/cv3.0/cv3.0.2/Conv", "/model.22/cv3.1/cv3.1.2/Conv",
                       "/model.22/cv3.2/cv3.2.2/Conv", "/model.21/cv3.0/cv3.0.2/Conv"]]
    assert evaluation.sibling_groups(points, max_size=3) == []
    assert evaluation.sibling_groups(points, max_size=4) == groups
    # the deepest indexed component keeps its last index; earlier components are wildcards
    assert evaluation.sibling_groups(["/a.1/b.7", "/a.2/b.7", "/a.1/b.8"]) == [["/a.1/b.7", "/a.2/b.7"]]
    assert evaluation.sibling_groups(["/a.1/x", "/a.2/x"]) == []  # index in the deepest: kept, so apart
    assert evaluation.sibling_groups(["/a.1.3/x", "/a.2.3/x"]) == [["/a.1.3/x", "/a.2.3/x"]]


# ------------------------------------------------------------------ ranking by the task metric


def _rank_prep(n_samples=10, labels=None):
    return SimpleNamespace(heldout=SimpleNamespace(samples=[{"x": np.zeros((2, 3))}] * n_samples, labels=labels),
                           reference_outputs=[f"r{i}" for i in range(n_samples)],
                           profile=SimpleNamespace(accuracy=None), evaluator=SimpleNamespace(task="classify"))


def test_subset_is_the_first_eight_samples_and_their_labels():
    assert evaluation.RANK_SAMPLES == 8
    feeds, refs, labels = evaluation._subset(_rank_prep(10, labels=np.arange(20)))
    assert len(feeds) == 8 and refs == [f"r{i}" for i in range(8)]
    assert list(labels) == list(range(16))  # two rows per sample
    feeds, refs, labels = evaluation._subset(_rank_prep(3))
    assert len(feeds) == 3 and labels is None


class _RankBackend(_Scorer):
    def __init__(self, points, value):
        super().__init__(value)
        self.points = points

    def revert_points(self, model_file, layers):
        assert layers is True
        return self.points


def test_rank_reverts_one_at_a_time_up_to_the_limit():
    points = [f"p{i}" for i in range(64)]
    backend = _RankBackend(points, lambda s: float(int(next(iter(s))[1:]) % 5))
    progress = _RecProgress()
    ranked = evaluation._rank_reverts(_rank_prep(), backend, None, SimpleNamespace(model_file="m"), progress)
    assert len(backend.calls) == 1 and backend.calls[0] == [[p] for p in points]
    assert backend.references == ["ref"] and backend.models == ["m"]
    assert progress.stages == ["rank 64 activation quantizers by the classify metric (one at a time)"]
    assert ranked[0] == ("p4", 4.0) and ranked[-1] == ("p60", 0.0) and len(ranked) == 64


def test_rank_reverts_by_groups_beyond_the_limit():
    points = [f"p{i}" for i in range(65)]  # 65 > 64: groups of ceil(65 / 32) = 3
    score = {"p7": 9.0, "p6": 5.0}

    def value(s):
        return max(score.get(p, 0.0) for p in s) - 0.001 * min(int(p[1:]) for p in s)

    backend = _RankBackend(points, value)
    progress = _RecProgress()
    ranked = evaluation._rank_reverts(_rank_prep(), backend, None, SimpleNamespace(model_file="m"), progress)
    assert progress.stages == ["rank 22 groups of 3 activation quantizers by the classify metric",
                               "rank the 30 quantizers of the best groups one at a time"]
    assert backend.references == ["ref", "ref"]
    groups = backend.calls[0]
    assert len(groups) == 22 and groups[0] == ["p0", "p1", "p2"] and groups[-1] == ["p63", "p64"]
    # the best 32 // 3 = 10 groups are judged point by point: the group of p6, p7, p8 first
    singles = backend.calls[1]
    assert len(singles) == 30 and singles[:3] == [["p6"], ["p7"], ["p8"]]
    assert [p for p, _ in ranked[:2]] == ["p7", "p6"] and len(ranked) == 65
    assert len({p for p, _ in ranked}) == 65
    # the points of groups not judged singly follow with their group's score
    rest = ranked[30:]
    assert rest[0][1] == pytest.approx(value({"p30", "p31", "p32"})) and rest[0][0] == "p30"


# ------------------------------------------------------------------ sensitivity, requantize, faster


class _SensBackend:
    def __init__(self, layers=("a",), reference="ref.onnx", probes=True):
        self.layers_, self.reference, self.probes, self.seen = list(layers), reference, probes, []

    def layer_reference(self, job):
        return self.reference

    def layers(self, path):
        self.seen.append(("layers", path))
        return [SimpleNamespace(name=n, upstream=[]) for n in self.layers_]

    def layer_probe(self, path, layers):
        self.seen.append(("probe", path))
        ok = self.probes is True or self.probes == path
        return (lambda feed: {n: np.ones(2) for n in self.layers_}) if ok else None


def test_sensitivity_reference_and_empty_cases(monkeypatch):
    got = []
    monkeypatch.setattr(evaluation.accuracy, "layer_errors", lambda layers, ref, opt, feeds: got.append(feeds) or ["e"])
    prep = SimpleNamespace(heldout=SimpleNamespace(samples=list(range(10))))
    art = SimpleNamespace(model_file="int8.onnx")
    backend = _SensBackend()
    assert evaluation._sensitivity(backend, SimpleNamespace(precision="int8", source="src"), art, prep) == ["e"]
    assert got == [[0, 1, 2, 3]] and evaluation.SENSITIVITY_SAMPLES == 4
    assert backend.seen == [("layers", "ref.onnx"), ("probe", "ref.onnx"), ("probe", "int8.onnx")]
    backend = _SensBackend()
    evaluation._sensitivity(backend, SimpleNamespace(precision="fp16", source="src"), art, prep)
    assert backend.seen[0] == ("layers", "src")
    assert evaluation._sensitivity(_SensBackend(reference=None), SimpleNamespace(precision="int8"), art, prep) == []
    assert evaluation._sensitivity(_SensBackend(layers=()), SimpleNamespace(precision="int8"), art, prep) == []
    assert evaluation._sensitivity(_SensBackend(probes=False), SimpleNamespace(precision="int8"), art, prep) == []
    # either probe missing is enough to give up
    assert evaluation._sensitivity(_SensBackend(probes="ref.onnx"), SimpleNamespace(precision="int8"), art, prep) == []
    assert evaluation._sensitivity(_SensBackend(probes="int8.onnx"), SimpleNamespace(precision="int8"), art, prep) == []
    assert len(got) == 2


def test_requantize_search_ranks_consumers_of_the_best_points_first(monkeypatch):
    seen = {}
    monkeypatch.setattr(evaluation, "_sensitivity",
                        lambda *a: [LayerError(layer="c", error=0.9), LayerError(layer="z", error=0.5)])

    def fake_search(prep, ranking, build, progress, first):
        seen["ranking"] = [(e.layer, e.error) for e in ranking]
        return "art", seen.setdefault("loaded", _Loaded(0)), "outs", _report(seen.get("pass", True))

    monkeypatch.setattr(evaluation, "_float_search", fake_search)
    backend = SimpleNamespace(revert_consumers=lambda f: {"p1": ["c", "b"], "p2": ["b", "a"]})
    progress = _RecProgress()
    args = (None, backend, None, SimpleNamespace(model_file="m"), None, progress, FIRST, ["p2", "p1", "p3"])
    found = evaluation._requantize_search(*args)
    assert progress.stages == ["whole layers in float (re-quantize)"]
    assert seen["ranking"] == [("b", 0.0), ("a", 0.0), ("c", 0.0), ("z", 0.5)]
    assert found[1].closed == 0 and found[3].passed
    seen.update({"pass": False})
    assert evaluation._requantize_search(*args) is None and seen["loaded"].closed == 1
    monkeypatch.setattr(evaluation, "_sensitivity", lambda *a: [])
    backend.revert_consumers = lambda f: {}
    assert evaluation._requantize_search(*args) is None


def test_faster_keeps_the_lower_median_and_closes_the_other(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(evaluation.time, "perf_counter", lambda: clock[0])

    class Timed(_Loaded):
        def __init__(self, k, costs):
            super().__init__(k)
            self.costs, self.calls = list(costs), 0

        def infer(self, feed):
            assert feed == "feed"
            clock[0] += self.costs[self.calls % len(self.costs)]
            self.calls += 1

    prep = SimpleNamespace(heldout=SimpleNamespace(samples=["feed"]))
    # a: 200 ms in 8 runs of 15, 10 ms in 7 (its lower third is fast, its median is not); b: 150 ms
    a = ("art", Timed(1, [0.2] * 8 + [0.01] * 7), "o", _report(True, ["x"]))
    b = ("art", Timed(2, [0.15]), "o", _report(True, ["x", "y", "z"]))
    progress = NullProgress()
    assert evaluation._faster(prep, a, b, progress) is b
    assert a[1].closed == 1 and b[1].closed == 0 and a[1].calls == 15 and b[1].calls == 15
    assert progress.notes == ["kept 3 float layer(s) (150.00 ms) over 1 (200.00 ms)"]
    # a tie keeps the first
    a2 = ("art", Timed(1, [0.001]), "o", _report(True, ["x"]))
    b2 = ("art", Timed(2, [0.001]), "o", _report(True, ["y"]))
    assert evaluation._faster(prep, a2, b2, NullProgress()) is a2 and b2[1].closed == 1
    assert evaluation._faster(prep, a2, None, NullProgress()) is a2


# ------------------------------------------------------------------ small helpers and the result


def test_device_options():
    assert evaluation.device_options({}, "CPU") is None and evaluation.device_options(None, "CPU") is None
    opts = {"INFERENCE_PRECISION_HINT": "f32"}
    got = evaluation.device_options(opts, "CPU")
    assert got == opts and got is not opts
    assert evaluation.device_options(opts, "GPU") is None


def test_host_arch_matches(monkeypatch):
    import platform

    profile = SimpleNamespace(target=SimpleNamespace(arch=("x86_64",)))
    for machine, ok in (("AMD64", True), ("x86_64", True), ("arm64", False), ("aarch64", False)):
        monkeypatch.setattr(platform, "machine", lambda m=machine: m)
        assert evaluation._host_arch_matches(profile) is ok, machine
    monkeypatch.setattr(platform, "machine", lambda: "ARM64")
    assert evaluation._host_arch_matches(SimpleNamespace(target=SimpleNamespace(arch=("aarch64",))))


def _check(name, rule, **kw):
    base = dict(name=name, fp32=100.0, optimized=0.912345, drop=1.5, bound=0.9, rule=rule, passed=True)
    return MetricResult(**{**base, **kw})


def test_accuracy_line_exact():
    r = _report(True, checks=[_check("accuracy", "max_drop", optimized=98.5, bound=2.0), _check("top-1", "min"),
                              _check("top-5", ""), _check("fourth", "")])
    assert evaluation._accuracy_line(r) == ("PASS [generic]: accuracy 100 -> 98.5 (drop 1.5, budget 2), "
                                            "top-1 0.9123 (budget 0.9), top-5 0.9123, min output cosine 0.5000")
    r = _report(False, ["a", "b"])
    assert evaluation._accuracy_line(r) == "FAIL [generic]: min output cosine 0.5000, 2 layers in float"


def test_pick_the_fastest_passing_result():
    def res(label, ok=True, passed=True, p50=1.0):
        stats = None if p50 is None else LatencyStats(p50_ms=p50, p90_ms=p50, p99_ms=p50, mean_ms=p50,
                                                       throughput_ips=1.0, iterations=1)
        return CandidateResult(candidate=Candidate("onnxruntime", label), ok=ok, passed=passed, optimized=stats)

    results = [res("a", p50=3.0), res("b", ok=False, p50=1.0), res("c", passed=False, p50=1.0), res("d", p50=None),
               res("e", p50=2.0), res("f", p50=2.0)]
    assert evaluation.pick(results).candidate.precision == "e"
    assert evaluation.pick(results[1:4]) is None and evaluation.pick([]) is None


def test_evaluate_turns_errors_into_one_line(monkeypatch):
    cand = Candidate("onnxruntime", "int8")
    prep = SimpleNamespace(source=SimpleNamespace(size_bytes=123))

    def ok(prep, cand, progress, result):
        assert (result.ok, result.passed) == (False, False)

    monkeypatch.setattr(evaluation, "_evaluate", ok)
    r = evaluation.evaluate(prep, cand, NullProgress())
    assert (r.ok, r.passed, r.source_size_bytes, r.error) == (True, False, 123, None)

    err = InputError("bad   input", hint="fix it")
    monkeypatch.setattr(evaluation, "_evaluate", lambda *a: (_ for _ in ()).throw(err))
    r = evaluation.evaluate(prep, cand, NullProgress())
    assert (r.ok, r.passed, r.error, r.exception) == (False, False, "bad input (fix it)", err)

    monkeypatch.setattr(evaluation, "_evaluate", lambda *a: (_ for _ in ()).throw(RuntimeError("x  y\nz" + "w" * 400)))
    r = evaluation.evaluate(prep, cand, NullProgress())
    assert r.error == "RuntimeError: " + ("x y z" + "w" * 400)[:300] and not r.ok and not r.passed
    assert type(r.exception).__name__ == "UnsupportedError"
    assert r.exception.message == f"onnxruntime could not build the model (int8): {r.error}"


# ------------------------------------------------------------------ _evaluate on stand-ins: the order of the searches


class _RecProgress(NullProgress):
    def __init__(self):
        super().__init__()
        self.stages = []

    def stage(self, name):
        self.stages.append(name)
        return super().stage(name)


class _EvalLoaded(_Loaded):
    def __init__(self, float_layers, batch_dim=1, input_shape=None):
        super().__init__(len(float_layers))
        self.float_layers = float_layers
        self.inputs = [SimpleNamespace(shape=(batch_dim, 3) if input_shape is None else input_shape)]
        self.outputs = ["out"]


def _harness(monkeypatch, tmp_path, *, precision="int8", aware=True, need=0, ranked=True, fmt="onnx",
             runtimes=(), arch=None, batch_dim=1, spec_batch=1, state_pairs=(), greedy=None, opt_p50=0.5,
             feeds=None, input_shape=None):
    """A prepared model and a backend of stand-ins; returns (prep, cand, log)."""
    import platform

    from edgeopt.agent import runtimes as agent_runtimes
    from edgeopt.sdk import backends
    from edgeopt.sdk.pipeline import benchmark

    log = SimpleNamespace(builds=[], check_ops=[], loads=[], calls=[], measure=None, loaded=[], jobs=[], rt=None)
    host = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())

    class Backend:
        def check_ops(self, source, fmt_, name):
            log.check_ops.append((source, fmt_, name))

        def run_device(self, rt):
            log.rt = rt
            return "NPU", "CPU", False

        def build(self, job):
            log.builds.append((list(job.float_layers), job.workdir.name, job.calibration))
            log.jobs.append((job.workdir.parent, job.runtime_options))
            model = job.workdir / "model.onnx"
            model.write_bytes(b"x" * 10)
            return evaluation.Artifact(model_file=model, files={"model.onnx": model}, runtime="onnxruntime",
                                       precision=job.precision, float_layers=list(job.float_layers),
                                       notes=["a note", "no tensor was quantized here"], runtime_options={"H": 1})

        def revert_layers(self, model_file):
            return {"q1": "layer1"}

    if ranked:
        Backend.score_reverts = lambda self, *a: []

    class Runtime:
        def load(self, model_file, device, threads, performance_hint, options):
            log.loads.append((device, threads, performance_hint, options))
            loaded = _EvalLoaded(list(log.builds[-1][0]), batch_dim, input_shape)
            log.loaded.append(loaded)
            return loaded

    monkeypatch.setattr(backends, "get_backend", lambda name: Backend())
    monkeypatch.setattr(agent_runtimes, "get_runtime", lambda name: Runtime())

    def compare(ref, outs, budget, labels, evaluator):
        passed = len(outs) >= need
        checks = [MetricResult(name="m", fp32=1.0, optimized=0.5 + 0.1 * len(outs), drop=0.0, bound=0.6, rule="min",
                               passed=passed)]
        return _report(passed, checks=checks)

    monkeypatch.setattr(evaluation.accuracy, "compare", compare)

    def measure(models, feeds, batch, iterations, runtimes=None):
        log.measure = (models, feeds, batch, iterations, runtimes)
        stats = lambda p50: LatencyStats(p50_ms=p50, p90_ms=p50, p99_ms=p50, mean_ms=p50, throughput_ips=1.0,
                                         iterations=iterations)
        return {"fp32": stats(2.0), "optimized": stats(opt_p50)}

    monkeypatch.setattr(benchmark, "measure", measure)

    def record(name, value):
        def fake(*a):
            log.calls.append(name)
            return value(*a) if callable(value) else value
        monkeypatch.setattr(evaluation, name, fake)

    record("_rank_reverts", [("q1", 0.9), ("q2", 0.4)] + [(f"r{i}", 0.1) for i in range(12)])
    record("_sensitivity", [LayerError(layer=f"s{i}", error=0.1) for i in range(12)])
    record("_greedy_search", greedy)
    record("_revert_search", None)
    record("_requantize_search", "requantized")
    record("_faster", lambda prep, a, b, progress: a)
    record("_float_search", lambda prep, ranking, build, progress, first: build([e.layer for e in ranking[:2]]))

    workdir = tmp_path / "work" / "deeper"  # made by the evaluation, parents too
    spec_shape = (spec_batch, 3) if spec_batch is not None else ()
    prep = SimpleNamespace(
        profile=SimpleNamespace(runtimes=[SimpleNamespace(runtime="openvino"), SimpleNamespace(runtime="onnxruntime")],
                                performance_hint=SimpleNamespace(value="latency"),
                                target=SimpleNamespace(arch=(arch or host,)), batch_size=4, accuracy=None),
        fp32_model=lambda level: (tmp_path / f"fp32-{level}.onnx", SimpleNamespace(line=lambda: "graph (all): 9 -> 7")),
        workdir=workdir, runtimes=list(runtimes),
        source=SimpleNamespace(format=fmt, path=tmp_path / "model.onnx", size_bytes=1),
        calibration=SimpleNamespace(samples=["calib"]), request=SimpleNamespace(torch_source=None, bench_iterations=7),
        threads=2, run=lambda loaded: list(loaded.float_layers), reference_outputs=[], evaluator=SimpleNamespace(
            task="generic"), heldout=SimpleNamespace(labels=None, samples=[{"x": np.zeros((2, 3))} if feeds is None else feeds]),
        state_pairs=list(state_pairs), specs=[SimpleNamespace(shape=spec_shape)], baseline="fp32-model",
        baseline_runtime="onnxruntime")
    cand = Candidate("onnxruntime", precision, "all", aware)
    return prep, cand, log


def _run(prep, cand):
    progress = _RecProgress()
    result = CandidateResult(candidate=cand, ok=False, passed=False)
    evaluation._evaluate(prep, cand, progress, result)
    return result, progress


def test_evaluate_a_passing_candidate_end_to_end(monkeypatch, tmp_path):
    prep, cand, log = _harness(monkeypatch, tmp_path, precision="int8", aware=False, need=0)
    result, progress = _run(prep, cand)
    assert log.check_ops == [(tmp_path / "fp32-all.onnx", "onnx", "model.onnx")]
    assert log.builds == [([], "attempt0", ["calib"])]
    assert log.rt is prep.profile.runtimes[1] and log.jobs == [(tmp_path / "work" / "deeper" / "onnxruntime_int8_all",
                                                                prep.profile.runtimes[1])]
    assert log.loads == [("CPU", 2, "latency", {"H": 1})]
    assert progress.stages == ["onnxruntime/int8/all: check ops", "onnxruntime/int8/all: build",
                               "onnxruntime/int8/all: accuracy", "onnxruntime/int8/all: benchmark"]
    assert result.decisions == ["graph (all): 9 -> 7", "onnxruntime/int8/all: no tensor was quantized here"]
    assert progress.notes[:3] == ["graph (all): 9 -> 7", "a note", "no tensor was quantized here"]
    assert progress.notes[3].startswith("PASS [generic]: m 0.5000 (budget 0.6)")
    assert progress.notes[4] == "p50 0.500 ms vs fp32 2.000 ms (4.00x), batch 2, on CPU"
    assert (result.device, result.run_device, result.host_proxy) == ("NPU", "CPU", False)
    assert result.passed and result.validation.passed and result.size_bytes == 10 and log.calls == []
    assert (result.speedup, result.batch) == (4.0, 2) and result.fp32.p50_ms == 2.0
    assert result.outputs == [] and result.tensors == (log.loaded[0].inputs, ["out"])
    assert log.loaded[0].closed == 1  # closed once the benchmark is done
    models, feeds, batch, iterations, runtimes = log.measure
    assert models == {"fp32": "fp32-model", "optimized": log.loaded[0]} and iterations == 7 and batch == 2
    assert runtimes == {"fp32": "onnxruntime", "optimized": "onnxruntime"}
    assert feeds["fp32"] is prep.heldout.samples[0] and feeds["optimized"] is prep.heldout.samples[0]


def test_evaluate_benchmark_batches_and_proxy(monkeypatch, tmp_path):
    # a dynamic batch: fp32 runs at the profile's batch size; the optimized model too unless its batch is fixed
    prep, cand, log = _harness(monkeypatch, tmp_path, precision="fp16", aware=False, arch="armv7l",
                               spec_batch="N", batch_dim="N", runtimes=("onnxruntime",), fmt="tflite")
    result, progress = _run(prep, cand)
    assert log.check_ops == [] and log.builds[0][2] is None  # runtime checked before; no calibration for fp16
    assert result.decisions == ["onnxruntime/fp16/all: no tensor was quantized here"]  # no graph line: not ONNX
    assert result.host_proxy and progress.notes[-1].endswith("batch 4, on host CPU as a proxy for NPU")
    _, feeds, batch, _, _ = log.measure
    assert batch == 4 and feeds["fp32"]["x"].shape == (4, 3) and feeds["optimized"]["x"].shape == (4, 3)
    (tmp_path / "b").mkdir()
    prep, cand, log = _harness(monkeypatch, tmp_path / "b", spec_batch="N", batch_dim=1)
    result, _ = _run(prep, cand)
    _, feeds, batch, _, _ = log.measure
    assert feeds["fp32"]["x"].shape == (4, 3) and feeds["optimized"]["x"].shape == (2, 3)  # fixed batch: as given
    # a stateful model runs as the data gives it
    (tmp_path / "c").mkdir()
    prep, cand, log = _harness(monkeypatch, tmp_path / "c", spec_batch="N", batch_dim="N", state_pairs=[("s", "s")])
    _run(prep, cand)
    assert log.measure[2] == 2
    (tmp_path / "d").mkdir()
    prep, cand, log = _harness(monkeypatch, tmp_path / "d", spec_batch=None, batch_dim="N")
    _run(prep, cand)
    assert log.measure[2] == 2  # no shape known: static


def test_evaluate_failing_int8_without_task_ranking_searches_by_layer_error(monkeypatch, tmp_path):
    prep, cand, log = _harness(monkeypatch, tmp_path, need=2, ranked=False)
    (prep.workdir / "onnxruntime_int8_all_aa").mkdir(parents=True)  # a folder left from before is fine
    result, progress = _run(prep, cand)
    assert log.jobs[0][0] == prep.workdir / "onnxruntime_int8_all_aa"
    assert log.calls == ["_sensitivity", "_sensitivity", "_float_search"]
    assert [b[0] for b in log.builds] == [[], ["s0", "s1"]] and log.builds[1][1] == "attempt1"
    v = result.validation
    assert v.passed and result.passed and v.float_layers == ["s0", "s1"]
    assert log.loaded[0].closed == 1 and log.loaded[1].closed == 1


def test_evaluate_failing_int8_ranked_by_the_task_metric(monkeypatch, tmp_path):
    prep, cand, log = _harness(monkeypatch, tmp_path, need=99)
    result, _ = _run(prep, cand)
    assert log.calls[:3] == ["_rank_reverts", "_greedy_search", "_revert_search"]
    assert log.calls[3:] == ["_sensitivity", "_float_search"]  # nothing held: the layer search follows
    assert not result.passed
    (tmp_path / "b").mkdir()
    prep, cand, log = _harness(monkeypatch, tmp_path / "b", need=99, aware=False)
    v = _run(prep, cand)[0].validation
    assert v.sensitivity_basis == "generic metric gained when kept in float"
    # the score of the failing report is 0.5 - 0.6 = -0.1: each gain is its score minus that, never below 0
    assert [(e.layer, round(e.error, 6)) for e in v.sensitive_layers[:3]] == [("layer1", 1.0), ("q2", 0.5),
                                                                              ("r0", 0.2)]
    assert len(v.sensitive_layers) == 10


def test_evaluate_many_reverts_try_the_requantize_search_too(monkeypatch, tmp_path):
    many = [f"p{i}" for i in range(9)]
    art = SimpleNamespace(size_bytes=5)
    greedy = lambda *a: (art, _EvalLoaded(many), "outs", _report(True, many))  # noqa: E731
    prep, cand, log = _harness(monkeypatch, tmp_path, need=99, greedy=greedy)
    result, _ = _run(prep, cand)
    assert log.calls == ["_rank_reverts", "_greedy_search", "_requantize_search", "_faster"]
    assert result.passed and result.validation.float_layers == many and log.loaded[0].closed == 1
    assert result.size_bytes == 5 and result.outputs == "outs"
    eight = many[:8]
    (tmp_path / "b").mkdir()
    greedy = lambda *a: (art, _EvalLoaded(eight), "outs", _report(True, eight))  # noqa: E731
    prep, cand, log = _harness(monkeypatch, tmp_path / "b", need=99, greedy=greedy)
    _run(prep, cand)
    assert log.calls == ["_rank_reverts", "_greedy_search"]  # eight is not many


def test_evaluate_no_search_for_float_candidates_or_without_accuracy_aware(monkeypatch, tmp_path):
    for i, (precision, aware) in enumerate((("fp32", True), ("as-exported", True))):
        (tmp_path / str(i)).mkdir()
        prep, cand, log = _harness(monkeypatch, tmp_path / str(i), precision=precision, aware=aware, need=99)
        result, _ = _run(prep, cand)
        assert log.calls == [] and not result.passed and result.validation.sensitive_layers == []
    (tmp_path / "n").mkdir()
    prep, cand, log = _harness(monkeypatch, tmp_path / "n", aware=False, need=99)
    result, _ = _run(prep, cand)
    assert log.calls == ["_rank_reverts"] and len(result.validation.sensitive_layers) == 10
    (tmp_path / "f").mkdir()
    prep, cand, log = _harness(monkeypatch, tmp_path / "f", precision="fp16", need=99)
    result, _ = _run(prep, cand)
    assert log.calls == ["_sensitivity", "_sensitivity", "_float_search"]  # no task ranking outside int8
    (tmp_path / "g").mkdir()
    prep, cand, log = _harness(monkeypatch, tmp_path / "g", precision="fp16", aware=False, need=99)
    result, _ = _run(prep, cand)
    assert log.calls == ["_sensitivity"] and result.validation.sensitivity_basis == "error added vs fp32"
    assert [e.layer for e in result.validation.sensitive_layers] == [f"s{i}" for i in range(10)]


def test_evaluate_benchmark_edges(monkeypatch, tmp_path):
    # a scalar input: the feeds run as given (no batch to repeat)
    (tmp_path / "a").mkdir()
    feeds = {"x": np.zeros((2, 3)), "t": np.float32(1.0)}
    prep, cand, log = _harness(monkeypatch, tmp_path / "a", spec_batch="N", batch_dim="N", feeds=feeds)
    _run(prep, cand)
    assert log.measure[1]["fp32"] is feeds and log.measure[2] == 2
    # a fixed batch but another dynamic dimension: the optimized model still gets the data as given
    (tmp_path / "b").mkdir()
    prep, cand, log = _harness(monkeypatch, tmp_path / "b", spec_batch="N", input_shape=(1, "W"))
    _run(prep, cand)
    assert log.measure[1]["optimized"] is prep.heldout.samples[0] and log.measure[1]["fp32"]["x"].shape == (4, 3)
    # a model without inputs runs one sample
    (tmp_path / "c").mkdir()
    prep, cand, log = _harness(monkeypatch, tmp_path / "c", feeds={})
    result, _ = _run(prep, cand)
    assert log.measure[2] == 1 and result.batch == 1
    # an optimized p50 of 0 (below the timer's resolution): no speedup figure, and no crash printing it
    (tmp_path / "d").mkdir()
    prep, cand, log = _harness(monkeypatch, tmp_path / "d", opt_p50=0.0)
    result, progress = _run(prep, cand)
    assert result.speedup is None
    assert progress.notes[-1] == "p50 0.000 ms vs fp32 2.000 ms (speedup n/a), batch 2, on CPU"


def test_rank_reverts_judges_at_least_one_group_alone():
    points = [f"p{i}" for i in range(545)]  # groups of ceil(545 / 32) = 18: 32 // 18 = 1 group judged singly
    backend = _RankBackend(points, lambda s: -min(int(p[1:]) for p in s))
    ranked = evaluation._rank_reverts(_rank_prep(), backend, None, SimpleNamespace(model_file="m"), NullProgress())
    assert len(backend.calls[0]) == 31 and len(backend.calls[1]) == 18
    assert [p for p, _ in ranked[:18]] == [f"p{i}" for i in range(18)] and len(ranked) == 545


def test_greedy_takes_a_point_at_exactly_zero_slack_as_holding(reverted, tmp_path):
    ranked = ["/m.1/x", "/m.1/y", "/m.2/z"]
    values = {frozenset(["/m.1/x"]): 0.0, frozenset(["/m.1/x", "/m.1/y"]): 0.9}
    scorer = _Scorer(lambda s: values.get(frozenset(s), -1.0))
    reverted.accept = lambda names: True
    progress = _RecProgress()
    evaluation._greedy_search(_greedy_prep(), scorer, None, SimpleNamespace(model_file="m"), None, "CPU", "hint",
                              tmp_path, progress, FIRST, ranked)
    assert reverted.tries == [["/m.1/x"]]  # holds with one point: preferred to the better group of two
    assert scorer.references == ["ref"] and scorer.models == ["m"]
    assert progress.stages == ["greedy search over 4 points and modules (re-judged each step)"]


def test_load_reverted_builds_loads_and_judges(monkeypatch, tmp_path):
    seen = {}

    class Backend:
        def build_reverted(self, model_file, names, folder, precision, reference):
            seen["build"] = (model_file, list(names), folder, precision, reference)
            return SimpleNamespace(model_file="rev.onnx", runtime_options={"H": 1}, float_layers=["n1", "n2"])

        def layer_reference(self, job):
            return "ref"

    class Runtime:
        def load(self, model_file, device, threads, performance_hint, options):
            seen["load"] = (model_file, device, threads, performance_hint, options)
            return "loaded"

    def compare(ref, outs, budget, labels, evaluator):
        seen["compare"] = (ref, outs, budget, labels, evaluator)
        return _report(True)

    monkeypatch.setattr(evaluation.accuracy, "compare", compare)
    prep = SimpleNamespace(threads=3, run=lambda loaded: ["outs of " + loaded], reference_outputs=["r"],
                           profile=SimpleNamespace(accuracy="budget"), heldout=SimpleNamespace(labels="L"),
                           evaluator="ev")
    art, loaded, outs, report = evaluation._load_reverted(prep, Backend(), None, SimpleNamespace(model_file="q.onnx",
                                                          precision="int8"), Runtime(), "CPU", "latency", tmp_path,
                                                          ["n1"], FIRST)
    assert seen["build"] == ("q.onnx", ["n1"], tmp_path, "int8", "ref")
    assert seen["load"] == ("rev.onnx", "CPU", 3, "latency", {"H": 1})
    assert seen["compare"] == (["r"], ["outs of loaded"], "budget", "L", "ev")
    assert loaded == "loaded" and outs == ["outs of loaded"] and art.float_layers == ["n1", "n2"]
    assert report.float_layers == ["n1", "n2"] and report.sensitive_layers == FIRST.sensitive_layers
    assert report.sensitivity_basis == "basis"
    art, *_ = evaluation._load_reverted(prep, Backend(), None, SimpleNamespace(model_file="q.onnx", precision="int8"),
                                        Runtime(), "GPU", "latency", tmp_path, ["n1"], FIRST)
    assert seen["load"][4] is None  # runtime options are the CPU plugin's only


def test_revert_search_bisect_steps_and_notes(reverted, tmp_path):
    reverted.need = 4
    progress = NullProgress()
    found = evaluation._revert_search(_greedy_prep(), SimpleNamespace(), None, SimpleNamespace(model_file="m"), None,
                                      "CPU", "hint", tmp_path, progress, FIRST, [f"p{i}" for i in range(8)])
    assert [len(t) for t in reverted.tries] == [1, 2, 4, 3] and found[1].k == 4 and found[1].closed == 0
    assert [l.k for l in reverted.loaded if l.closed] == [1, 2, 3]
    assert progress.notes[0] == "1 point(s) in float: FAIL [generic]: min output cosine 0.5000, 1 layers in float"
    assert progress.notes[2] == "4 point(s) in float: PASS [generic]: min output cosine 0.5000, 4 layers in float"
    reverted.tries.clear()
    reverted.need = 3
    (tmp_path / "b").mkdir()
    evaluation._revert_search(_greedy_prep(), SimpleNamespace(), None, SimpleNamespace(model_file="m"), None,
                              "CPU", "hint", tmp_path / "b", NullProgress(), FIRST, [f"p{i}" for i in range(4)])
    assert [len(t) for t in reverted.tries] == [1, 2, 4, 3]


def test_greedy_notes_each_step(reverted, tmp_path):
    scorer = _Scorer(lambda s: -1.0 + 0.1 * len(s))
    reverted.need = 2
    progress = NullProgress()
    evaluation._greedy_search(_greedy_prep(), scorer, None, SimpleNamespace(model_file="m"), None, "CPU", "hint",
                              tmp_path, progress, FIRST, ["a", "b"])
    assert progress.notes == ["greedy, 1 point(s) in float: FAIL [generic]: min output cosine 0.5000, 1 layers in float",
                              "greedy, 2 point(s) in float: PASS [generic]: min output cosine 0.5000, 2 layers in float"]


def test_sibling_groups_size_limit_and_points_without_index():
    twelve = [f"/m.{i}/conv.2" for i in range(12)]
    assert evaluation.sibling_groups(twelve) == [twelve]
    assert evaluation.sibling_groups(twelve + ["/m.12/conv.2"]) == []  # 13 siblings: too many to help together
    # a point without any index is passed over, and the rest still grouped
    assert evaluation.sibling_groups(["/plain/Conv", "/a.1/x.3", "/a.2/x.3"]) == [["/a.1/x.3", "/a.2/x.3"]]
