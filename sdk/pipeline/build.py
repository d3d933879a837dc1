"""The pipeline's orchestration: prepare once, evaluate candidates, pick, pack."""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AccuracyError, ConfigError, EdgeoptError, InputError, SecurityError, UnsupportedError
from ..package import BenchmarkReport, CalibrationInfo, SourceModel as ManifestSource, load_private_key
from ..profile import HardwareProfile, load_profile
from . import accuracy, benchmark, data, golden, pack
from .load import SourceModel, load_source
from .optimize import GraphReport, simplify
from .progress import Progress
from .shapes import InputSpec, enforce_policy, fix_ir_shapes, fix_onnx_shapes, ir_input_specs, onnx_input_specs
from ..backends import get_backend
from .types import Artifact, BuildResult, Candidate, CandidateResult, PackageRequest

log = logging.getLogger(__name__)

SENSITIVITY_SAMPLES = 4  # held-out samples used for per-layer errors (intermediate tensors are large)
REFERENCE_RUNTIME = {"onnx": "onnxruntime", "openvino-ir": "openvino", "tflite": "tflite"}


@dataclass
class Prepared:
    """Shared state for evaluating candidates of one model and profile (a context manager)."""

    request: PackageRequest
    profile: HardwareProfile
    workdir: Path
    source: SourceModel
    reference: Path  # the original model with fixed shapes (fp32 baseline and accuracy reference)
    specs: list[InputSpec]
    heldout: data.SampleSet
    reference_outputs: list[dict]
    baseline: object  # LoadedModel: fp32 original on the host CPU
    baseline_runtime: str
    calibration: data.SampleSet | None = None
    calibration_info: CalibrationInfo | None = None
    threads: int | None = None
    decisions: list[str] = field(default_factory=list)
    graphs: dict[str, tuple[Path, GraphReport]] = field(default_factory=dict)
    progress: Progress | None = None
    batch: int = 1
    runtimes: list[str] = field(default_factory=list)  # the profile's runtimes that can run this model

    def __enter__(self) -> "Prepared":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.baseline.close()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def fp32_model(self, level: str) -> tuple[Path, GraphReport]:
        """The checked, shaped fp32 model after graph optimization at ``level`` (cached)."""
        if level in self.graphs:
            return self.graphs[level]
        if self.source.format != "onnx":
            report = GraphReport(level, self.source.nodes or 0, self.source.nodes or 0,
                                 f"{self.source.format} input: the runtime optimizes it when compiling")
            self.graphs[level] = (self.reference, report)
            return self.graphs[level]
        import onnx

        model, report = simplify(onnx.load(str(self.reference)), level)
        path = self.workdir / f"fp32-{level}.onnx"
        onnx.save(model, str(path))
        self.graphs[level] = (path, report)
        return self.graphs[level]


# --------------------------------------------------------------------------- prepare


def _profile(req: PackageRequest) -> HardwareProfile:
    return req.profile if isinstance(req.profile, HardwareProfile) else load_profile(req.profile)


def _wanted_precision(req: PackageRequest, profile: HardwareProfile) -> str:
    if req.precision:
        return req.precision
    if req.weight_only:
        return "int8-weight-only"
    return profile.precision.mode.value


