"""Shared work for every candidate: load, check ops, shapes, calibration / held-out data, fp32 reference."""
from __future__ import annotations

import importlib
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..backends import REGISTRY, get_backend
from ..errors import ConfigError, EdgeoptError, InputError, UnsupportedError
from ..package import CalibrationInfo
from ..profile import HardwareProfile, load_profile
from .. import stateful
from . import benchmark, data
from .load import SourceModel, load_source
from .optimize import GraphReport, simplify
from .progress import Progress
from .shapes import InputSpec, enforce_policy, fix_ir_shapes, fix_onnx_shapes, ir_input_specs, onnx_input_specs
from .types import Candidate, PackageRequest

log = logging.getLogger(__name__)

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
    evaluator: object = None  # tasks.TaskEvaluator: judges every candidate by the model's task
    state_pairs: list = field(default_factory=list)  # stateful.StatePair: state inputs fed by state outputs

    def run(self, loaded, data: "data.SampleSet | None" = None) -> list[dict]:
        """``loaded``'s outputs on the held-out samples (sequences carry the state ``loaded`` returns)."""
        return run_samples(loaded, self.heldout if data is None else data, self.state_pairs)

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

        from . import guard

        original = onnx.load(str(self.reference))
        model, report = simplify(original, level)
        if model is not original:
            error = guard.load_error(model)
            if error is not None and guard.load_error(original) is None:
                note = (f"graph simplification ({level}) undone: ONNX Runtime refuses the simplified model "
                        f"({error}); the graph is kept as it was")
                if self.progress:
                    self.progress.warn(note)
                self.decisions.append(note)
                before = len(original.graph.node)
                model, report = original, GraphReport(level, before, before, "simplified graph refused by ONNX "
                                                                              "Runtime; kept as is")
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
    # A .tflite runs as exported on LiteRT; OpenVINO (cpu, npu, igpu profiles) quantizes it like any model.
    needs_calib = _wanted_precision(req, profile) == "int8" and (
        source.format != "tflite" or any(rt.runtime == "openvino" for rt in profile.runtimes))
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
    metadata = model_metadata(source)
    req = _metadata_defaults(req, metadata, source, decisions, progress)
    with progress.stage("shapes"):
        reference, specs = _shape(source, req, profile, workdir, progress, decisions)
        for note in enforce_policy(specs, profile):
            progress.note(note)
    threads = benchmark.profile_threads(profile)
    batch = profile.batch_size
    calib_n = req.calib_samples or profile.precision.calibration_samples
    held_n = req.heldout_samples or profile.accuracy.held_out_samples
    calibration = calib_info = None
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
        accuracy_reference = reference
        if req.reference_model is not None:
            # A pruned model is judged against the unpruned fp32 model, and its speed-up measured against it.
            accuracy_reference = _unpruned_reference(req, source, specs, workdir)
            decisions.append(f"accuracy reference and fp32 baseline: the unpruned model "
                             f"{req.reference_model.name}, not the pruned one")
            progress.note("accuracy reference and fp32 baseline: the unpruned model")
        baseline = rt.load(accuracy_reference, device=device, threads=threads, performance_hint=profile.performance_hint.value,
                           options={"graph_optimization_level": "all"} if rt_name == "onnxruntime" else None)
    try:
        pairs = stateful.resolve_pairs(req.states, baseline.inputs, baseline.outputs)
        for p in pairs:
            note = (f"state: input {p.input} is fed output {p.output} of the previous step"
                    + (f" (batch on axis {p.batch_axis})" if p.batch_axis is not None else "")
                    + (" (--state)" if req.states else " (detected by name and shape)"))
            progress.note(note)
            decisions.append(note)
        axes = {p.input: p.batch_axis for p in pairs}
        with progress.stage("calibration and held-out data"):
            heldout = None
            if req.heldout is not None:
                heldout = data.load_any(req.heldout, specs, req.preprocessing, "held-out", 1, held_n, axes)
            if req.calib == "random":
                progress.warn("--calib random: calibration uses random inputs, so the accuracy check is meaningless")
                calibration = _random(specs, min(32, calib_n), req.seed, baseline, axes, "calibration", decisions,
                                      progress)
                calib_info = CalibrationInfo(source="random", samples=len(calibration), meaningful=False)
                decisions.append("calibration: random inputs (--calib random); the accuracy check is meaningless")
            elif req.calib is not None and needs_calib:
                loaded = data.load_any(Path(req.calib), specs, req.preprocessing, "calibration", 1,
                                       calib_n + (0 if heldout is not None else held_n), axes)
                if heldout is None:
                    loaded, heldout = data.split_heldout(loaded, held_n)
                    decisions.extend(heldout.notes)
                calibration = loaded.head(calib_n)
                calib_info = CalibrationInfo(source=loaded.source, sha256=loaded.sha256, samples=len(calibration))
            elif req.calib is not None and heldout is None:
                # No int8 here, but the user's data still makes a better accuracy check than random inputs.
                heldout = data.load_any(Path(req.calib), specs, req.preprocessing, "held-out", 1, held_n, axes)
                decisions.append("held-out: samples from the --calib data (no calibration needed at this precision)")
            if heldout is None:
                heldout = _random(specs, min(held_n, 16), req.seed + 1, baseline, axes, "held-out", decisions,
                                  progress)
                progress.warn("no held-out data given: the accuracy check compares outputs on random inputs "
                              "(pass --heldout FILE for a meaningful check)")
                decisions.append("held-out: random inputs (no --heldout or --calib data given)")
            what = "sequences" if heldout.starts is not None else "samples"
            progress.note(f"held-out {what}: {heldout.sequences}" + (f" ({len(heldout)} steps)" if heldout.starts
                                                                     is not None else "")
                          + (f", calibration samples: {len(calibration)}" if calibration else ""))
        with progress.stage("fp32 reference run"):
            ref_out = run_samples(baseline, heldout, pairs)
            carry_states(heldout, ref_out, pairs)
            if calibration is not None and calibration.starts is not None:
                # Each calibration step is quantized with the state the fp32 model carries into it.
                carry_states(calibration, run_samples(baseline, calibration, pairs), pairs)
            progress.note(f"fp32 baseline: {rt_name} on the host CPU" + (" (all graph optimizations)"
                                                                         if rt_name == "onnxruntime" else ""))
    except BaseException:
        baseline.close()
        raise
    prep = Prepared(request=req, profile=profile, workdir=workdir, source=source, reference=reference, specs=specs,
                    heldout=heldout, reference_outputs=ref_out, baseline=baseline, baseline_runtime=rt_name,
                    calibration=calibration, calibration_info=calib_info, threads=threads, decisions=decisions,
                    progress=progress, batch=batch, runtimes=runtimes, state_pairs=pairs)
    try:
        with progress.stage("task"):
            prep.evaluator = _evaluator(req, profile, metadata, heldout, ref_out, pairs)
            progress.note(prep.evaluator.describe())
            decisions.append(f"accuracy judged by {prep.evaluator.describe()}")
    except BaseException:
        baseline.close()
        raise
    return prep


