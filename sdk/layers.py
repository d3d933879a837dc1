"""Per-layer profiles: where the time of one inference goes, layer by layer, on the runtime that runs it.

The runtimes (``edgeopt.agent.runtimes``) return raw :class:`LayerRun` records, one per layer of the
executed graph, with the time of that layer in each profiled run and the precision the runtime says it
executed in. This module turns them into a profile document (plain JSON): per layer the median time,
its share of the total, its FLOPs and achieved GOP/s against the measured peak of its precision; the
same grouped by op type; a comparison of two profiles; a Chrome trace; and the short summary stored in
a package's manifest. Pure Python plus numpy: the agent and the dashboard import it without a runtime.

FLOPs follow :mod:`edgeopt.sdk.flops` (2 x MACs of Conv / Gemm / MatMul layers, everything else 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

PROFILE_SCHEMA = 1
# Op types whose precision decides the model's speed (the placement check and "stayed in float" look
# only at these: a Reorder or Reshape in f32 is how every int8 graph looks).
COMPUTE_OPS = frozenset({
    "Conv", "FusedConv", "QLinearConv", "ConvInteger", "NhwcFusedConv", "ConvTranspose", "Convolution",
    "GroupConvolution", "Deconvolution", "Gemm", "FusedGemm", "QGemm", "MatMul", "FusedMatMul", "QLinearMatMul",
    "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "FullyConnected",
    "FullyConnectedQuantizedLegacy", "FullyConnectedQuantized", "CONV_2D", "DEPTHWISE_CONV_2D",
    "FULLY_CONNECTED", "BATCH_MATMUL",
})

# Runtime spellings of a precision -> the package's words (int8 / fp32 / bf16 / fp16).
_PRECISION = {
    "f32": "fp32", "fp32": "fp32", "float": "fp32", "float32": "fp32", "tensor(float)": "fp32",
    "bf16": "bf16", "bfloat16": "bf16", "f16": "fp16", "fp16": "fp16", "float16": "fp16", "MLFloat16": "fp16",
    "u8": "int8", "i8": "int8", "uint8": "int8", "int8": "int8", "u4": "int4", "i4": "int4",
    "i32": "int32", "int32": "int32", "i64": "int64", "int64": "int64", "boolean": "bool", "bool": "bool",
}


def precision_word(raw: str | None) -> str:
    """The package's word for a runtime's precision name ('u8' -> 'int8', 'bf16' -> 'bf16'); '?' if unknown."""
    if not raw:
        return "?"
    return _PRECISION.get(str(raw).strip(), _PRECISION.get(str(raw).strip().lower(), str(raw).lower()))


@dataclass
class LayerRun:
    """One layer of the executed graph and its time (microseconds) in each profiled run."""

    name: str
    op_type: str
    precision: str
    times_us: list[float] = field(default_factory=list)
    device: str = ""
    exec_type: str = ""
    source_nodes: list[str] = field(default_factory=list)
    macs: int | None = None
    bytes_moved: int | None = None  # inputs + weights + outputs at their executed size (for intensity)


@dataclass
class RawProfile:
    """What a runtime's profiler gave: layers, the wall time of each profiled run, and what it cannot say."""

    runtime: str
    runtime_version: str
    device: str
    layers: list[LayerRun]
    runs: int
    run_ms: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _median(values: Iterable[float]) -> float:
    arr = np.asarray(list(values), dtype=np.float64)
    return float(np.median(arr)) if arr.size else 0.0


def _peak_for(precision: str, peak: dict | None, threads_all: bool) -> float | None:
    """The measured peak (GOP/s) a layer of this precision is held to: int8 peak for int8, fp32 otherwise."""
    if not peak:
        return None
    suffix = "all" if threads_all else "1t"
    key = f"int8_gops_{suffix}" if precision in ("int8", "int4") else f"fp32_gops_{suffix}"
    value = peak.get(key)
    return float(value) if value else None