def prepare(req: PackageRequest, progress: Progress) -> Prepared:
    """Load, check, shape and read data; run the fp32 reference. See the package docstring."""
    from ...agent.runtimes import get_runtime

    profile = _profile(req)
    with progress.stage("load and check"):
        source = load_source(req.model, profile)
        progress.note(f"{source.path.name}: {source.format}"
                      + (f", opset {source.opset}" if source.opset else "") + (f", {source.nodes} nodes" if source.nodes else ""))
    needs_calib = _wanted_precision(req, profile) == "int8" and source.format != "tflite"
    if needs_calib and req.calib is None:
        raise InputError(f"profile {profile.name!r} quantizes to int8, which needs calibration data, and none was given",
                         hint="pass --calib calib.npz (arrays keyed by input name) or --calib IMAGE_FOLDER; "
                              "--calib random runs a smoke test only (the accuracy check is then meaningless); "
                              "or choose --weight-only / --precision fp32")
    workdir = Path(tempfile.mkdtemp(prefix="edgeopt-"))
    try:
        return _prepare(req, profile, source, needs_calib, workdir, progress, get_runtime)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _prepare(req, profile, source, needs_calib, workdir, progress, get_runtime) -> Prepared:
    decisions: list[str] = []
    with progress.stage("shapes"):
        reference, specs = _shape(source, req, profile, workdir, progress)
        for note in enforce_policy(specs, profile):
            progress.note(note)
    threads = benchmark.profile_threads(profile)
    batch = profile.batch_size
    calib_n = req.calib_samples or profile.precision.calibration_samples
    held_n = req.heldout_samples or profile.accuracy.held_out_samples
    calibration = calib_info = None
    with progress.stage("calibration and held-out data"):
        heldout = None
        if req.heldout is not None:
            heldout = data.load_any(req.heldout, specs, req.preprocessing, "held-out", 1, held_n)
        if req.calib == "random":
            progress.warn("--calib random: calibration uses random inputs, so the accuracy check is meaningless")
            calibration = data.random_samples(specs, min(32, calib_n), req.seed)
            calib_info = CalibrationInfo(source="random", samples=len(calibration), meaningful=False)
            decisions.append("calibration: random inputs (--calib random); the accuracy check is meaningless")
        elif req.calib is not None and needs_calib:
            loaded = data.load_any(Path(req.calib), specs, req.preprocessing, "calibration", 1,
                                   calib_n + (0 if heldout is not None else held_n))
            if heldout is None:
                loaded, heldout = data.split_heldout(loaded, held_n)
                decisions.extend(heldout.notes)
            calibration = loaded.head(calib_n)
            calib_info = CalibrationInfo(source=loaded.source, sha256=loaded.sha256, samples=len(calibration))
        elif req.calib is not None and heldout is None:
            # No int8 here, but the user's data still makes a better accuracy check than random inputs.
            heldout = data.load_any(Path(req.calib), specs, req.preprocessing, "held-out", 1, held_n)
            decisions.append("held-out: samples from the --calib data (no calibration needed at this precision)")
        if heldout is None:
            heldout = data.random_samples(specs, min(held_n, 16), req.seed + 1)
            progress.warn("no held-out data given: the accuracy check compares outputs on random inputs "
                          "(pass --heldout FILE for a meaningful check)")
            decisions.append("held-out: random inputs (no --heldout or --calib data given)")
        progress.note(f"held-out samples: {len(heldout)}" + (f", calibration samples: {len(calibration)}"
                                                                 if calibration else ""))
    with progress.stage("check ops"):
        runtimes = _usable_runtimes(req, profile, source, reference, decisions, progress)
    with progress.stage("fp32 reference"):
        rt_name = REFERENCE_RUNTIME[source.format]
        if source.format == "onnx" and "onnxruntime" not in runtimes:
            try:
                get_backend("onnxruntime").check_ops(reference, "onnx", source.path.name)
            except EdgeoptError as exc:
                # ONNX Runtime cannot run it, but a profile runtime can: that runtime's fp32 is the reference.
                rt_name = runtimes[0]
                decisions.append(f"fp32 reference and baseline: {rt_name} ({exc.one_line()})")
        rt = get_runtime(rt_name)
        device = "CPUExecutionProvider" if rt_name == "onnxruntime" else "CPU"
        baseline = rt.load(reference, device=device, threads=threads, performance_hint=profile.performance_hint.value,
                           options={"graph_optimization_level": "all"} if rt_name == "onnxruntime" else None)
        try:
            ref_out = [baseline.infer(feed) for feed in heldout.samples]
        except BaseException:
            baseline.close()
            raise
        progress.note(f"fp32 baseline: {rt_name} on the host CPU" + (" (all graph optimizations)"
                                                                     if rt_name == "onnxruntime" else ""))
    prep = Prepared(request=req, profile=profile, workdir=workdir, source=source, reference=reference, specs=specs,
                    heldout=heldout, reference_outputs=ref_out, baseline=baseline, baseline_runtime=rt_name,
                    calibration=calibration, calibration_info=calib_info, threads=threads, decisions=decisions,
                    progress=progress, batch=batch, runtimes=runtimes)
    return prep


def _usable_runtimes(req, profile, source, reference, decisions, progress) -> list[str]:
    """The profile's runtimes (or --runtime) that take this model format and can run all its ops."""
    from ..backends import get_backend

    names = [rt.runtime for rt in profile.runtimes]
    if req.runtime:
        if req.runtime not in names:
            raise ConfigError(f"runtime {req.runtime!r} is not one of profile {profile.name!r}'s runtimes "
                              f"({', '.join(names)})", hint="drop --runtime or choose another profile")
        names = [req.runtime]
    usable, errors = [], []
    for name in names:
        if source.format not in _accepts(name):
            note = f"runtime {name}: skipped, it does not take {source.format} models"
            if name == "tflite":
                note += " (ONNX -> TFLite conversion needs TensorFlow, which cannot share this environment)"
            decisions.append(note)
            progress.note(note)
            continue
        try:
            get_backend(name).check_ops(reference, source.format, source.path.name)
            usable.append(name)
        except EdgeoptError as exc:
            errors.append(exc)
            decisions.append(f"runtime {name}: skipped, {exc.one_line()}")
            progress.note(f"runtime {name}: {exc.one_line()}")
    if usable:
        return usable
    if errors:
        raise errors[0]
    raise UnsupportedError(f"no runtime of profile {profile.name!r} ({', '.join(names)}) takes a "
                           f"{source.format} model", hint="give an ONNX model, or choose another profile")


