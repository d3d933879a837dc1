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
    ranked = evaluation._rank_reverts(_rank_prep(), backend, None, SimpleNamespace(model_file="m"), NullProgress())
    assert len(backend.calls) == 1 and backend.calls[0] == [[p] for p in points]
    assert ranked[0] == ("p4", 4.0) and ranked[-1] == ("p60", 0.0) and len(ranked) == 64


def test_rank_reverts_by_groups_beyond_the_limit():
    points = [f"p{i}" for i in range(65)]  # 65 > 64: groups of ceil(65 / 32) = 3
    score = {"p7": 9.0, "p6": 5.0}

    def value(s):
        return max(score.get(p, 0.0) for p in s) - 0.001 * min(int(p[1:]) for p in s)

    backend = _RankBackend(points, value)
    ranked = evaluation._rank_reverts(_rank_prep(), backend, None, SimpleNamespace(model_file="m"), NullProgress())
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
        return (lambda feed: {n: np.ones(2) for n in self.layers_}) if self.probes else None


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
    args = (None, backend, None, SimpleNamespace(model_file="m"), None, NullProgress(), FIRST, ["p2", "p1", "p3"])
    found = evaluation._requantize_search(*args)
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
            clock[0] += self.costs[self.calls % len(self.costs)]
            self.calls += 1

    prep = SimpleNamespace(heldout=SimpleNamespace(samples=["feed"]))
    # a: mostly 2 ms with a few fast outliers (its mean is lower, its median is not); b: 1.5 ms
    a = ("art", Timed(1, [0.002] * 10 + [0.0001] * 5), "o", _report(True, ["x"]))
    b = ("art", Timed(2, [0.0015]), "o", _report(True, ["x", "y", "z"]))
    progress = NullProgress()
    assert evaluation._faster(prep, a, b, progress) is b
    assert a[1].closed == 1 and b[1].closed == 0 and a[1].calls == 15 and b[1].calls == 15
    assert progress.notes == ["kept 3 float layer(s) (1.50 ms) over 1 (2.00 ms)"]
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