def build_profile(raw: RawProfile, *, latency_ms: float | None = None, peak: dict | None = None,
                  peak_all_threads: bool = True, batch: int = 1, model: dict | None = None) -> dict[str, Any]:
    """The profile document of ``raw``: per-layer medians, shares, FLOPs, GOP/s and the op-type grouping.

    ``latency_ms`` is the whole-model median latency measured without the profiler in the same run (the
    profile states how far the sum of layer medians is from it); ``peak`` is a :class:`PeakFigures` dict.
    """
    rows = []
    for layer in raw.layers:
        med = _median(layer.times_us)
        flops = 2 * layer.macs if layer.macs else 0
        gops = flops / (med * 1e3) if med > 0 and flops else None  # flops / (us * 1e-6) / 1e9
        ceiling = _peak_for(layer.precision, peak, peak_all_threads)
        flops_per_byte = round(flops / layer.bytes_moved, 3) if flops and layer.bytes_moved else None
        rows.append({
            "name": layer.name, "op_type": layer.op_type, "precision": layer.precision, "device": layer.device,
            "exec_type": layer.exec_type, "source_nodes": list(layer.source_nodes), "median_us": round(med, 3),
            "min_us": round(min(layer.times_us), 3) if layer.times_us else 0.0, "flops": flops,
            "gops": round(gops, 3) if gops is not None else None,
            "peak_gops": round(ceiling, 3) if ceiling else None,
            "of_peak": round(gops / ceiling, 4) if gops and ceiling else None,
            "intensity": flops_per_byte,
            "compute": layer.op_type in COMPUTE_OPS,
        })
    total_us = sum(r["median_us"] for r in rows)
    for r in rows:
        r["share"] = round(r["median_us"] / total_us, 5) if total_us > 0 else 0.0
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        g = groups.setdefault((r["op_type"], r["precision"]), {"op_type": r["op_type"], "precision": r["precision"],
                                                               "layers": 0, "median_us": 0.0, "flops": 0})
        g["layers"] += 1
        g["median_us"] += r["median_us"]
        g["flops"] += r["flops"]
    by_op = sorted(groups.values(), key=lambda g: -g["median_us"])
    for g in by_op:
        g["median_us"] = round(g["median_us"], 3)
        g["share"] = round(g["median_us"] / total_us, 5) if total_us > 0 else 0.0
        g["gops"] = round(g["flops"] / (g["median_us"] * 1e3), 3) if g["flops"] and g["median_us"] > 0 else None
    by_precision: dict[str, float] = {}
    for r in rows:
        if r["compute"]:
            by_precision[r["precision"]] = by_precision.get(r["precision"], 0.0) + r["median_us"]
    total_ms = total_us / 1e3
    doc = {
        "schema": PROFILE_SCHEMA, "runtime": raw.runtime, "runtime_version": raw.runtime_version,
        "device": raw.device, "runs": raw.runs, "batch_size": batch, "model": model or {},
        "layers": rows, "by_op_type": by_op,
        "compute_precisions": {k: round(v, 3) for k, v in sorted(by_precision.items())},
        "layer_sum_ms": round(total_ms, 4),
        "profiled_run_ms": round(_median(raw.run_ms), 4) if raw.run_ms else None,
        "latency_ms": round(latency_ms, 4) if latency_ms else None,
        "layer_sum_vs_latency": round(total_ms / latency_ms, 4) if latency_ms else None,
        "flops": sum(r["flops"] for r in rows), "peak": peak or None, "notes": list(raw.notes),
    }
    doc["silent_precision"] = silent_precision(doc)
    return doc


