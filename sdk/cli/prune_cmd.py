"""`edgeopt prune`: structured channel pruning of a PyTorch model, recovered by distillation, exported to ONNX."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import click

from ..errors import InputError, UnsupportedError
from .options import emit_json, json_option, profile_option


def torch_model_options(fn):
    """--weights and --input-shape: how a MODULE:FACTORY becomes a model with example inputs."""
    options = [
        click.option("--weights", type=click.Path(dir_okay=False, path_type=Path),
                     help="PyTorch state_dict for the factory's module (torch.save(model.state_dict(), path)); "
                          "read with weights_only=True. With --task text-generation: int4 or int8 (weight "
                          "compression; default: the profile's [llm] weights)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def prune_options(fn):
    """The pruning flags shared by `edgeopt prune` and `edgeopt package --prune`."""
    options = [
        click.option("--importance", type=click.Choice(["l2", "l1", "taylor", "hessian"]), default="l2",
                     show_default=True, help="Channel ranking: weight magnitude (l2, l1) or the gradients of a "
                                             "label-free loss on the calibration inputs (taylor, hessian)."),
        click.option("--global", "global_pruning", is_flag=True,
                     help="Rank channels across all layers (the ratio is overall) instead of per layer."),
        click.option("--layer-ratio", "layer_ratios", multiple=True, metavar="LAYER=RATIO",
                     help="Own ratio for one layer (named as in model.named_modules()); repeat per layer."),
        click.option("--ignore", "ignore", multiple=True, metavar="LAYER",
                     help="Keep this layer's channels (repeat); layers producing outputs are always kept."),
        click.option("--round-to", type=click.IntRange(min=1),
                     help="Round channel counts to multiples of N (default: the profile's pruning.round_to; "
                          "1 keeps exact counts)."),
        click.option("--recover", "steps", type=click.IntRange(min=0), default=300, show_default=True,
                     help="Recovery steps: distillation from the unpruned model on --calib (no labels)."),
        click.option("--no-recover", is_flag=True, help="Prune without recovery (accuracy usually drops a lot)."),
        click.option("--train-fn", metavar="MODULE:FUNCTION",
                     help="Recover with your own fn(model, teacher=, data=, steps=) instead of distillation."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
                     help="Recovery learning rate (AdamW, cosine schedule)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
                     help="Recovery batch size."),
        click.option("--device", help="Recovery device (default: cuda when present, else cpu)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def layer_ratios_of(texts) -> dict[str, float]:
    out: dict[str, float] = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{text!r} is not LAYER=RATIO", param_hint="--layer-ratio")
        try:
            out[name] = float(value)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a number", param_hint="--layer-ratio") from None
    return out


def torch_inputs(input_shapes, image_size) -> list:
    """Model inputs from --input-shape NAME:D1,.. (repeat) or --image-size H,W (one input 'input' [1,3,H,W])."""
    from ..pipeline.shapes import parse_input_shape
    from ..prune.source import TorchInput

    out = []
    for text in input_shapes:
        name, dims = parse_input_shape(text)
        if any(d is None or int(d) < 1 for d in dims):
            raise InputError(f"--input-shape {text}: a PyTorch model needs every dimension fixed",
                             hint="e.g. images:1,3,224,224")
        out.append(TorchInput(name, tuple(int(d) for d in dims)))
    if not out and image_size:
        out.append(TorchInput("input", (1, 3, *image_size)))
    if not out:
        raise click.UsageError("a PyTorch model needs its input shape: --input-shape NAME:1,C,H,W")
    return out


def prune_job(model, weights, inputs, ratio, importance, global_pruning, layer_ratios, ignore, round_to, steps,
              no_recover, train_fn, lr, batch_size, device, calib, preprocessing, profile):
    from ..prune.core import check_ratio
    from ..prune.workflow import PruneJob

    if no_recover and train_fn:
        from .options import conflicting

        raise conflicting("--no-recover", "--train-fn")
    check_ratio(ratio)
    if round_to is None and profile is not None:
        round_to = profile.pruning.round_to
    return PruneJob(factory=model, weights=weights, inputs=inputs, ratio=ratio, per_layer=layer_ratios_of(layer_ratios),
                    global_pruning=global_pruning, importance=importance, ignore=list(ignore),
                    round_to=None if round_to == 1 else round_to, steps=0 if no_recover else steps,
                    train_fn=train_fn, calib=calib, preprocessing=preprocessing, lr=lr, batch_size=batch_size,
                    device=device)


@click.command("prune")
@click.argument("model")
@torch_model_options
@click.option("--ratio", type=float, help="Fraction of channels to remove, in (0, 1) (required unless --scan).")
@prune_options
@profile_option
@click.option("--calib", type=click.Path(path_type=Path),
              help="Unlabelled inputs for recovery: a folder of images or an .npz keyed by input name.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D1,D2,...",
              help="The model's input name and shape for export, e.g. images:1,3,224,224 (repeat per input).")
@click.option("--image-size", help="Images: resize to H,W (and the input shape 1,3,H,W without --input-shape).")
@click.option("--mean", help="Images: per-channel mean after scaling, e.g. 0.485,0.456,0.406.")
@click.option("--std", help="Images: per-channel std, e.g. 0.229,0.224,0.225.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="The pruned model to write: .onnx (written atomically; nothing is left there on failure).")
@click.option("--scan", is_flag=True, help="Sensitivity scan instead: each layer group pruned alone at "
                                           "--scan-ratios, judged against the unpruned model and timed.")
@click.option("--scan-ratios", default="0.25,0.5,0.75", show_default=True, help="Ratios of the scan.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path),
              help="--scan: also write the table and a plot as one self-contained HTML file.")
@json_option
def prune(model: str, weights, ratio, importance, global_pruning, layer_ratios, ignore, round_to, steps,
          no_recover, train_fn, lr, batch_size, device, profile, calib, input_shapes, image_size, mean, std,
          output: Path | None, scan: bool, scan_ratios: str, html_path: Path | None, as_json: bool) -> None:
    """Remove whole channels from a PyTorch MODEL (MODULE:FACTORY or file.py:FACTORY), recover its accuracy by
    distillation from the unpruned model on unlabelled --calib images, and export it to ONNX.

    \b
    edgeopt prune mypkg.models:build --weights w.pt --ratio 0.4 --input-shape images:1,3,224,224 \\
        --calib images/ --recover 300 -o model-pruned.onnx
    """
    from ..pipeline import RichProgress
    from ..profile import load_profile
    from ..prune.source import is_factory
    from .package_cmd import _floats, _size

    if scan:
        return _scan(model, weights, input_shapes, image_size, mean, std, calib, round_to, profile, scan_ratios,
                     html_path, as_json)
    if html_path is not None:
        raise click.UsageError("--html is for --scan")
    if ratio is None or output is None:
        raise click.UsageError("--ratio and -o/--output are required (or pass --scan)")
    if output.suffix.lower() != ".onnx":
        raise InputError(f"output {output.name} must end in .onnx", hint="e.g. -o model-pruned.onnx")
    if not is_factory(model):
        suffix = Path(model).suffix.lower()
        why = {".onnx": " (an ONNX file cannot be pruned here: no ONNX-to-PyTorch converter holds on the real "
                        "models this project tests)",
               ".pt2": " (a torch.export program cannot be pruned: its layers are aten calls on lifted weights, "
                       "not the nn.Conv2d / nn.Linear modules the dependency-graph pruner removes channels from)",
               }.get(suffix, f" (a {suffix} file cannot be pruned)" if suffix else "")
        raise UnsupportedError(f"{model}: pruning needs a PyTorch model given as MODULE:FACTORY{why}",
                               hint="e.g. mypkg.models:build --weights w.pt (the factory that builds the module)")
    size = _size(image_size)
    preprocessing = _preprocessing(size, _floats(mean, "--mean"), _floats(std, "--std"))
    job = prune_job(model, weights, torch_inputs(input_shapes, size), ratio, importance, global_pruning,
                    layer_ratios, ignore, round_to, steps, no_recover, train_fn, lr, batch_size, device, calib,
                    preprocessing, load_profile(profile))
    from ..prune.workflow import run_job

    workdir = Path(tempfile.mkdtemp(prefix="edgeopt-prune-"))
    try:
        outcome = run_job(job, workdir, RichProgress())
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.name}.tmp")
        shutil.copyfile(outcome.pruned_onnx, tmp)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    info = outcome.result.info
    if as_json:
        emit_json({"output": str(output), "pruning": info.model_dump(mode="json"),
                   "losses": outcome.result.losses})
        return
    print_pruning(info, output)


def _scan(model, weights, input_shapes, image_size, mean, std, calib, round_to, profile, scan_ratios, html_path,
          as_json) -> None:
    from ..pipeline import RichProgress
    from ..profile import load_profile
    from ..prune.core import require_torch
    from ..prune.scan import render_html, scan
    from ..prune.source import build_module, example_inputs, is_factory
    from ..prune.workflow import PruneJob, calibration_inputs
    from .package_cmd import _floats, _size

    if not is_factory(model):
        raise UnsupportedError(f"{model}: the scan needs a PyTorch model given as MODULE:FACTORY")
    torch, _ = require_torch()
    ratios = _floats(scan_ratios, "--scan-ratios")
    size = _size(image_size)
    inputs = torch_inputs(input_shapes, size)
    if round_to is None:
        round_to = load_profile(profile).pruning.round_to
    progress = RichProgress()
    module = build_module(model, weights)
    job = PruneJob(factory=model, weights=weights, inputs=inputs, ratio=0.5, calib=calib,
                   preprocessing=_preprocessing(size, _floats(mean, "--mean"), _floats(std, "--std")))
    data = calibration_inputs(job)
    rows = scan(module, example_inputs(torch, inputs), data, ratios, input_names=[i.name for i in inputs],
                round_to=None if round_to == 1 else round_to, progress=progress)
    if html_path is not None:
        tmp = html_path.with_name(f".{html_path.name}.tmp")
        tmp.write_text(render_html(rows, f"pruning sensitivity: {model}"), encoding="utf-8")
        import os as _os

        _os.replace(tmp, html_path)
    if as_json:
        emit_json({"rows": rows, "html": str(html_path) if html_path else None})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sensitivity: each layer group pruned alone, no recovery ({rows[0]['metric_name']} vs "
                        f"the unpruned model; latency ONNX Runtime fp32 batch 1, same run)" if rows else "no groups")
    for col in ("group", "layers", "channels", "ratio", "kept", "metric", "FLOPs x", "latency x"):
        table.add_column(col, justify="left" if col == "layers" else "right")
    for r in rows:
        table.add_row(str(r["group"]), ", ".join(r["layers"]), str(r["channels"]), f"{r['ratio']:.2f}", str(r["kept"]),
                      f"{r['metric']:.4f}", f"{r['flops_ratio']:.3f}", f"{r['latency_ratio']:.3f}")
    Console().print(table)
    if html_path is not None:
        Console().print(f"wrote {html_path}")


def _preprocessing(size, mean, std):
    from ..pipeline import ImagePreprocessing

    opts = {k: v for k, v in (("size", size), ("mean", mean), ("std", std)) if v is not None}
    return ImagePreprocessing(**opts) if opts else None


def print_pruning(info, output=None) -> None:
    """Before / after table (stdout)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pruned {info.ratio:.0%} ({info.importance})" + (f" -> {output}" if output else ""))
    for col in ("", "before", "after", "ratio"):
        table.add_column(col, justify="right" if col else "left")
    for label, a, b in (("channels", info.channels_before, info.channels_after),
                        ("parameters", info.params_before, info.params_after),
                        ("FLOPs", info.flops_before, info.flops_after)):
        table.add_row(label, f"{a:,}", f"{b:,}", f"{b / a:.2f}x" if a else "-")
    Console().print(table)
    if info.recovery != "none":
        Console().print(f"recovery: {info.recovery}, {info.recovery_steps} steps on {info.recovery_samples} "
                        f"samples, loss {info.recovery_loss_first:.4f} -> {info.recovery_loss_last:.4f}"
                        if info.recovery_loss_first is not None else f"recovery: {info.recovery}", highlight=False)
    else:
        Console().print("recovery: none (--no-recover)")
    if info.ignored_layers:
        Console().print(f"kept whole: {', '.join(info.ignored_layers)}", highlight=False)
