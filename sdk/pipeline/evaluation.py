"""Evaluate one candidate: build, validate (with the float-layer search), benchmark against fp32."""
from __future__ import annotations

import logging
import math
import time

import numpy as np

from ..errors import EdgeoptError, UnsupportedError
from ..package import LayerError
from ..profile import HardwareProfile
from . import accuracy, benchmark
from .data import _rows
from .prepared import Prepared
from .progress import Progress
from .types import Artifact, Candidate, CandidateResult

log = logging.getLogger(__name__)

SENSITIVITY_SAMPLES = 4  # held-out samples used for per-layer errors (intermediate tensors are large)


def evaluate(prep: Prepared, cand: Candidate, progress: Progress) -> CandidateResult:
    result = CandidateResult(candidate=cand, ok=False, passed=False, source_size_bytes=prep.source.size_bytes)
    try:
        _evaluate(prep, cand, progress, result)
        result.ok = True
    except EdgeoptError as exc:
        result.error = exc.one_line()
        result.exception = exc
    except Exception as exc:  # a runtime's own error: keep the other candidates going, report it in one line
        log.debug("candidate %s failed", cand.label, exc_info=True)
        result.error = f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:300]}"
        result.exception = UnsupportedError(f"{cand.runtime} could not build the model ({cand.precision}): "
                                            f"{result.error}")
    return result


