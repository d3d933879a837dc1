"""`edgeopt package`: model -> optimized, validated, benchmarked, signed .eopkg for one hardware profile."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import InputError
from .options import accuracy_options, accuracy_request, conflicting, emit_json, json_option, profile_option
from .prune_cmd import prune_options, torch_model_options

PRECISION_CHOICES = ["fp32", "fp16", "int8", "int8-weight-only"]


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=flag) from None


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.replace("x", ",").split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise click.BadParameter(f"{text!r} is not H,W (e.g. 224,224)", param_hint="--image-size")
    return int(parts[0]), int(parts[1])


@click.command("package")
@click.argument("model")
@profile_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .eopkg file to write (atomically: nothing is left there on failure).")
@click.option("--calib", help="Calibration data: .npz keyed by input name, a folder of images, or 'random' "
                              "(smoke test only: the accuracy check becomes meaningless).")
@click.option("--heldout", type=click.Path(path_type=Path),
              help="Held-out data for the accuracy check (.npz with inputs and optional 'labels', or an image "
                   "folder). Default: the last samples of --calib, never used for calibration.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D1,D2,...",
              help="Fix an input's dims, e.g. images:1,3,224,224 (repeat per input).")
@click.option("--state", "states", multiple=True, metavar="INPUT:OUTPUT",
              help="Stateful model: INPUT is fed OUTPUT of the previous step, e.g. state:stateN (repeat per pair; "
                   "default: pairs detected by name and shape).")
@click.option("--sign-key", type=click.Path(dir_okay=False, path_type=Path), help="Ed25519 private key (PEM).")
@click.option("--no-sign", is_flag=True, help="Write an unsigned package on purpose (agents refuse it by default).")
@click.option("--accuracy-aware", is_flag=True,
              help="If int8 misses the accuracy budget, keep the most sensitive layers in float until it holds.")
@click.option("--weight-only", is_flag=True, help="int8 weights only, activations stay float (no calibration).")
@click.option("--runtime", help="Use this one of the profile's runtimes instead of measuring each.")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), help="Override the profile's precision.")
@click.option("--graph-level", type=click.Choice(["none", "basic", "all"]),
              help="Graph optimization: none, basic (onnxslim) or all (+ the runtime's optimizer). Default all.")
@click.option("--name", help="Package name (default: the model file's stem).")
@click.option("--version", "version_", default="1.0.0", show_default=True, help="Package version.")
@click.option("--image-size", help="Images: resize to H,W (default: the model's input size).")
@click.option("--mean", help="Images: per-channel mean after scaling, e.g. 0.485,0.456,0.406.")
@click.option("--std", help="Images: per-channel std, e.g. 0.229,0.224,0.225.")
@click.option("--scale", type=float, default=1 / 255, show_default=True, help="Images: pixel multiplier.")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), help="Images: tensor layout (default: guessed).")
@click.option("--channel-order", type=click.Choice(["RGB", "BGR"]), default="RGB", show_default=True,
              help="Images: channel order.")
@click.option("--calib-samples", type=click.IntRange(min=1), help="Cap on calibration samples.")
@click.option("--heldout-samples", type=click.IntRange(min=1), help="Cap on held-out samples.")
@click.option("--iterations", type=click.IntRange(min=5), default=100, show_default=True,
              help="Timed iterations per model in the host benchmark.")
@click.option("--validate-on", type=click.Choice(["host", "aarch64"]), default="host", show_default=True,
              help="Where the held-out outputs that decide the accuracy gate and become the golden samples are "
                   "computed: this host, or an emulated aarch64 CPU (QEMU; build it with scripts/arm-sysroot.sh). "
                   "Speed figures stay host measurements either way.")
@click.option("--arm-sysroot", type=click.Path(file_okay=False, path_type=Path),
              help="The emulated aarch64 environment for --validate-on aarch64 "
                   "[default: $EDGEOPT_ARM_SYSROOT or .cache/arm-sysroot].")
@click.option("--arm-cpu", metavar="MODEL",
              help="The CPU QEMU emulates for --validate-on aarch64 [default: $EDGEOPT_ARM_CPU or max: SVE, "
                   "i8mm, dot product]: cortex-a72 (Raspberry Pi 4), cortex-a53, cortex-a76, neoverse-n1, a64fx.")
@click.option("--calib-text", type=click.Path(dir_okay=False, path_type=Path),
              help="text-generation: UTF-8 text for data-aware int4 compression (AWQ and scale estimation).")
@click.option("--heldout-text", type=click.Path(dir_okay=False, path_type=Path),
              help="text-generation: UTF-8 text the gate judges on (default: text edgeopt ships).")
@click.option("--group-size", type=click.IntRange(min=-1), metavar="N",
              help="text-generation: int4 group size; -1 per channel (default: the profile's, auto).")
@click.option("--sym/--asym", default=None,
              help="text-generation: symmetric or asymmetric weights (default: the profile's [llm] symmetric).")
@click.option("--ratio", type=click.FloatRange(0.0, 1.0), default=1.0, show_default=True,
              help="text-generation: share of layers in int4, the rest in int8.")
@torch_model_options
@click.option("--prune", "prune_ratio", type=float, metavar="RATIO",
              help="PyTorch MODEL (MODULE:FACTORY): remove this fraction of channels first and recover by "
                   "distillation on --calib; the gate still compares with the unpruned fp32 model.")
@prune_options
@accuracy_options
@json_option
def package(model: Path, profile: str, output: Path, calib: str | None, heldout: Path | None,
            input_shapes: tuple[str, ...], states: tuple[str, ...], sign_key: Path | None, no_sign: bool, accuracy_aware: bool,
            weight_only: bool, runtime: str | None, precision: str | None, graph_level: str | None,
            name: str | None, version_: str, image_size: str | None, mean: str | None, std: str | None,
            scale: float, layout: str | None, channel_order: str, calib_samples: int | None,
            heldout_samples: int | None, iterations: int, validate_on: str, arm_sysroot: Path | None,
            arm_cpu: str | None, task: str, metric: str | None,
            max_metric_drop: float | None, labels: Path | None, detect_format: str, preprocess: str | None,
            as_json: bool, weights: Path | None = None, prune_ratio: float | None = None, importance: str = "l2",
            global_pruning: bool = False, layer_ratios=(), ignore=(), round_to: int | None = None, steps: int = 300,
            no_recover: bool = False, train_fn: str | None = None, lr: float = 1e-3, batch_size: int = 32,
            device: str | None = None, calib_text: Path | None = None, heldout_text: Path | None = None,
            group_size: int | None = None, sym: bool | None = None, ratio: float = 1.0) -> None:
    """Optimize, quantize, validate, benchmark and sign MODEL for a hardware profile.

    \b
    edgeopt package model.onnx --profile npu --calib calib.npz \\
        --input-shape images:1,3,224,224 --sign-key keys/edgeopt.key -o model-npu.eopkg
    edgeopt package mypkg.models:build --weights w.pt --input-shape images:1,3,224,224 \\
        --prune 0.4 --calib images/ --sign-key keys/edgeopt.key -o model-cpu.eopkg
    """
    from pydantic import ValidationError

    from ..pipeline import ImagePreprocessing, PackageRequest, RichProgress, build_package
    from ..pipeline.shapes import parse_input_shape

    if task == "text-generation" or (task == "auto" and _llm_source(model)):
        return _package_llm(locals())
    for flag, value in (("--calib-text", calib_text), ("--heldout-text", heldout_text),
                        ("--group-size", group_size), ("--sym/--asym", sym), ("--ratio", None if ratio == 1.0
                                                                                else ratio)):
        if value is not None:
            raise click.UsageError(f"{flag} is for --task text-generation (a language model)")
    if sign_key and no_sign:
        raise conflicting("--sign-key", "--no-sign")
    if not sign_key and not no_sign:
        raise click.UsageError("--sign-key KEY is required (create one with: edgeopt keygen --out keys/); "
                               "pass --no-sign to write an unsigned package on purpose")
    if weight_only and precision not in (None, "int8-weight-only"):
        raise conflicting("--weight-only", f"--precision {precision}")
    if accuracy_aware and weight_only:
        raise conflicting("--accuracy-aware", "--weight-only")
    if accuracy_aware and precision in ("fp32", "fp16"):
        raise conflicting("--accuracy-aware", f"--precision {precision}")
    for flag, value in (("--arm-sysroot", arm_sysroot), ("--arm-cpu", arm_cpu)):
        if value is not None and validate_on == "host":
            raise click.UsageError(f"{flag} is only used with --validate-on aarch64")
    if validate_on != "host":
        from ..emulation import find_emulator

        find_emulator(arm_sysroot, arm_cpu)  # a missing sysroot fails now, not after the pipeline's work
    image_opts = {"size": _size(image_size), "mean": _floats(mean, "--mean"), "std": _floats(std, "--std"),
                  "layout": layout}
    preprocessing = None
    if any(v is not None for v in image_opts.values()) or channel_order != "RGB" or scale != 1 / 255 or preprocess:
        try:
            preprocessing = ImagePreprocessing(
                **{k: v for k, v in image_opts.items() if v is not None}, scale=scale, channel_order=channel_order,
                resize=preprocess)
        except ValidationError as exc:
            raise click.UsageError(f"image preprocessing options: {exc.errors()[0]['msg']}") from None
    shapes = {}
    for text in input_shapes:
        n, dims = parse_input_shape(text)
        if n in shapes:
            raise InputError(f"--input-shape given twice for input {n!r}")
        shapes[n] = dims
    from ..stateful import parse_state

    pairs: dict[str, str] = {}
    for text in states:
        n, out = parse_state(text)
        if n in pairs:
            raise InputError(f"--state given twice for input {n!r}")
        pairs[n] = out
    from ..prune.source import is_factory

    torch_model = is_factory(model)
    if prune_ratio is not None and not torch_model:
        from ..errors import UnsupportedError

        raise UnsupportedError(f"--prune needs a PyTorch model given as MODULE:FACTORY, found {model}",
                               hint="e.g. edgeopt package mypkg.models:build --weights w.pt --prune 0.4 ...")
    if weights is not None and not torch_model:
        raise click.UsageError("--weights is for a PyTorch MODEL given as MODULE:FACTORY")
    if torch_model:
        return _package_torch(locals(), shapes, preprocessing, build_package, PackageRequest, RichProgress)
    model = Path(model)
    try:
        request = PackageRequest(
            model=model, profile=profile, output=output, states=pairs,
            calib=("random" if calib == "random" else Path(calib)) if calib else None,
            preprocessing=preprocessing, input_shapes=shapes, sign_key=sign_key, unsigned=no_sign,
            accuracy_aware=accuracy_aware, weight_only=weight_only, name=name, version=version_, heldout=heldout,
            runtime=runtime, precision=precision, graph_level=graph_level, calib_samples=calib_samples,
            heldout_samples=heldout_samples, bench_iterations=iterations, validate_on=validate_on,
            arm_sysroot=arm_sysroot, arm_cpu=arm_cpu,
            **accuracy_request(task, metric, max_metric_drop, labels, detect_format))
    except ValidationError as exc:
        raise click.UsageError(exc.errors()[0]["msg"]) from None
    progress = RichProgress()
    result = build_package(request, progress)
    if as_json:
        emit_json(result.summary())
        return
    print_summary(result)


def _llm_source(model) -> bool:
    from ..llm.source import looks_like_llm

    return looks_like_llm(Path(model))


def _package_llm(a: dict) -> None:
    """A language model: weight compression, the text gate, golden prompts (edgeopt.sdk.llm.build)."""
    from ..llm.build import LlmRequest, build_llm_package
    from ..pipeline import RichProgress

    if a["sign_key"] and a["no_sign"]:
        raise conflicting("--sign-key", "--no-sign")
    if not a["sign_key"] and not a["no_sign"]:
        raise click.UsageError("--sign-key KEY is required (create one with: edgeopt keygen --out keys/); "
                               "pass --no-sign to write an unsigned package on purpose")
    vision_only = {"--calib": a["calib"], "--heldout": a["heldout"], "--input-shape": a["input_shapes"] or None,
                   "--state": a["states"] or None, "--runtime": a["runtime"], "--precision": a["precision"],
                   "--prune": a["prune_ratio"], "--metric": a["metric"], "--labels": a["labels"],
                   "--weight-only": a["weight_only"] or None, "--image-size": a["image_size"]}
    for flag, value in vision_only.items():
        if value is not None:
            raise click.UsageError(f"{flag} is not used with --task text-generation "
                                   f"(see edgeopt package --help: --calib-text, --heldout-text, --weights)")
    weights = str(a["weights"]) if a["weights"] is not None else None
    req = LlmRequest(model=Path(a["model"]), profile=a["profile"], output=a["output"], weights=weights,
                     group_size=a["group_size"], sym=a["sym"], ratio=a["ratio"], calib_text=a["calib_text"],
                     heldout_text=a["heldout_text"], accuracy_aware=a["accuracy_aware"], name=a["name"],
                     version=a["version_"], sign_key=a["sign_key"], unsigned=a["no_sign"])
    result = build_llm_package(req, RichProgress())
    if a["as_json"]:
        emit_json(result.summary())
        return
    t = result.manifest.text
    f = t.figures
    click.echo(f"wrote {result.output} ({result.output.stat().st_size / 1e6:.1f} MB): {t.weights} weights"
               + (f", group {t.group_size}, int4 ratio {t.int4_ratio:g}" if t.weights == "int4" else "")
               + f"; top-1 agreement {f['token_agreement']:.4f}, KL {f['mean_kl']:.4f}, perplexity "
               f"{f['ppl_original']:.2f} -> {f['ppl_compressed']:.2f} ({f['ppl_increase_pct']:+.1f}%); host "
               f"TTFT {t.host_perf['ttft_ms']} ms, {t.host_perf['tokens_per_s']} tokens/s"
               + ("" if result.signed else "; UNSIGNED"))
    if t.host_perf.get("host_proxy"):
        # Not folded into the line above: a package for another device must say so on a line of its own.
        click.echo(f"measured on the host CPU as a proxy for {result.manifest.device}: "
                   f"{t.host_perf.get('proxy_note')}")


def _package_torch(args: dict, shapes, preprocessing, build_package, PackageRequest, RichProgress) -> None:
    """MODULE:FACTORY: export (pruned and recovered with --prune) to ONNX, then the normal pipeline, judged
    against the unpruned model's fp32 outputs."""
    import shutil
    import tempfile

    from pydantic import ValidationError

    from ..pipeline.types import TorchSource
    from ..profile import load_profile
    from ..prune.workflow import PruneJob, run_job
    from .prune_cmd import prune_job, torch_inputs

    a = args
    profile = load_profile(a["profile"])
    inputs = torch_inputs(a["input_shapes"], preprocessing.size if preprocessing else None)
    calib = Path(a["calib"]) if a["calib"] and a["calib"] != "random" else None
    if a["prune_ratio"] is not None:
        job = prune_job(a["model"], a["weights"], inputs, a["prune_ratio"], a["importance"], a["global_pruning"],
                        a["layer_ratios"], a["ignore"], a["round_to"], a["steps"], a["no_recover"], a["train_fn"],
                        a["lr"], a["batch_size"], a["device"], calib, preprocessing, profile)
        if a["heldout"] is None:
            held_n = a["heldout_samples"] or profile.accuracy.held_out_samples
            int8 = (a["precision"] or ("int8-weight-only" if a["weight_only"] else profile.precision.mode.value)) == "int8"
            job.holdout = (("tail", a["calib_samples"] or profile.precision.calibration_samples, held_n) if int8
                           else ("head", 0, held_n))
    else:
        job = PruneJob(factory=a["model"], weights=a["weights"], inputs=inputs, ratio=0.0)
    progress = RichProgress()
    workdir = Path(tempfile.mkdtemp(prefix="edgeopt-torch-"))
    try:
        if a["prune_ratio"] is not None:
            outcome = run_job(job, workdir, progress, export_reference=True)
            onnx_model, reference, pruning = outcome.pruned_onnx, outcome.unpruned_onnx, outcome.result.info
        else:
            onnx_model, reference, pruning = _export_only(job, workdir, progress), None, None
        # Runtimes that compile PyTorch itself (torch-aoti) take the module; a pruned module lives only in memory
        # and reaches them through its ONNX export alone.
        torch_source = TorchSource(factory=a["model"], weights=a["weights"]) if pruning is None else None
        name = a["name"] or a["model"].rsplit(":", 1)[1]
        try:
            request = PackageRequest(
                model=onnx_model, reference_model=reference, pruning=pruning, torch_source=torch_source,
                profile=profile, output=a["output"],
                calib=("random" if a["calib"] == "random" else calib) if a["calib"] else None,
                preprocessing=preprocessing, input_shapes=shapes or {i.name: list(i.shape) for i in inputs},
                sign_key=a["sign_key"], unsigned=a["no_sign"], accuracy_aware=a["accuracy_aware"],
                weight_only=a["weight_only"], name=name, version=a["version_"], heldout=a["heldout"],
                runtime=a["runtime"], precision=a["precision"], graph_level=a["graph_level"],
                calib_samples=a["calib_samples"], heldout_samples=a["heldout_samples"],
                bench_iterations=a["iterations"],
                **accuracy_request(a["task"], a["metric"], a["max_metric_drop"], a["labels"], a["detect_format"]))
        except ValidationError as exc:
            raise click.UsageError(exc.errors()[0]["msg"]) from None
        result = build_package(request, progress)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if a["as_json"]:
        summary = result.summary()
        summary["pruning"] = pruning.model_dump(mode="json") if pruning else None
        emit_json(summary)
        return
    print_summary(result)
    if pruning is not None:
        from .prune_cmd import print_pruning

        print_pruning(pruning)