def _shape(source: SourceModel, req: PackageRequest, profile: HardwareProfile, workdir: Path, progress):
    if source.format == "onnx":
        import onnx

        model = source.onnx
        for note in fix_onnx_shapes(model, req.input_shapes, source.path.name):
            progress.note(note)
        if req.input_shapes:
            model = onnx.shape_inference.infer_shapes(model)
        path = workdir / "reference.onnx"
        onnx.save(model, str(path))
        return path, onnx_input_specs(model)
    if source.format == "openvino-ir":
        import openvino as ov

        from ...agent.runtimes.openvino import core

        model = core().read_model(str(source.path))
        for note in fix_ir_shapes(model, req.input_shapes, source.path.name):
            progress.note(note)
        path = workdir / "reference.xml"
        ov.save_model(model, str(path), compress_to_fp16=False)
        return path, ir_input_specs(model)
    from ...agent.runtimes import get_runtime

    if req.input_shapes:
        raise InputError("--input-shape is not supported for .tflite models (their shapes are fixed at export)")
    path = workdir / "reference.tflite"
    shutil.copyfile(source.path, path)
    loaded = get_runtime("tflite").load(path, device="CPU", threads=1)
    try:
        specs = [InputSpec(t.name, t.dtype, tuple(d if isinstance(d, int) else None for d in t.shape))
                 for t in loaded.inputs]
    finally:
        loaded.close()
    return path, specs


# --------------------------------------------------------------------------- candidates


def candidates_for(prep: Prepared, all_precisions: bool = False) -> list[Candidate]:
    req, profile = prep.request, prep.profile
    usable = list(prep.runtimes)
    level = req.graph_level or "all"
    out = []
    for name in usable:
        if name == "tflite":
            out.append(Candidate(name, "as-exported", level))
            continue
        wanted = _wanted_precision(req, profile)
        if not all_precisions:
            out.append(Candidate(name, wanted, level, req.accuracy_aware and wanted == "int8"))
            if req.accuracy_aware and wanted == "int8" and not req.precision:
                # When many layers must stay in float, the runtime's plain fp32 can be the faster faithful
                # configuration: measure it too, and keep whichever is faster within the budget.
                out.append(Candidate(name, "fp32", level))
            continue
        for precision in ("fp32", "fp16", wanted):
            if precision == "int8" and prep.calibration is None:
                continue
            cand = Candidate(name, precision, level)
            if cand not in out:
                out.append(cand)
        if wanted == "int8" and prep.calibration is not None:
            out.append(Candidate(name, "int8", level, True))
    return out


def _accepts(name: str) -> tuple[str, ...]:
    from ..backends import REGISTRY
    import importlib

    module, cls = REGISTRY[name][0].split(":")
    try:
        return getattr(importlib.import_module(module), cls).accepts
    except ImportError:
        return ()


def _decide(prep: Prepared, note: str) -> None:
    if note not in prep.decisions:
        prep.decisions.append(note)
        if prep.progress:
            prep.progress.note(note)