def run_samples(loaded, samples: data.SampleSet, pairs) -> list[dict]:
    """``loaded``'s outputs, one dict per sample. For sequences, each step after the first is fed the state
    outputs ``loaded`` itself returned on the step before (its own state, not fp32's: errors accumulate over a
    stream as they will on the device)."""
    if samples.starts is None or not pairs:
        return [loaded.infer(feed) for feed in samples.samples]
    starts = set(samples.starts)
    outs: list[dict] = []
    for i, feed in enumerate(samples.samples):
        if i not in starts:
            feed = dict(feed)
            for p in pairs:
                feed[p.input] = outs[-1][p.output]
        outs.append(loaded.infer(feed))
    return outs


def carry_states(samples: data.SampleSet, outputs: list[dict], pairs) -> None:
    """Write the state each step was fed (fp32's) into the step's feed: calibration, golden samples and the
    benchmark use the steps one by one."""
    if samples.starts is None or not pairs:
        return
    starts = set(samples.starts)
    for i in range(len(samples.samples)):
        if i not in starts:
            samples.samples[i] = {**samples.samples[i], **{p.input: outputs[i - 1][p.output] for p in pairs}}


def _random(specs, n, seed, baseline, axes, role, decisions, progress) -> data.SampleSet:
    """Random samples the fp32 model runs (dynamic dims grown past the model's minimum sizes), or refused."""
    found, size = data.runnable_random(specs, n, seed, baseline.infer, axes, role)
    if size != data.RANDOM_DIM_SIZES[0]:
        note = (f"random {role} inputs: dynamic dims set to {size}, the smallest size the fp32 model runs "
                f"(tried {', '.join(str(s) for s in data.RANDOM_DIM_SIZES if s <= size)})")
        decisions.append(note)
        progress.note(note)
    return found


