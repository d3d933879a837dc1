"""`edgeopt compare`: one table of candidate configurations per profile, and the one each profile would pick."""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator

import click

from ..errors import InputError
from .options import accuracy_options, accuracy_request, emit_json, json_option
from .prune_cmd import prune_options, torch_model_options

log = logging.getLogger(__name__)


def _parse_shapes(values: tuple[str, ...]) -> dict[str, list[int]]:
    """``name:1,3,224,224`` (repeatable) -> {name: [1, 3, 224, 224]}, parsed as `edgeopt package` does."""
    from ..pipeline.shapes import parse_input_shape

    out: dict[str, list[int]] = {}
    for text in values:
        name, dims = parse_input_shape(text)
        if name in out:
            raise InputError(f"--input-shape given twice for input {name!r}")
        out[name] = dims
    return out


def _numbers(text: str | None, flag: str, kind=float) -> tuple | None:
    if text is None:
        return None
    try:
        values = tuple(kind(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise InputError(f"{flag} {text!r}: expected comma-separated numbers") from None
    return values


def _preprocessing(image_size, mean, std, scale, layout, channel_order, resize=None):
    """Image-folder preprocessing, from the same options as `edgeopt package` (None when none is given)."""
    from pydantic import ValidationError

    from ..pipeline import ImagePreprocessing

    opts = {"size": _numbers(image_size, "--image-size", int), "mean": _numbers(mean, "--mean"),
            "std": _numbers(std, "--std"), "layout": layout}
    if all(v is None for v in opts.values()) and channel_order == "RGB" and scale is None and resize is None:
        return None
    if opts["size"] is not None and len(opts["size"]) != 2:
        raise InputError(f"--image-size {image_size!r}: expected H,W", hint="for example --image-size 224,224")
    try:
        return ImagePreprocessing(**{k: v for k, v in opts.items() if v is not None}, channel_order=channel_order,
                                  resize=resize,
                                  **({"scale": scale} if scale is not None else {}))
    except ValidationError as exc:
        raise InputError(f"image preprocessing options: {exc.errors()[0]['msg']}") from None


def _split(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


class _StageProgress:
    """The pipeline's Progress protocol, shown as the description of one rich progress task."""

    def __init__(self, bar, task, prefix: str) -> None:
        self.bar, self.task, self.prefix = bar, task, prefix
        self.warnings: list[str] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.bar.update(self.task, description=f"{self.prefix}: {name}")
        yield

    def note(self, message: str) -> None:
        log.info("%s", message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning("%s", message)


@click.command("compare")
@click.argument("model")
@torch_model_options
@click.option("--prune-ratios", "prune_ratios_text", metavar="R1,R2,...",
              help="PyTorch MODULE:FACTORY only: also try the model pruned by each ratio (0 = unpruned), each "
                   "pruned and recovered once, then every runtime/precision candidate; all are judged against the "
                   "unpruned fp32 model. Needs --calib (recovery) and --heldout (never trained on).")
@prune_options
@click.option("--profiles", "profiles_text", default="cpu", show_default=True,
              help="Comma-separated profiles (shipped names or profile files), e.g. cpu,npu,igpu,arm.")
@click.option("--calib", help="Calibration data for int8: .npz keyed by input name, an image folder, or 'random'.")
@click.option("--heldout", type=click.Path(path_type=Path),
              help="Held-out data for the accuracy check: .npz (inputs keyed by name, optional 'labels') or images.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D1,D2,...",
              help="Fix an input's dims (repeatable), e.g. images:1,3,224,224.")
@click.option("--image-size", help="Image folders: resize to H,W (default: the model's input size).")
@click.option("--mean", help="Image folders: per-channel mean after scaling, e.g. 0.485,0.456,0.406.")
@click.option("--std", help="Image folders: per-channel std, e.g. 0.229,0.224,0.225.")
@click.option("--scale", type=float, default=None, help="Image folders: pixel multiplier (default 1/255).")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), help="Image folders: tensor layout (default: guessed).")
@click.option("--channel-order", type=click.Choice(["RGB", "BGR"]), default="RGB", show_default=True,
              help="Image folders: channel order the model expects.")
@click.option("--precisions", "precisions_text", default=None,
              help="Only these precisions: fp32, fp16, int8, int8-aa (accuracy-aware), int8-weight-only.")
@click.option("--iterations", type=click.IntRange(5, 100_000), default=None,
              help="Timed iterations per model in each benchmark (default: about 1 s of timing, 20 to 2000).")
@click.option("--noise", type=click.FloatRange(0.0, 0.5), default=None,
              help="Relative latency difference treated as a tie (default 0.03); ties go to the smaller package.")
@click.option("--peak", "measure_peak", is_flag=True,
              help="Also measure this machine's fp32/int8 peak GOP/s (a few seconds) to put GFLOP/s in context.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a self-contained HTML report (table + latency/accuracy chart per profile).")
@accuracy_options
@json_option
def compare(model: str, profiles_text: str, calib: str | None, heldout: Path | None, input_shapes: tuple[str, ...],
            image_size: str | None, mean: str | None, std: str | None, scale: float | None, layout: str | None,
            channel_order: str, precisions_text: str | None, iterations: int | None, noise: float | None,
            measure_peak: bool, html_path: Path | None, task: str, metric: str | None,
            max_metric_drop: float | None, labels: Path | None, detect_format: str, preprocess: str | None,
            as_json: bool, weights: Path | None = None, prune_ratios_text: str | None = None, importance: str = "l2",
            global_pruning: bool = False, layer_ratios: tuple = (), ignore: tuple = (), round_to: int | None = None,
            steps: int = 300, no_recover: bool = False, train_fn: str | None = None, lr: float = 1e-3,
            batch_size: int = 32, device: str | None = None) -> None:
    """Try each profile's candidate configurations on MODEL and show which one each profile would pick.

    For every profile: runtimes the profile lists x precisions (fp32, fp16 where the device computes in fp16,
    int8 static, int8 with accuracy-aware float fallback, weight-only int8) x graph optimization level. Each is
    built, checked against the profile's accuracy budget on held-out data, and benchmarked against ONNX Runtime
    fp32 in the same run. The pick is the fastest configuration within budget (ties within noise: the smaller).
    """
    from ..compare import (ALL_PRECISIONS, DEFAULT_NOISE, CompareReport, compare_profile, fit_iterations,
                           make_runoff, merge_pruned)
    from ..profile import load_profile

    # Everything the user typed is checked before the first (slow) measurement.
    names = _split(profiles_text)
    if not names:
        raise InputError("--profiles is empty", hint="for example --profiles cpu,arm")
    profiles = [load_profile(n) for n in names]
    shapes = _parse_shapes(input_shapes)
    preprocessing = _preprocessing(image_size, mean, std, scale, layout, channel_order, preprocess)
    accuracy_fields = accuracy_request(task, metric, max_metric_drop, labels, detect_format)
    precisions = _split(precisions_text) if precisions_text is not None else None
    unknown = sorted(set(precisions or ()) - set(ALL_PRECISIONS))
    if unknown:
        raise InputError(f"unknown precision(s) {', '.join(unknown)}", hint=f"choose from {', '.join(ALL_PRECISIONS)}")
    from ..prune.source import is_factory

    torch_model = is_factory(model)
    ratios = _ratios(prune_ratios_text, torch_model, model, calib, heldout, steps, no_recover, train_fn)
    if weights is not None and not torch_model:
        raise click.UsageError("--weights is for a PyTorch MODEL given as MODULE:FACTORY")
    if torch_model:
        from .prune_cmd import torch_inputs

        inputs = torch_inputs(input_shapes, preprocessing.size if preprocessing else None)
    else:
        model = Path(model)
        if not model.exists():
            raise InputError(f"{model}: model file not found")
    if html_path is not None and not html_path.parent.exists():
        raise InputError(f"--html {html_path}: folder {html_path.parent} does not exist", hint="create it first")
    noise = DEFAULT_NOISE if noise is None else noise

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ..pipeline import PackageRequest, evaluate, prepare
    from ..pipeline.types import TorchSource

    err = Console(stderr=True)
    report = CompareReport(model=model, profiles=[], noise=noise)
    # Third-party quantizers print progress bars and INFO lines on stdout; stdout belongs to --json and the
    # table, so everything printed while measuring goes to stderr instead.
    if not log.isEnabledFor(logging.INFO):
        logging.getLogger("nncf").setLevel(logging.WARNING)
    with contextlib.redirect_stdout(sys.stderr), contextlib.ExitStack() as stack, \
            Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                     TimeElapsedColumn(), console=err, transient=True) as bar:
        # Prepare every profile first: a profile that cannot take the model (dynamic dims for a static-shape
        # profile, say) fails in seconds, before minutes of measuring the others.
        sources = [(0.0, model, None)]
        if torch_model:
            sources = _torch_sources(stack, bar, model, weights, ratios, inputs, preprocessing, calib, profiles[0],
                                     dict(importance=importance, global_pruning=global_pruning,
                                          layer_ratios=layer_ratios, ignore=ignore, round_to=round_to, steps=steps,
                                          no_recover=no_recover, train_fn=train_fn, lr=lr, batch_size=batch_size,
                                          device=device))
            shapes = shapes or {i.name: list(i.shape) for i in inputs}
        prepared_all = []
        for profile in profiles:
            task = bar.add_task(f"{profile.name}: preparing", total=None)
            stage = _StageProgress(bar, task, profile.name)
            per_source = []
            for ratio, onnx_model, reference in sources:
                # precision only steers what prepare() reads: with --calib it loads calibration data for every
                # profile (int8 candidates are tried even where the profile's default is fp16); without, nothing.
                # A pruned model is judged against (and timed beside) the unpruned fp32 one: reference_model.
                # The unpruned PyTorch module also goes to runtimes that compile PyTorch itself (torch-aoti).
                torch_source = TorchSource(factory=model, weights=weights) if torch_model and not ratio else None
                request = PackageRequest(model=onnx_model, reference_model=reference, profile=profile,
                                         torch_source=torch_source,
                                         calib=_calib(calib), heldout=heldout, preprocessing=preprocessing,
                                         input_shapes=shapes, bench_iterations=iterations or 50,
                                         precision="int8" if calib else "fp32", **accuracy_fields)
                prepared = stack.enter_context(prepare(request, stage))
                fit_iterations(prepared, iterations)
                per_source.append((ratio, prepared))
            prepared_all.append((profile, task, stage, per_source))
        for profile, task, stage, per_source in prepared_all:
            groups = []
            for ratio, prepared in per_source:
                def hook(_profile: str, label: str, index: int, total: int, task=task, ratio=ratio) -> None:
                    where = f" pruned {ratio:g}" if ratio else ""
                    bar.update(task, total=total, completed=index, description=f"{_profile}{where}: {label}")

                def run_one(candidate, prepared=prepared, stage=stage):
                    return evaluate(prepared, candidate, stage)

                groups.append((ratio, compare_profile(
                    profile, run_one, model_format=prepared.source.format, precisions=precisions,
                    calibration=prepared.calibration is not None, noise=noise, progress=hook,
                    runoff=make_runoff(prepared) if len(per_source) == 1 else None)))
            if len(groups) == 1:
                pc = groups[0][1]
            else:
                # one run-off across ratios: every ratio's prepared model has the same inputs and threads
                pc = merge_pruned(profile, groups, noise=noise, runoff=make_runoff(per_source[0][1]))
            report.profiles.append(pc)
            bar.remove_task(task)
            # Warnings that change how to read the figures (e.g. random calibration) go into the report.
            pc.notes.extend(w for w in dict.fromkeys(stage.warnings) if "random" in w)
        report.flops = _count_flops(model, shapes) if not torch_model else None
        if measure_peak:
            from ..peak import measure_peak as _peak

            task = bar.add_task("measuring this machine's peak GOP/s", total=None)
            report.peak = _peak().to_dict()
            bar.remove_task(task)

    doc = report.to_dict()
    if html_path is not None:
        from ..report import write_html

        write_html(doc, html_path)
    if as_json:
        emit_json(doc)
        return
    # A pipe gets the full table (rich would squeeze it into 80 columns); a terminal gets its own width.
    out = Console() if sys.stdout.isatty() else Console(width=220)
    _print_table(doc, out)
    if html_path is not None:
        out.print(f"HTML report: {html_path}")


def _ratios(text: str | None, torch_model: bool, model: str, calib: str | None, heldout: Path | None, steps: int,
            no_recover: bool, train_fn: str | None) -> list[float]:
    """--prune-ratios as a list (0 = the unpruned model), checked before anything is measured."""
    if text is None:
        return [0.0]
    from ..errors import UnsupportedError
    from ..prune.core import check_ratio

    if not torch_model:
        raise UnsupportedError(f"--prune-ratios needs a PyTorch model given as MODULE:FACTORY, found {model}",
                               hint="e.g. edgeopt compare mypkg.models:build --weights w.pt --prune-ratios 0,0.3,0.5")
    values = []
    for part in _split(text):
        try:
            value = float(part)
        except ValueError:
            raise InputError(f"--prune-ratios {text!r}: {part!r} is not a number") from None
        values.append(0.0 if value == 0 else check_ratio(value, "--prune-ratios value"))
    if not values or len(set(values)) != len(values):
        raise InputError(f"--prune-ratios {text!r}: expected distinct ratios", hint="for example 0,0.3,0.5")
    recovering = any(values) and not no_recover and steps > 0 and train_fn is None
    if recovering and (calib is None or calib == "random"):
        raise InputError("recovery by distillation needs calibration images and none were given",
                         hint="pass --calib IMAGE_FOLDER or .npz, or --no-recover")
    if any(values) and heldout is None:
        # Recovery trains on --calib; the gate must judge samples the pruned model never saw.
        raise InputError("--prune-ratios needs --heldout: recovery trains on --calib, and the accuracy check "
                         "must judge other samples", hint="pass a separate --heldout .npz or image folder")
    return values


def _torch_sources(stack, bar, factory: str, weights, ratios, inputs, preprocessing, calib, profile, opts):
    """Export MODULE:FACTORY (ratio 0) and prune+recover it once per ratio: [(ratio, onnx, unpruned onnx)]."""
    import shutil
    import tempfile

    from ..prune.workflow import PruneJob, run_job
    from .prune_cmd import prune_job

    workdir = Path(tempfile.mkdtemp(prefix="edgeopt-compare-"))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    out, unpruned = [], None
    for ratio in sorted(ratios):
        task = bar.add_task(f"prune {ratio:g}", total=None)
        stage = _StageProgress(bar, task, f"prune {ratio:g}")
        folder = workdir / f"r{ratio:g}"
        folder.mkdir()
        if ratio == 0:
            from .package_cmd import _export_only

            unpruned = _export_only(PruneJob(factory=factory, weights=weights, inputs=inputs, ratio=0.0), folder, stage)
            out.append((0.0, unpruned, None))
        else:
            job = prune_job(factory, weights, inputs, ratio, opts["importance"], opts["global_pruning"],
                            opts["layer_ratios"], opts["ignore"], opts["round_to"], opts["steps"], opts["no_recover"],
                            opts["train_fn"], opts["lr"], opts["batch_size"], opts["device"],
                            _calib(calib) if calib != "random" else None, preprocessing, profile)
            outcome = run_job(job, folder, stage, export_reference=True)
            out.append((ratio, outcome.pruned_onnx, unpruned or outcome.unpruned_onnx))
        bar.remove_task(task)
    return out


def _calib(value: str | None):
    if value is None or value == "random":
        return value
    return Path(value)


def _count_flops(model: Path, shapes: dict[str, list[int]]):
    """FLOPs of the source ONNX model (None for other formats, or when shapes cannot be inferred)."""
    if model.suffix.lower() != ".onnx":
        return None
    from ..errors import EdgeoptError
    from ..flops import count_file

    try:
        return count_file(model, input_shapes=shapes or None)
    except EdgeoptError as exc:
        log.info("FLOPs not counted: %s", exc.one_line())
        return None


def _print_table(doc: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"edgeopt compare: {Path(doc['model']).name}", title_justify="left")
    for col, justify in (("profile", "left"), ("configuration", "left"), ("size", "right"), ("p50 ms", "right"),
                         ("run-off ms", "right"), ("thr/s", "right"), ("speedup", "right"), ("GFLOP/s", "right"), ("task metric", "right"),
                         ("min cos", "right"), ("why", "left")):
        # Figures never wrap; the reason column takes what width is left and wraps.
        table.add_column(col, justify=justify, no_wrap=col != "why", min_width=24 if col == "why" else None)
    notes: list[str] = []
    for i, p in enumerate(doc["profiles"]):
        if i:
            table.add_section()
        label = p["profile"] + (" †" if p["host_proxy"] else "")
        if p["host_proxy"]:
            notes.append(f"† {p['profile']}: {p['proxy_note']}")
        notes.extend(f"{p['profile']}: {n}" for n in p["notes"])
        for r in p["candidates"]:
            picked = r.get("picked")
            style = "bold green" if picked else ("dim" if r["status"] != "measured" else None)
            verdict = r.get("reason") or ""
            size = r.get("size_bytes")
            thr = 1000.0 / r["p50_ms"] * p["batch_size"] if r.get("p50_ms") else None
            table.add_row(
                label, ("★ " if picked else "  ") + r["candidate"],
                f"{size / 1024:.0f} KiB" if size else "–", _f(r.get("p50_ms"), ".3f"), _f(r.get("runoff_p50_ms"), ".3f"),
                _f(thr, ".0f"),
                _f(r.get("speedup"), ".2f", "x"), _f(r.get("achieved_gflops"), ".1f"), _metric(r),
                _f(r.get("min_cosine"), ".4f"), verdict, style=style)
            label = ""
    console.print(table)
    base = ", ".join(f"{p['profile']} {_f(p['baseline']['p50_ms'], '.3f')} ms ({p['baseline']['runtime']})"
                     for p in doc["profiles"])
    console.print(f"speedup vs fp32 (ONNX Runtime, all graph optimizations, unless noted), measured beside each "
                  f"candidate; baseline p50: {base}. run-off: in-budget candidates re-timed side by side; the pick "
                  "ranks by it")
    for n in notes:
        console.print(n, highlight=False)


def _metric(row: dict) -> str:
    """The metric that decided this candidate's gate, e.g. 'mAP@0.5 vs fp32 0.969'."""
    if row.get("metric_value") is None:
        return "–"
    name = (row.get("metric_name") or "").replace(" vs fp32", "")
    return f"{name} {row['metric_value']:.4g}"


def _f(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None else format(value, spec) + suffix