# --------------------------------------------------------------------------- evaluate


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
    from ..backends import BuildJob

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
                   calibration=prep.calibration.samples if prep.calibration and cand.precision == "int8" else None)
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
                              options=_device_options(art.runtime_options, run_device))
        try:
            outs = [loaded.infer(feed) for feed in prep.heldout.samples]
        except BaseException:
            loaded.close()
            raise
        report = accuracy.compare(prep.reference_outputs, outs, prep.profile.accuracy, prep.heldout.labels)
        report = report.model_copy(update={"float_layers": list(float_layers)})
        return art, loaded, outs, report

    with progress.stage(f"{cand.label}: build"):
        artifact, loaded, outputs, report = build_and_check([])
        for note in artifact.notes:
            progress.note(note)
    with progress.stage(f"{cand.label}: accuracy"):
        progress.note(_accuracy_line(report))
        if not report.passed and cand.precision not in ("fp32", "as-exported"):
            ranking = _sensitivity(backend, job, artifact, prep)
            report = report.model_copy(update={"sensitive_layers": ranking[:10]})
            if cand.accuracy_aware and ranking:
                loaded.close()
                artifact, loaded, outputs, report = _float_search(prep, ranking, build_and_check, progress, report)
    result.artifact, result.validation, result.passed = artifact, report, report.passed
    result.size_bytes = artifact.size_bytes
    result.outputs = outputs
    result.tensors = (loaded.inputs, loaded.outputs)
    try:
        with progress.stage(f"{cand.label}: benchmark"):
            feeds = prep.heldout.samples[0]
            bench_feeds = benchmark.batch_feeds(feeds, prep.profile.batch_size,
                                                static_batch=isinstance(prep.specs[0].shape[0], int) if prep.specs and prep.specs[0].shape else True)
            static_opt = all(isinstance(d, int) for t in loaded.inputs for d in t.shape[:1])
            opt_feeds = feeds if static_opt else bench_feeds
            batch = len(next(iter(bench_feeds.values()))) if bench_feeds else 1
            stats = benchmark.measure({"fp32": prep.baseline, "optimized": loaded},
                                      {"fp32": bench_feeds, "optimized": opt_feeds}, batch,
                                      prep.request.bench_iterations,
                                      runtimes={"fp32": prep.baseline_runtime, "optimized": cand.runtime})
            result.fp32, result.optimized = stats["fp32"], stats["optimized"]
            result.batch = batch
            result.speedup = result.fp32.p50_ms / result.optimized.p50_ms if result.optimized.p50_ms > 0 else None
            where = f"host CPU as a proxy for {target}" if proxy else run_device
            progress.note(f"p50 {result.optimized.p50_ms:.3f} ms vs fp32 {result.fp32.p50_ms:.3f} ms "
                          f"({result.speedup:.2f}x), batch {batch}, on {where}")
    finally:
        loaded.close()


def _host_arch_matches(profile: HardwareProfile) -> bool:
    import platform

    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    return machine in profile.target.arch


def _device_options(options: dict, device: str) -> dict | None:
    """OpenVINO's precision hint applies to its CPU plugin; other devices keep their own defaults."""
    if not options:
        return None
    return dict(options) if device == "CPU" else None


def _accuracy_line(r) -> str:
    text = f"{'PASS' if r.passed else 'FAIL'}: min cosine {r.min_cosine:.4f}, mean {r.mean_cosine:.4f}, " \
           f"max abs err {r.max_abs_error:.4g}"
    if r.top1_agreement is not None:
        text += f", top-1 agreement {r.top1_agreement:.1%}"
    if r.metric:
        text += f", accuracy {r.metric.fp32:.2f} -> {r.metric.optimized:.2f}"
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
        return art, loaded, outs, report.model_copy(update={"sensitive_layers": first_report.sensitive_layers})
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
    return art, loaded, outs, report.model_copy(update={"sensitive_layers": first_report.sensitive_layers})


def pick(results: list[CandidateResult]) -> CandidateResult | None:
    good = [r for r in results if r.ok and r.passed and r.optimized is not None]
    return min(good, key=lambda r: r.optimized.p50_ms) if good else None


# --------------------------------------------------------------------------- build


def build_package(req: PackageRequest, progress: Progress) -> BuildResult:
    if req.output is None:
        raise InputError("no output path given", hint="pass -o model.eopkg")
    if req.sign_key is None and not req.unsigned:
        raise SecurityError("refusing to write an unsigned package",
                            hint="pass --sign-key KEY (create one with: edgeopt keygen --out keys/), or --no-sign "
                                 "to write an unsigned package on purpose")
    private_key = load_private_key(req.sign_key) if req.sign_key is not None else None
    output = Path(req.output)
    with prepare(req, progress) as prep:
        cands = candidates_for(prep)
        results = [evaluate(prep, c, progress) for c in cands]
        chosen = pick(results)
        decisions = list(prep.decisions)
        if chosen is None:
            raise _failure(prep, results)
        decisions.extend(chosen.decisions)
        decisions.extend(_choice_notes(chosen, results))
        if chosen.validation.float_layers:
            decisions.append(f"accuracy-aware: {len(chosen.validation.float_layers)} layer(s) kept in float: "
                             f"{', '.join(chosen.validation.float_layers[:20])}")
        with progress.stage("golden samples, manifest, sign"):
            result = _pack(prep, chosen, results, decisions, output, private_key)
    return result


