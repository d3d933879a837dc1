"""Options shared by several commands (pip-tools `scripts/options.py` style)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")

profile_option = click.option(
    "--profile", "-p", "profile", default="cpu", show_default=True,
    help="Hardware profile: a shipped name (see `edgeopt profiles list`) or a profile file path.",
)


def emit_json(doc: Any) -> None:
    """Write one JSON document to stdout."""
    json.dump(doc, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def conflicting(flag_a: str, flag_b: str) -> click.UsageError:
    """A usage error that names both flags."""
    return click.UsageError(f"{flag_a} and {flag_b} cannot be used together")


TASK_CHOICES = ["auto", "classify", "detect", "segment", "embed", "vad", "generic", "text-generation"]
DETECT_FORMATS = ["auto", "yolov8", "yolov8t", "yolov5", "nms", "tuple", "ssd"]


def accuracy_options(fn):
    """--task, --metric, --max-metric-drop, --labels, --detect-format, --preprocess (package and compare)."""
    options = [
        click.option("--task", type=click.Choice(TASK_CHOICES), default="auto", show_default=True,
                     help="How accuracy is judged: auto reads the model's metadata and outputs; classify (top-1 "
                          "agreement), detect (mAP@0.5 and F1 vs fp32's detections), segment (mask IoU), embed "
                          "(recall@1), generic (each output's cosine), text-generation (a language model: next-token "
                          "agreement, KL and perplexity on held-out text; package only, see docs/llm.md)."),
        click.option("--metric", metavar="MODULE:FUNCTION",
                     help="Your own metric: fn(fp32_outputs, optimized_outputs, labels) -> number, higher is "
                          "better; it decides the gate (the task's figures are still reported)."),
        click.option("--max-metric-drop", type=click.FloatRange(min=0.0),
                     help="Budget for --metric: the largest drop from fp32, in the metric's units "
                          "(default: the profile's max_metric_drop)."),
        click.option("--labels", type=click.Path(dir_okay=False, path_type=Path),
                     help="COCO-format JSON labels of the held-out images (detect): mAP against them too."),
        click.option("--detect-format", type=click.Choice(DETECT_FORMATS), default="auto", show_default=True,
                     help="How to read a detector's outputs (see docs/sdk.md)."),
        click.option("--preprocess", type=click.Choice(["stretch", "letterbox"]),
                     help="Image folders: stretch to the input size, or letterbox (keep aspect, pad grey 114). "
                          "Default: letterbox for Ultralytics detector exports, else stretch."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def accuracy_request(task, metric, max_metric_drop, labels, detect_format) -> dict:
    """PackageRequest fields from the accuracy options."""
    if task == "text-generation":
        raise click.UsageError("--task text-generation is built by `edgeopt package` (a .gguf file or a Hugging "
                               "Face folder); this command takes vision and signal models")
    if max_metric_drop is not None and metric is None:
        raise click.UsageError("--max-metric-drop is the budget of --metric; pass --metric MODULE:FUNCTION too")
    return {"task": task, "metric": metric, "max_metric_drop": max_metric_drop, "labels": labels,
            "detect_format": detect_format}