def top_layers(profile: dict[str, Any], n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` layers with the largest median time, largest first."""
    return sorted(profile.get("layers") or [], key=lambda r: -float(r.get("median_us") or 0.0))[:n]


def summary(profile: dict[str, Any], top: int = 10) -> dict[str, Any]:
    """The short form stored in a manifest (``host_profile``) and sent by agents: totals, groups, top layers."""
    keep = ("name", "op_type", "precision", "median_us", "share", "flops", "gops", "source_nodes")
    return {
        "schema": PROFILE_SCHEMA, "runtime": profile.get("runtime"), "runtime_version": profile.get("runtime_version"),
        "device": profile.get("device"), "runs": profile.get("runs"), "batch_size": profile.get("batch_size"),
        "layer_sum_ms": profile.get("layer_sum_ms"), "latency_ms": profile.get("latency_ms"),
        "layers_total": len(profile.get("layers") or []),
        "compute_precisions": profile.get("compute_precisions") or {},
        "by_op_type": [{k: g.get(k) for k in ("op_type", "precision", "layers", "median_us", "share")}
                       for g in (profile.get("by_op_type") or [])[:top]],
        "top_layers": [{k: r.get(k) for k in keep} for r in top_layers(profile, top)],
        "layers": [{"name": r.get("name"), "op_type": r.get("op_type"), "precision": r.get("precision"),
                    "median_us": r.get("median_us"), "source_nodes": list(r.get("source_nodes") or [])[:1],
                    "compute": r.get("compute")} for r in (profile.get("layers") or [])[:400]],
        "notes": list(profile.get("notes") or [])[:10],
    }


def _key(row: dict[str, Any]) -> str:
    """A layer's identity across two builds: its first source node, else its runtime name."""
    src = row.get("source_nodes") or []
    return str(src[0]) if src else str(row.get("name"))


def silent_precision(profile: dict[str, Any]) -> list[str]:
    """Compute layers that ran in a float precision other than the package's (the CPU plugin's bf16 on a
    fp32 or int8 package, fp32 on a fp16 package): 'layer: ran in bf16 (package fp32)'."""
    declared = str((profile.get("model") or {}).get("precision") or "")
    wanted = {"fp32": {"fp32"}, "fp16": {"fp16"}, "int8": {"fp32", "int8"}}.get(declared)
    if wanted is None:
        return []
    return [f"{r['name']}: ran in {r['precision']} (package {declared})" for r in profile.get("layers") or []
            if r.get("compute") and r["precision"] in ("fp32", "bf16", "fp16") and r["precision"] not in wanted]


def compare(profile: dict[str, Any], against: dict[str, Any]) -> dict[str, Any]:
    """Layer by layer ``profile`` (new) vs ``against`` (baseline): faster, slower, float, precision changes.

    Layers are matched by their first source node name (a fused int8 Conv and its fp32 Conv share it),
    else by runtime name; layers present on one side only are listed as such.
    """
    a = {_key(r): r for r in profile.get("layers") or []}
    b = {_key(r): r for r in against.get("layers") or []}
    rows = []
    for key in list(b) + [k for k in a if k not in b]:
        new, old = a.get(key), b.get(key)
        new_us = float(new["median_us"]) if new else None
        old_us = float(old["median_us"]) if old else None
        row = {"layer": key, "op_type": (new or old)["op_type"], "us": new_us, "baseline_us": old_us,
               "precision": new["precision"] if new else None, "baseline_precision": old["precision"] if old else None,
               "speedup": round(old_us / new_us, 3) if new_us and old_us else None,
               "delta_us": round(new_us - old_us, 3) if new_us is not None and old_us is not None else None}
        row["precision_changed"] = bool(new and old and new["precision"] != old["precision"])
        row["stayed_float"] = bool(new and new.get("compute") and new["precision"] in ("fp32", "bf16", "fp16")
                                   and old and old["precision"] in ("fp32", "bf16", "fp16"))
        rows.append(row)
    total_new, total_old = profile.get("layer_sum_ms") or 0.0, against.get("layer_sum_ms") or 0.0
    matched = [r for r in rows if r["delta_us"] is not None]
    return {
        "layers": rows,
        "faster": [r["layer"] for r in sorted(matched, key=lambda r: r["delta_us"]) if r["delta_us"] < 0][:20],
        "slower": [r["layer"] for r in sorted(matched, key=lambda r: -r["delta_us"]) if r["delta_us"] > 0][:20],
        "stayed_float": [r["layer"] for r in rows if r["stayed_float"]],
        "precision_changed": [f"{r['layer']}: {r['baseline_precision']} -> {r['precision']}"
                              for r in rows if r["precision_changed"]],
        "silent_precision": silent_precision(profile), "baseline_silent_precision": silent_precision(against),
        "only_in_profile": [k for k in a if k not in b], "only_in_baseline": [k for k in b if k not in a],
        "total_ms": total_new, "baseline_total_ms": total_old,
        "speedup": round(total_old / total_new, 3) if total_new and total_old else None,
    }


def chrome_trace(profile: dict[str, Any], raw: RawProfile | None = None, *, max_events: int = 20000) -> dict:
    """A Chrome trace / Perfetto JSON: one track per run when ``raw`` (per-run times) is given, else one
    run laid out from the medians. Layers are laid end to end in execution order (their real start times
    are not exposed by every runtime, so gaps between layers are not shown)."""
    events: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": 1,
                                     "args": {"name": f"edgeopt {profile.get('runtime')} {profile.get('device')}"}}]
    meta = {r["name"]: r for r in profile.get("layers") or []}
    if raw is not None and raw.layers:
        runs = min(len(layer.times_us) for layer in raw.layers)
        tracks = [[(layer.name, layer.times_us[i]) for layer in raw.layers] for i in range(runs)]
    else:
        tracks = [[(r["name"], float(r["median_us"])) for r in profile.get("layers") or []]]
    t = 0.0
    for i, track in enumerate(tracks):
        events.append({"name": f"run {i}", "ph": "X", "pid": 1, "tid": 1, "ts": round(t, 3),
                       "dur": round(sum(d for _, d in track), 3), "cat": "run"})
        for name, dur in track:
            if len(events) >= max_events:
                break
            row = meta.get(name, {})
            events.append({"name": name, "ph": "X", "pid": 1, "tid": 2, "ts": round(t, 3), "dur": round(dur, 3),
                           "cat": row.get("op_type", "layer"),
                           "args": {"op_type": row.get("op_type"), "precision": row.get("precision"),
                                    "source_nodes": row.get("source_nodes"), "flops": row.get("flops")}})
            t += dur
        t += 10.0
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"runtime": profile.get("runtime"), "device": profile.get("device"),
                          "runs": len(tracks)}}


def roofline_points(profile: dict[str, Any]) -> list[dict[str, Any]]:
    """(GOP/s, FLOPs per byte) points of the compute layers with FLOPs, for the HTML roofline-style plot."""
    return [{"name": r["name"], "gops": r["gops"], "flops": r["flops"], "precision": r["precision"],
             "intensity": r.get("intensity")}
            for r in profile.get("layers") or [] if r.get("gops") and r.get("intensity")]


def fmt_flops(value: float | int | None) -> str:
    """'1.8 G', '12.3 M' or '-'."""
    if not value:
        return "-"
    exp = min(int(math.log10(abs(value)) // 3), 4)
    return f"{value / 10 ** (3 * exp):.1f} {['', 'k', 'M', 'G', 'T'][exp]}".strip()