def _failure(prep: Prepared, results: list[CandidateResult]) -> EdgeoptError:
    missed = [r for r in results if r.ok and not r.passed]
    if not missed:
        first = results[0]
        return getattr(first, "exception", None) or UnsupportedError(first.error or "no candidate could be built")
    r = missed[0]
    v = r.validation
    layers = ", ".join(f"{e.layer} ({e.error:.3g})" for e in v.sensitive_layers[:5])
    hint = ("rerun with --accuracy-aware to keep the most sensitive layers in float, or choose --precision fp16/fp32"
            if not r.candidate.accuracy_aware else "choose --precision fp16/fp32, or give better calibration data")
    return AccuracyError(f"{r.candidate.precision} on {r.candidate.runtime} misses the accuracy budget of profile {prep.profile.name!r}"
                         f": {'; '.join(v.failures)}"
                         + (f"; most sensitive layers (error added vs fp32): {layers}" if layers else "")
                         + "; no package written", hint=hint)


def _choice_notes(chosen: CandidateResult, results: list[CandidateResult]) -> list[str]:
    if len(results) < 2:
        return [f"runtime {chosen.candidate.runtime} ({chosen.candidate.precision}): the profile's only candidate"]
    def what(r: CandidateResult) -> str:
        return f"runtime {r.candidate.runtime}" + ("" if len({x.candidate.runtime for x in results}) == len(results)
                                                   else f" {r.candidate.precision}")

    notes = [f"{what(chosen)} chosen: fastest within the accuracy budget, p50 "
             f"{chosen.optimized.p50_ms:.3f} ms ({chosen.speedup:.2f}x vs fp32)"]
    for r in results:
        if r is chosen:
            continue
        if not r.ok:
            notes.append(f"{what(r)} lost: could not build ({r.error})")
        elif not r.passed:
            notes.append(f"{what(r)} lost: missed the budget ({'; '.join(r.validation.failures)})")
        else:
            notes.append(f"{what(r)} lost: slower, p50 {r.optimized.p50_ms:.3f} ms ({r.speedup:.2f}x vs fp32)")
    return notes


def _pack(prep: Prepared, chosen: CandidateResult, results, decisions, output: Path, private_key) -> BuildResult:
    from ...agent.runtimes import get_runtime

    req, profile = prep.request, prep.profile
    art, v = chosen.artifact, chosen.validation
    n = min(req.golden_count, len(prep.heldout))
    golden_bytes, golden_spec = golden.make_golden(prep.heldout.samples[:n], chosen.outputs[:n], v.max_abs_error,
                                                   profile.accuracy.min_cosine)
    note = ""
    if chosen.host_proxy:
        note = (f"measured on the host CPU as a proxy: the package targets {chosen.device} "
                f"({profile.target.device.value}), which this host does not have")
        if prep.progress:
            prep.progress.warn(note)
        decisions.append(note)
    bench = BenchmarkReport(machine=benchmark.machine(), batch_size=getattr(chosen, "batch", profile.batch_size),
                            threads=prep.threads, fp32=chosen.fp32, optimized=chosen.optimized,
                            speedup=chosen.speedup or 0.0, host_proxy=chosen.host_proxy,
                            target_device=chosen.device, note=note)
    inputs, outputs = chosen.tensors
    layout = None
    preprocessing: dict = {}
    if req.preprocessing is not None:
        preprocessing = req.preprocessing.model_dump(mode="json")
        layout = req.preprocessing.layout or data.guess_layout(prep.specs[0].shape)
        preprocessing["layout"] = layout
    name = req.name or prep.source.path.stem
    manifest = pack.build_manifest(
        name=_safe_name(name), version_=req.version, profile=profile.to_dict(), runtime=art.runtime,
        runtime_version=get_runtime(art.runtime).version(), device=chosen.device, precision=art.precision,
        model_file=art.model_file.name, inputs=pack.with_layout(inputs, layout), outputs=list(outputs),
        preprocessing=preprocessing,
        source=ManifestSource(filename=prep.source.path.name, format=prep.source.format, sha256=prep.source.sha256),
        calibration=prep.calibration_info or CalibrationInfo(source="none", samples=0),
        validation=v, benchmark=bench, golden=golden_spec, decisions=decisions,
        runtime_options=_device_options(art.runtime_options, chosen.device) or {})
    written = pack.write(output, manifest, art.files, golden_bytes, private_key)
    return BuildResult(manifest=written, output=output, chosen=chosen, tried=results, benchmark=bench,
                       validation=v, signed=private_key is not None)


def _safe_name(name: str) -> str:
    import re

    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip("._-") or "model"
    return cleaned[:128]