def _export_only(job, workdir: Path, progress) -> Path:
    from ..errors import missing_extra
    from ..prune.source import build_module, example_inputs, export_onnx

    try:
        import torch
    except ImportError:
        raise missing_extra("torch", "torch") from None
    with progress.stage("load and export the PyTorch model"):
        module = build_module(job.factory, job.weights)
        return export_onnx(module, example_inputs(torch, job.inputs), job.inputs, workdir / "model.onnx")


def print_summary(result) -> None:
    """The human summary table (stdout)."""
    from rich.console import Console
    from rich.table import Table

    m, b, v = result.manifest, result.benchmark, result.validation
    con = Console()
    table = Table(title=f"{m.name} {m.version} -> {result.output}", show_header=True)
    table.add_column("")
    table.add_column("value")
    kind = m.profile.get("target", {}).get("device", "?")
    where = (f"host CPU as a proxy for {b.target_device} ({kind}), which this host does not have" if b.host_proxy
             else "this host")
    rows = [
        ("profile", f"{m.profile_name} ({m.profile.get('target', {}).get('device', '?')})"),
        ("runtime", f"{m.runtime} {m.runtime_version} on {m.device}"),
        ("precision", m.precision + (f" ({len(v.float_layers)} layers kept in float)" if v.float_layers else "")),
        ("size", f"{result.chosen.size_bytes:,} bytes (source {result.chosen.source_size_bytes:,})"),
        ("accuracy", accuracy_summary(v)),
        *([("validated on", f"{v.ran_on}: {v.target.runtime_version}, {v.target.samples} samples, outputs vs host "
                            f"max abs err {max((o.max_abs_error for o in v.target.vs_host), default=0.0):.3g}")]
          if v.target is not None else []),
        ("latency", f"p50 {b.optimized.p50_ms:.3f} ms, p90 {b.optimized.p90_ms:.3f}, p99 {b.optimized.p99_ms:.3f} "
                    f"(fp32 ONNX Runtime p50 {b.fp32.p50_ms:.3f} ms)"),
        ("throughput", f"{b.optimized.throughput_ips:.1f}/s at batch {b.batch_size}; {b.speedup:.2f}x vs fp32"),
        ("measured on", where),
        ("signed", "yes" if result.signed else "NO (--no-sign)"),
    ]
    if m.calibration and not m.calibration.meaningful:
        rows.append(("calibration", "RANDOM: the accuracy check is meaningless"))
    for k, val in rows:
        table.add_row(k, val)
    con.print(table)
    for d in m.decisions:
        con.print(f"- {d}", highlight=False)


def accuracy_summary(v) -> str:
    """The task, the metric that decided, the other checks and each output's cosine, in one cell."""
    lines = [f"{'PASS' if v.passed else 'FAIL'}, task {v.task} ({v.samples} held-out samples)"]
    for c in v.checks:
        if c.rule == "max_drop":
            lines.append(f"{c.name}: {c.fp32:.4g} -> {c.optimized:.4g} (drop {c.drop:.3g}, budget <= {c.bound:g})")
        elif c.rule == "min":
            lines.append(f"{c.name}: {c.optimized:.4f} (budget >= {c.bound:g})")
        else:
            lines.append(f"{c.name}: {c.optimized:.4f}")
    for o in v.outputs:
        lines.append(f"output {o.name}: cosine min {o.min_cosine:.4f}, SNR {o.min_snr_db:.1f} dB, "
                     f"max abs err {o.max_abs_error:.3g}")
    return "\n".join(lines)