def _evaluate(prep: Prepared, cand: Candidate, progress: Progress, result: CandidateResult) -> None:
    from ...agent.runtimes import get_runtime
    from ..backends import BuildJob, get_backend

    backend = get_backend(cand.runtime)
    rt_opts = next(rt for rt in prep.profile.runtimes if rt.runtime == cand.runtime)
    source, graph = prep.fp32_model(cand.graph_level)
    workdir = prep.workdir / cand.label.replace("/", "_").replace("+", "_")
    workdir.mkdir(parents=True, exist_ok=True)
    if cand.runtime not in prep.runtimes:
        with progress.stage(f"{cand.label}: check ops"):
            backend.check_ops(source, prep.source.format, prep.source.path.name)
    if prep.source.format == "onnx":
        progress.note(graph.line())
        result.decisions.append(graph.line())
    job = BuildJob(source=source, source_format=prep.source.format, precision=cand.precision,
                   graph_level=cand.graph_level, workdir=workdir, profile=prep.profile, runtime_options=rt_opts,
                   calibration=prep.calibration.samples if prep.calibration and cand.precision == "int8" else None,
                   torch_source=prep.request.torch_source)
    target, run_device, proxy = backend.run_device(rt_opts)
    if not _host_arch_matches(prep.profile):
        proxy = True  # e.g. the arm profile built on an x86 host: this CPU stands in for the ARM one
    result.device, result.run_device, result.host_proxy = target, run_device, proxy
    runtime = get_runtime(cand.runtime)
    hint = prep.profile.performance_hint.value

    attempts = iter(range(1_000_000))

    def build_and_check(float_layers: list[str]):
        job.float_layers = list(float_layers)
        # A fresh folder per attempt: OpenVINO memory-maps model.bin, and rewriting a mapped file in place
        # kills the process with SIGBUS when an earlier attempt's model is still alive.
        job.workdir = workdir / f"attempt{next(attempts)}"
        job.workdir.mkdir()
        art = backend.build(job)
        loaded = runtime.load(art.model_file, device=run_device, threads=prep.threads, performance_hint=hint,
                              options=device_options(art.runtime_options, run_device))
        try:
            outs = prep.run(loaded)
        except BaseException:
            loaded.close()
            raise
        report = accuracy.compare(prep.reference_outputs, outs, prep.profile.accuracy, prep.heldout.labels,
                                  prep.evaluator)
        report = report.model_copy(update={"float_layers": list(float_layers)})
        return art, loaded, outs, report

    with progress.stage(f"{cand.label}: build"):
        artifact, loaded, outputs, report = build_and_check([])
        for note in artifact.notes:
            progress.note(note)
            if "no tensor was quantized" in note or note.startswith("weights in "):  # recorded in the manifest
                result.decisions.append(f"{cand.label}: {note}")
    with progress.stage(f"{cand.label}: accuracy"):
        progress.note(_accuracy_line(report))
        if not report.passed and cand.precision not in ("fp32", "as-exported"):
            ranked = None
            if hasattr(backend, "score_reverts") and cand.precision == "int8":
                # Sensitivity by the task metric: each activation quantizer bypassed alone, the model re-judged.
                ranked = _rank_reverts(prep, backend, job, artifact, progress)
                base = accuracy.score(report)
                layer_of = backend.revert_layers(artifact.model_file)  # quantizer -> the layer it belongs to
                report = report.model_copy(update={"sensitive_layers": [
                    LayerError(layer=layer_of.get(n, n), error=max(0.0, s - base)) for n, s in ranked[:10]],
                    "sensitivity_basis": f"{prep.evaluator.task} metric gained when kept in float"})
            else:
                report = report.model_copy(update={"sensitive_layers": _sensitivity(backend, job, artifact, prep)[:10],
                                                   "sensitivity_basis": "error added vs fp32"})
            if cand.accuracy_aware and ranked:
                found = _greedy_search(prep, backend, job, artifact, runtime, run_device, hint, workdir, progress,
                                       report, [n for n, _ in ranked])
                if found is None:
                    found = _revert_search(prep, backend, job, artifact, runtime, run_device, hint, workdir,
                                           progress, report, [n for n, _ in ranked])
                if found is not None and len(found[3].float_layers) > MANY_REVERTS:
                    # Many activations in float: the error may sit in weights, which bypassing cannot reach.
                    # Re-quantizing with whole layers in float (weights too) can hold the budget with fewer.
                    found = _faster(prep, found, _requantize_search(prep, backend, job, artifact, build_and_check,
                                                                    progress, report, [n for n, _ in ranked]),
                                    progress)
                if found is not None:
                    loaded.close()
                    artifact, loaded, outputs, report = found
            if cand.accuracy_aware and not report.passed:
                ranking = _sensitivity(backend, job, artifact, prep)
                if ranking:
                    loaded.close()
                    artifact, loaded, outputs, report = _float_search(prep, ranking, build_and_check, progress, report)
    result.artifact, result.validation, result.passed = artifact, report, report.passed
    result.size_bytes = artifact.size_bytes
    result.outputs = outputs
    result.tensors = (loaded.inputs, loaded.outputs)
    try:
        with progress.stage(f"{cand.label}: benchmark"):
            feeds = prep.heldout.samples[0]
            # A stateful model's state, or a scalar input, has no batch on axis 0: it runs as the data gives it.
            as_given = bool(prep.state_pairs) or any(np.ndim(a) == 0 for a in feeds.values())
            bench_feeds = benchmark.batch_feeds(feeds, prep.profile.batch_size,
                                                static_batch=as_given or (isinstance(prep.specs[0].shape[0], int)
                                                                          if prep.specs and prep.specs[0].shape
                                                                          else True))
            static_opt = all(isinstance(d, int) for t in loaded.inputs for d in t.shape[:1])
            opt_feeds = feeds if static_opt else bench_feeds
            batch = _rows(bench_feeds) if bench_feeds else 1
            stats = benchmark.measure({"fp32": prep.baseline, "optimized": loaded},
                                      {"fp32": bench_feeds, "optimized": opt_feeds}, batch,
                                      prep.request.bench_iterations,
                                      runtimes={"fp32": prep.baseline_runtime, "optimized": cand.runtime})
            result.fp32, result.optimized = stats["fp32"], stats["optimized"]
            result.batch = batch
            result.speedup = result.fp32.p50_ms / result.optimized.p50_ms if result.optimized.p50_ms > 0 else None
            where = f"host CPU as a proxy for {target}" if proxy else run_device
            speedup = "speedup n/a" if result.speedup is None else f"{result.speedup:.2f}x"  # p50 below the timer
            progress.note(f"p50 {result.optimized.p50_ms:.3f} ms vs fp32 {result.fp32.p50_ms:.3f} ms "
                          f"({speedup}), batch {batch}, on {where}")
    finally:
        loaded.close()