def _unpruned_reference(req: PackageRequest, source: SourceModel, specs, workdir: Path) -> Path:
    """The unpruned ONNX model, shaped like the pruned one; its inputs and outputs must match."""
    import onnx

    ref = load_source(req.reference_model, _profile(req))
    if ref.format != "onnx" or source.format != "onnx":
        raise InputError("an unpruned reference model is supported for ONNX models only",
                         hint="export both models to ONNX")
    model = ref.onnx
    fix_onnx_shapes(model, req.input_shapes, ref.path.name)
    if req.input_shapes:
        model = onnx.shape_inference.infer_shapes(model)
    theirs = [(s.name, s.shape) for s in onnx_input_specs(model)]
    ours = [(s.name, s.shape) for s in specs]
    outs = [o.name for o in model.graph.output]
    if theirs != ours or outs != [o.name for o in source.onnx.graph.output]:
        raise InputError(f"the unpruned reference {ref.path.name} has inputs {theirs} and outputs {outs}; the "
                         f"model has inputs {ours} and outputs {[o.name for o in source.onnx.graph.output]}",
                         hint="export both with the same input and output names and shapes")
    path = workdir / "reference-unpruned.onnx"
    onnx.save(model, str(path))
    return path


def model_metadata(source: SourceModel) -> dict[str, str]:
    """String metadata the model carries (ONNX metadata_props: Ultralytics writes task, names, imgsz, stride)."""
    model = getattr(source, "onnx", None)
    if model is None:
        return {}
    return {p.key: p.value for p in model.metadata_props if len(p.value) < 1_000_000}


def _metadata_defaults(req: PackageRequest, metadata: dict, source: SourceModel, decisions, progress) -> PackageRequest:
    """Ultralytics detector exports: letterbox preprocessing and their export size, unless the user chose."""
    import ast

    from .types import ImagePreprocessing

    if metadata.get("task") not in ("detect", "segment", "pose", "obb") or "imgsz" not in metadata:
        return req
    update: dict = {}
    try:
        size = [int(v) for v in ast.literal_eval(metadata["imgsz"])]
    except (ValueError, SyntaxError, TypeError):
        size = []
    if req.preprocessing is None or req.preprocessing.resize is None:
        base = req.preprocessing or ImagePreprocessing()
        update["preprocessing"] = base.model_copy(update={"resize": "letterbox"})
        note = "images letterboxed (grey 114 padding, RGB, pixel/255), as the model's Ultralytics metadata says"
        decisions.append(note)
        progress.note(note)
    if not req.input_shapes and len(size) == 2 and source.format == "onnx":
        inp = source.onnx.graph.input[0]
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
        if len(dims) == 4 and (dims[2] is None or dims[3] is None):
            update["input_shapes"] = {inp.name: [dims[0] or 1, dims[1] or 3, size[0], size[1]]}
            note = (f"input {inp.name!r} fixed to {update['input_shapes'][inp.name]} from the model's metadata "
                    f"(imgsz {size}); pass --input-shape to choose another size")
            decisions.append(note)
            progress.note(note)
    return req.model_copy(update=update) if update else req