def _host_arch_matches(profile: HardwareProfile) -> bool:
    import platform

    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    return machine in profile.target.arch


def device_options(options: dict, device: str) -> dict | None:
    """OpenVINO's precision hint applies to its CPU plugin; other devices keep their own defaults."""
    if not options:
        return None
    return dict(options) if device == "CPU" else None


def _accuracy_line(r) -> str:
    """PASS/FAIL, the deciding task metric first, then the per-output cosine."""
    parts = []
    for c in r.checks[:3]:
        if c.rule == "max_drop":
            parts.append(f"{c.name} {c.fp32:.4g} -> {c.optimized:.4g} (drop {c.drop:.3g}, budget {c.bound:g})")
        elif c.rule == "min":
            parts.append(f"{c.name} {c.optimized:.4f} (budget {c.bound:g})")
        else:
            parts.append(f"{c.name} {c.optimized:.4f}")
    parts.append(f"min output cosine {r.min_cosine:.4f}")
    text = f"{'PASS' if r.passed else 'FAIL'} [{r.task}]: " + ", ".join(parts)
    if r.float_layers:
        text += f", {len(r.float_layers)} layers in float"
    return text


def _sensitivity(backend, job, artifact: Artifact, prep: Prepared):
    """Per-layer error of the quantized model vs its fp32 reference, most harmful first."""
    ref_path = backend.layer_reference(job) if job.precision == "int8" else job.source
    if ref_path is None:
        return []
    layers = backend.layers(ref_path)
    if not layers:
        return []
    ref = backend.layer_probe(ref_path, layers)
    opt = backend.layer_probe(artifact.model_file, layers)
    if ref is None or opt is None:
        return []
    return accuracy.layer_errors(layers, ref, opt, prep.heldout.samples[:SENSITIVITY_SAMPLES])


MANY_REVERTS = 8  # bypassed activations above which whole layers in float are tried too


def _requantize_search(prep, backend, job, base: Artifact, build_and_check, progress, first_report,
                       ranked_points: list[str]):
    """The float-layer search (re-quantizing), or None when even every ranked layer misses the budget.

    Layers are ranked by the task metric too: the weighted layers fed by the best-ranked activation quantizers
    come first (keeping such a layer in float frees its weights and its input), then the rest by their own
    error (per-layer cosine)."""
    consumers = backend.revert_consumers(base.model_file)
    order: list[str] = []
    for point in ranked_points:
        order.extend(layer for layer in consumers.get(point, []) if layer not in order)
    proxy = _sensitivity(backend, job, base, prep)
    ranking = [LayerError(layer=n, error=0.0) for n in order] + [e for e in proxy if e.layer not in set(order)]
    if not ranking:
        return None
    with progress.stage("whole layers in float (re-quantize)"):
        found = _float_search(prep, ranking, build_and_check, progress, first_report)
    if found[3].passed:
        return found
    found[1].close()
    return None