def _evaluator(req: PackageRequest, profile: HardwareProfile, metadata: dict, heldout, ref_out, pairs=()):
    """Choose the task evaluator once and check it on fp32 against itself (a metric that cannot hold there,
    or a user's metric that cannot run, stops here, before any quantization)."""
    from . import accuracy, tasks

    if req.labels is not None and req.task not in ("auto", "detect"):
        raise InputError(f"--labels (COCO JSON) is for --task detect, not --task {req.task}",
                         hint="classification labels go in the held-out .npz as 'labels'")
    info = tasks.ModelInfo(input_shapes={k: tuple(v.shape) for k, v in heldout.samples[0].items()},
                           output_names=list(ref_out[0]), metadata=metadata,
                           class_names=tasks.class_names(metadata), state_outputs=[p.output for p in pairs])
    options = tasks.TaskOptions(task=req.task, detect_format=req.detect_format,
                                labels_file=str(req.labels) if req.labels else None,
                                sample_names=heldout.names, transforms=heldout.transforms, starts=heldout.starts)
    evaluator = tasks.choose(req.task, profile.accuracy, info, options, ref_out, req.metric, req.max_metric_drop)
    if req.labels is not None and evaluator.task not in ("detect", "custom"):
        raise InputError(f"--labels (COCO JSON) is for detectors; this model is judged as task {evaluator.task}",
                         hint="pass --task detect if it is a detector")
    itself = accuracy.compare(ref_out, ref_out, profile.accuracy, heldout.labels, evaluator)
    if not itself.passed:
        raise InputError(f"the accuracy check fails for the fp32 model against itself ({'; '.join(itself.failures)})",
                         hint="a --metric must score fp32 against itself at its best; check the metric")
    return evaluator


def _usable_runtimes(req, profile, source, reference, decisions, progress) -> list[str]:
    """The profile's runtimes (or --runtime) that take this model format and can run all its ops."""
    from ..backends import get_backend

    names = [rt.runtime for rt in profile.runtimes]
    if req.runtime:
        if req.runtime not in names:
            raise ConfigError(f"runtime {req.runtime!r} is not a runtime of profile {profile.name!r} "
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
            backend = get_backend(name)
            backend.check_request(req, next(rt for rt in profile.runtimes if rt.runtime == name))
            backend.check_ops(reference, source.format, source.path.name)
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


def _shape(source: SourceModel, req: PackageRequest, profile: HardwareProfile, workdir: Path, progress,
           decisions: list[str]):
    if source.format == "onnx":
        import onnx

        model = source.onnx
        if req.input_shapes:
            model = _guarded_shapes(model, req, source, progress, decisions)
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


def _guarded_shapes(model, req: PackageRequest, source: SourceModel, progress, decisions: list[str]):
    """--input-shape applied, unless ONNX Runtime would refuse the result while it loads the original: then
    the inputs whose fixing it refuses stay dynamic (the output names them and why)."""
    import onnx

    from . import guard

    def fixed(shapes):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        notes = fix_onnx_shapes(m, shapes, source.path.name)
        try:
            return onnx.shape_inference.infer_shapes(m), notes
        except Exception as exc:  # onnx raises InferenceError and others: the fixed graph without inference
            log.debug("shape inference failed after --input-shape: %s", exc)
            return m, notes

    out, notes = fixed(req.input_shapes)
    error = guard.load_error(out)
    if error is None or guard.load_error(model) is not None:
        for note in notes:
            progress.note(note)
        return out
    kept: dict[str, list[int]] = {}
    for name, dims in req.input_shapes.items():  # keep each fix that still loads, in the order given
        if guard.load_error(fixed({**kept, name: dims})[0]) is None:
            kept[name] = dims
    undone = [n for n in req.input_shapes if n not in kept]
    flow = guard.control_flow_ops(model)
    note = (f"--input-shape for {', '.join(undone)} undone: ONNX Runtime refuses the model with "
            f"{'them' if len(undone) > 1 else 'it'} fixed ({error})"
            + (f"; its {'/'.join(flow)} sub-graphs keep their dynamic dims" if flow else "")
            + "; the data's shapes are used at run time")
    progress.warn(note)
    decisions.append(note)
    out, notes = fixed(kept) if kept else (model, [])
    for n in notes:
        progress.note(n)
    return out


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
    module, cls = REGISTRY[name][0].split(":")
    try:
        return getattr(importlib.import_module(module), cls).accepts
    except ImportError:
        return ()