def _faster(prep, a, b, progress):
    """Of two configurations within the budget, the one with the lower median latency (a short, interleaved
    timing on one held-out sample); the other is closed."""
    if b is None:
        return a
    feed = prep.heldout.samples[0]
    times = {0: [], 1: []}
    for _ in range(15):
        for i, cand in enumerate((a, b)):
            started = time.perf_counter()
            cand[1].infer(feed)
            times[i].append(time.perf_counter() - started)
    ta, tb = (sorted(t)[len(t) // 2] for t in times.values())
    keep, drop = (a, b) if ta <= tb else (b, a)
    progress.note(f"kept {len(keep[3].float_layers)} float layer(s) ({min(ta, tb) * 1e3:.2f} ms) over "
                  f"{len(drop[3].float_layers)} ({max(ta, tb) * 1e3:.2f} ms)")
    drop[1].close()
    return keep


def _float_search(prep, ranking, build_and_check, progress, first_report):
    """Keep the k most sensitive layers in float, k = 1, 2, 4, ...; then bisect down to the fewest that hold."""
    names = [e.layer for e in ranking]
    best = None
    k, lo = 1, 0
    while True:
        k = min(k, len(names))
        art, loaded, outs, report = build_and_check(names[:k])
        progress.note(f"{k} layer(s) in float: {_accuracy_line(report)}")
        if report.passed:
            best = (art, loaded, outs, report)
            break
        loaded.close()
        lo = k
        if k == len(names):
            break
        k *= 2
    if best is None:
        progress.warn("no float fallback set met the budget; even all quantizable layers in float missed it")
        art, loaded, outs, report = build_and_check(names[: len(names)])
        return art, loaded, outs, report.model_copy(update={"sensitive_layers": first_report.sensitive_layers,
                                                            "sensitivity_basis": first_report.sensitivity_basis})
    hi = k
    for _ in range(3):  # bisect (lo fails, hi holds), a few rebuilds at most
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        art, loaded, outs, report = build_and_check(names[:mid])
        progress.note(f"{mid} layer(s) in float: {_accuracy_line(report)}")
        if report.passed:
            best[1].close()
            best, hi = (art, loaded, outs, report), mid
        else:
            loaded.close()
            lo = mid
    art, loaded, outs, report = best
    return art, loaded, outs, report.model_copy(update={"sensitive_layers": first_report.sensitive_layers,
                                                        "sensitivity_basis": first_report.sensitivity_basis})


RANK_SAMPLES = 8  # held-out samples each single-quantizer bypass is judged on


def _subset(prep):
    """The first held-out samples, their fp32 outputs and labels: what the ranking judges on."""
    n = min(RANK_SAMPLES, len(prep.heldout.samples))
    feeds, refs = prep.heldout.samples[:n], prep.reference_outputs[:n]
    labels = prep.heldout.labels
    if labels is not None:
        per = sum(_rows(f) for f in feeds[:1])
        labels = labels[: n * per]
    return feeds, refs, labels


RANK_LIMIT = 64  # single quantizers judged by the task metric; larger models are narrowed by groups first


def _rank_reverts(prep, backend, job, base: Artifact, progress) -> list[tuple[str, float]]:
    """Activation quantizers, most helpful to bypass first, by the task metric (accuracy.score).

    Up to RANK_LIMIT quantizers: each bypassed alone and the model re-judged. More (ONNX Runtime puts one on
    nearly every activation: 243 on a YOLOv8n): consecutive quantizers (graph order) are bypassed as groups
    first, and the members of the best groups are then judged one by one, so a quantizer whose damage only
    the task metric sees (the detector's output concat, say) is never filtered out by a proxy.
    """
    feeds, refs, labels = _subset(prep)

    def score(outs):
        return accuracy.score(accuracy.compare(refs, outs, prep.profile.accuracy, labels, prep.evaluator))

    points = backend.revert_points(base.model_file, layers=True)
    reference = backend.layer_reference(job)
    task = prep.evaluator.task
    if len(points) <= RANK_LIMIT:
        with progress.stage(f"rank {len(points)} activation quantizers by the {task} metric (one at a time)"):
            scores = backend.score_reverts(base.model_file, feeds, score, [[p] for p in points], reference)
        return sorted(zip(points, scores), key=lambda x: -x[1])
    size = math.ceil(len(points) / (RANK_LIMIT // 2))
    groups = [points[i:i + size] for i in range(0, len(points), size)]
    with progress.stage(f"rank {len(groups)} groups of {size} activation quantizers by the {task} metric"):
        group_scores = backend.score_reverts(base.model_file, feeds, score, groups, reference)
    order = sorted(range(len(groups)), key=lambda i: -group_scores[i])
    singles = [p for i in order[: max(1, (RANK_LIMIT // 2) // size)] for p in groups[i]]
    with progress.stage(f"rank the {len(singles)} quantizers of the best groups one at a time"):
        scores = backend.score_reverts(base.model_file, feeds, score, [[p] for p in singles], reference)
    ranked = sorted(zip(singles, scores), key=lambda x: -x[1])
    # the rest follow group by group, best group first, each scored with its group
    done = set(singles)
    ranked += [(p, group_scores[i]) for i in order for p in groups[i] if p not in done]
    return ranked


GREEDY_POOL = 24  # best-ranked points the greedy search chooses from
GREEDY_STEPS = 8  # points it adds at most before giving way to the k = 1, 2, 4, ... search


def _load_reverted(prep, backend, job, base: Artifact, runtime, run_device, hint, folder, names, first_report):
    """Build, load and judge the int8 model with ``names`` in float, on all held-out samples."""
    art = backend.build_reverted(base.model_file, names, folder, base.precision, backend.layer_reference(job))
    loaded = runtime.load(art.model_file, device=run_device, threads=prep.threads, performance_hint=hint,
                          options=device_options(art.runtime_options, run_device))
    outs = prep.run(loaded)
    report = accuracy.compare(prep.reference_outputs, outs, prep.profile.accuracy, prep.heldout.labels, prep.evaluator)
    report = report.model_copy(update={"float_layers": art.float_layers,
                                       "sensitive_layers": first_report.sensitive_layers,
                                       "sensitivity_basis": first_report.sensitivity_basis})
    return art, loaded, outs, report


def _greedy_search(prep, backend, job, base: Artifact, runtime, run_device, hint, workdir, progress, first_report,
                   ranked: list[str]):
    """Add revert points one at a time, each step re-judging every remaining point of the best-ranked pool on top
    of those already chosen (a static ranking misses points that only help together, such as a detector's
    class-logit layers at its three scales); stop at the first set that holds the budget on all held-out
    samples. Returns None when GREEDY_STEPS points do not reach it."""
    if not hasattr(backend, "score_reverts"):
        return None
    # Judged on every held-out sample: a detector's F1 over a handful of images moves with single boxes.
    feeds, refs, labels = prep.heldout.samples, prep.reference_outputs, prep.heldout.labels

    def score(outs):
        return accuracy.score(accuracy.compare(refs, outs, prep.profile.accuracy, labels, prep.evaluator))

    # Candidates: the best-ranked single points, and every module of the model taken whole (points sharing a
    # name prefix such as "/model.22/" - exporters name nodes after their module path): the error of a
    # detector's head is spread over many points that only help together.
    candidates = [[p] for p in ranked[:GREEDY_POOL]] + module_groups(ranked) + sibling_groups(ranked)
    chosen: list[str] = []
    reference = backend.layer_reference(job)
    with progress.stage(f"greedy search over {len(candidates)} points and modules (re-judged each step)"):
        for step in range(1, GREEDY_STEPS + 1):
            left = [c for c in candidates if not set(c) <= set(chosen)]
            if not left:
                return None
            scores = backend.score_reverts(base.model_file, feeds, score,
                                           [chosen + [p for p in c if p not in chosen] for c in left], reference)
            # Of the candidates that already hold the budget (slack >= 0), the one adding the fewest points;
            # else the one that lifts the metric most.
            holding = [i for i, sc in enumerate(scores) if sc >= 0]
            pick_i = (min(holding, key=lambda i: (len(set(left[i]) - set(chosen)), -scores[i])) if holding
                      else max(range(len(left)), key=scores.__getitem__))
            best = left[pick_i]
            chosen += [p for p in best if p not in chosen]
            folder = workdir / f"greedy{step}"
            folder.mkdir()
            found = _load_reverted(prep, backend, job, base, runtime, run_device, hint, folder, chosen, first_report)
            progress.note(f"greedy, {len(chosen)} point(s) in float: {_accuracy_line(found[3])}")
            if found[3].passed:
                return found
            found[1].close()
    return None


def sibling_groups(points: list[str], max_size: int = 12) -> list[list[str]]:
    """Points that are the same layer of sibling modules: names equal once every module index is a wildcard
    except the last index of the deepest indexed component ("/model.22/cv3.0/cv3.0.2/Conv" and
    "/model.22/cv3.1/cv3.1.2/Conv" -> "/model.#/cv3.#/cv3.#.2/Conv"): a detector's class-logit convs at its
    three scales, which help only together."""
    import re

    index = re.compile(r"\.(\d+)")
    groups: dict[str, list[str]] = {}
    for p in points:
        parts = p.split("/")
        deepest = max((i for i, c in enumerate(parts) if index.search(c)), default=None)
        if deepest is None:
            continue
        key = []
        for i, c in enumerate(parts):
            if i == deepest:
                found = list(index.finditer(c))
                head, last = c[:found[-1].start()], c[found[-1].start():]
                key.append(index.sub(".#", head) + last)
            else:
                key.append(index.sub(".#", c))
        groups.setdefault("/".join(key), []).append(p)
    return [g for g in groups.values() if 2 <= len(g) <= max_size]


def module_groups(points: list[str], min_size: int = 2) -> list[list[str]]:
    """Points grouped by their first two name components ("/model.22/cv3.0/..." -> "/model.22"), the module
    an exporter named them after; groups of at least ``min_size``, in first-seen order."""
    groups: dict[str, list[str]] = {}
    for p in points:
        parts = p.split("/")
        if len(parts) < 3:
            continue
        groups.setdefault("/".join(parts[:2]), []).append(p)
    return [g for g in groups.values() if len(g) >= min_size]


def _revert_search(prep, backend, job, base: Artifact, runtime, run_device, hint, workdir, progress, first_report,
                   ranked: list[str]):
    """Put revert points of the int8 model in float, best-ranked first, until the task budget holds.

    ``ranked`` comes from putting each point (an activation quantizer; on OpenVINO also a layer with its fp32
    weights) in float alone and re-judging the model by its task metric (no re-calibration). k = 1, 2, 4, ... quantizers are bypassed and validated on all held-out samples, and the
    smallest passing k is bisected. Returns None when even every activation in float
    misses the budget (the caller then re-quantizes with float layers).
    """
    budget = prep.profile.accuracy
    if not ranked:
        return None
    attempts = iter(range(1_000_000))

    def try_(k):
        folder = workdir / f"revert{next(attempts)}"
        folder.mkdir()
        found = _load_reverted(prep, backend, job, base, runtime, run_device, hint, folder, ranked[:k], first_report)
        progress.note(f"{k} point(s) in float: {_accuracy_line(found[3])}")
        return found

    best, lo, k = None, 0, 1
    while best is None:
        k = min(k, len(ranked))
        found = try_(k)
        if found[3].passed:
            best = found
        else:
            found[1].close()
            lo = k
            if k == len(ranked):
                return None
            k *= 2
    hi = k
    for _ in range(4):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        found = try_(mid)
        if found[3].passed:
            best[1].close()
            best, hi = found, mid
        else:
            found[1].close()
            lo = mid
    return best


def pick(results: list[CandidateResult]) -> CandidateResult | None:
    good = [r for r in results if r.ok and r.passed and r.optimized is not None]
    return min(good, key=lambda r: r.optimized.p50_ms) if good else None
