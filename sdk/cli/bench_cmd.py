"""`edgeopt bench`: latency and throughput of a package on this host, or its per-layer profile (--layers)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click

from .options import conflicting, emit_json, json_option


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder: nothing half-written is left."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@click.command("bench")
@click.argument("package", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--iterations", type=click.IntRange(min=5), default=200, show_default=True, help="Timed runs.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Batch size (default: the package's profile).")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed runs first.")
@click.option("--public-key", "public_keys", multiple=True, type=click.Path(dir_okay=False),
              help="Also check the signature against this key (repeatable).")
@click.option("--layers", is_flag=True,
              help="Per-layer profile: time, share, executed precision, FLOPs and GOP/s of every layer.")
@click.option("--runs", type=click.IntRange(min=3, max=10000), default=50, show_default=True,
              help="--layers: profiled runs (each layer's time is the median over them).")
@click.option("--against", type=click.Path(dir_okay=False, path_type=Path),
              help="--layers: also profile this package and compare layer by layer (e.g. the fp32 build).")
@click.option("--trace", type=click.Path(dir_okay=False, path_type=Path),
              help="--layers: write a Chrome trace / Perfetto JSON of the profiled runs.")
@click.option("--html", type=click.Path(dir_okay=False, path_type=Path),
              help="--layers: write an HTML report (top layers bar chart, roofline-style plot).")
@click.option("--top", type=click.IntRange(min=1), default=15, show_default=True, help="--layers: rows shown.")
@click.option("--prompt-tokens", type=click.IntRange(min=1), help="Language models: prompt length in tokens "
              "(default 512).")
@click.option("--new-tokens", type=click.IntRange(min=1), help="Language models: tokens generated per request "
              "(default 128).")
@click.option("--streams", help="Language models: concurrent requests to measure, e.g. 1,8 (default 1,8); the "
              "first should be 1, the baseline of the scaling ratios.")
@click.option("--rounds", type=click.IntRange(min=1, max=50), default=3, show_default=True,
              help="Language models: repeats per stream count (medians are reported).")
@click.option("--no-peak", is_flag=True, help="--layers: skip measuring this machine's peak GOP/s (saves ~2 s).")
@json_option
def bench(package: Path, iterations: int, batch_size: int | None, warmup: int, public_keys: tuple[str, ...],
          layers: bool, runs: int, against: Path | None, trace: Path | None, html: Path | None, top: int,
          no_peak: bool, as_json: bool, prompt_tokens: int | None = None, new_tokens: int | None = None,
          streams: str | None = None, rounds: int = 3) -> None:
    """Verify PACKAGE's hashes, load it with its runtime and print p50/p90/p99 latency and throughput.

    With --layers, profile it layer by layer with the runtime's own profiler (ONNX Runtime's profiler,
    OpenVINO's PERF_COUNT counters; LiteRT exposes none and says so):

      edgeopt bench model-cpu.eopkg --layers --against model-fp32.eopkg --html report.html --trace trace.json
    """
    if _is_text_package(package):
        if layers:
            raise click.UsageError("--layers is for vision and signal models; a language model is measured by "
                                   "--prompt-tokens / --new-tokens / --streams")
        return _bench_text(package, prompt_tokens or 512, new_tokens or 128, _streams(streams), rounds,
                           public_keys, as_json)
    for flag, value in (("--prompt-tokens", prompt_tokens), ("--new-tokens", new_tokens), ("--streams", streams)):
        if value is not None:
            raise click.UsageError(f"{flag} is for language-model packages (edgeopt package --task text-generation)")
    if not layers:
        for flag, value in (("--against", against), ("--trace", trace), ("--html", html)):
            if value is not None:
                raise click.UsageError(f"{flag} needs --layers")
        return _bench(package, iterations, batch_size, warmup, public_keys, as_json)
    if against is not None and against.resolve() == package.resolve():
        raise conflicting("PACKAGE", "--against (the same file)")
    from ..layers import chrome_trace, compare
    from ..pipeline.layerbench import profile_package

    peak = None
    if not no_peak:
        from ..peak import measure_peak

        peak = measure_peak(size=512, seconds=0.3).to_dict()
    doc, raw = profile_package(package, runs=runs, warmup=min(warmup, 5), batch_size=batch_size,
                               public_keys=list(public_keys), peak=peak)
    if against is not None:
        base, _ = profile_package(against, runs=runs, warmup=min(warmup, 5), batch_size=batch_size,
                                  public_keys=list(public_keys), peak=peak)
        doc["against"] = {"model": base["model"], "layer_sum_ms": base["layer_sum_ms"],
                          "latency_ms": base["latency_ms"], "comparison": compare(doc, base), "profile": base}
    if trace is not None:
        _write_atomic(trace, json.dumps(chrome_trace(doc, raw)))
    if html is not None:
        from ..layers_html import render

        _write_atomic(html, render(doc))
    if as_json:
        emit_json(doc)
        return
    _print_layers(doc, top, trace, html)


def _is_text_package(package: Path) -> bool:
    from ..package import PackageReader

    try:
        with PackageReader(package) as pkg:
            return pkg.manifest.text is not None
    except Exception:  # noqa: BLE001  the vision path reports a broken package in its own words
        return False


def _streams(text: str | None) -> tuple[int, ...]:
    if text is None:
        return (1, 8)
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of counts", param_hint="--streams") from None
    if not vals or min(vals) < 1 or max(vals) > 256:
        raise click.BadParameter(f"{text!r}: each count is 1 to 256", param_hint="--streams")
    return vals


def _bench_text(package, prompt_tokens, new_tokens, streams, rounds, public_keys, as_json) -> None:
    from ..llm.bench import bench_llm

    report = bench_llm(package, streams, prompt_tokens, new_tokens, rounds=rounds, public_keys=list(public_keys))
    if as_json:
        emit_json(report)
        return
    from rich.console import Console
    from rich.table import Table

    con = Console()
    table = Table(title=f"{report['name']} {report['version']} ({report['runtime']} {report['precision']}): "
                        f"{prompt_tokens}-token prompts, {new_tokens} new tokens, median of {rounds}")
    cols = ("streams", "TTFT ms", "TPOT ms", "TPOT p95 ms", "tokens/s", "x 1 stream", "decode tokens/s",
            "decode x 1", "KV cache peak %")
    for col in cols:
        table.add_column(col, justify="right")
    for r in report["rows"]:
        table.add_row(str(r["streams"]), f"{r['ttft_ms']:.1f}", f"{r['tpot_ms']:.1f}", f"{r['tpot_p95_ms']:.1f}",
                      f"{r['tokens_per_s']:.1f}", str(r["x_one_stream"] or "-"), f"{r['decode_tokens_per_s']:.1f}",
                      str(r["decode_x_one_stream"] or "-"), f"{r['kv_cache_peak_pct']:.1f}")
    con.print(table)
    con.print(report["where"], highlight=False)


def _bench(package, iterations, batch_size, warmup, public_keys, as_json) -> None:
    from ..pipeline.hostbench import bench_package

    report = bench_package(package, iterations=iterations, batch_size=batch_size, warmup=warmup,
                           public_keys=list(public_keys))
    if as_json:
        emit_json(report)
        return
    from rich.console import Console
    from rich.table import Table

    con = Console()
    s = report["latency"]
    table = Table(title=f"{report['name']} {report['version']} ({report['runtime']} {report['precision']}, "
                        f"batch {report['batch_size']})")
    for col in ("p50 ms", "p90 ms", "p99 ms", "mean ms", "throughput/s", "iterations"):
        table.add_column(col, justify="right")
    table.add_row(f"{s['p50_ms']:.3f}", f"{s['p90_ms']:.3f}", f"{s['p99_ms']:.3f}", f"{s['mean_ms']:.3f}",
                  f"{s['throughput_ips']:.1f}", str(s["iterations"]))
    con.print(table)
    con.print(report["where"], highlight=False)


def _print_layers(doc: dict, top: int, trace: Path | None, html: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..layers import fmt_flops, top_layers

    con = Console()
    m = doc["model"]
    table = Table(title=f"{m.get('name')} {m.get('version')}: top {top} of {len(doc['layers'])} layers "
                        f"({doc['runtime']} on {doc['device']}, package {m.get('precision')}, {doc['runs']} runs)")
    for col, just in (("layer", "left"), ("op type", "left"), ("ran in", "left"), ("median µs", "right"),
                      ("share", "right"), ("FLOPs", "right"), ("GOP/s", "right"), ("of peak", "right"),
                      ("source nodes", "left")):
        table.add_column(col, justify=just, overflow="fold")
    for r in top_layers(doc, top):
        table.add_row(r["name"][:48], r["op_type"], r["precision"], f"{r['median_us']:.1f}", f"{r['share']:.1%}",
                      fmt_flops(r["flops"]), f"{r['gops']:.1f}" if r["gops"] else "-",
                      f"{r['of_peak']:.0%}" if r["of_peak"] else "-", ", ".join(r["source_nodes"][:3])[:60])
    con.print(table)
    groups = Table(title="by op type")
    for col in ("op type", "ran in", "layers", "median µs", "share", "GOP/s"):
        groups.add_column(col, justify="left" if col in ("op type", "ran in") else "right")
    for g in doc["by_op_type"][:top]:
        groups.add_row(g["op_type"], g["precision"], str(g["layers"]), f"{g['median_us']:.1f}", f"{g['share']:.1%}",
                       f"{g['gops']:.1f}" if g["gops"] else "-")
    con.print(groups)
    ratio = doc.get("layer_sum_vs_latency")
    con.print(f"sum of layer medians {doc['layer_sum_ms']:.3f} ms; whole-model median without the profiler "
              f"{doc['latency_ms']:.3f} ms" + (f" (ratio {ratio:.2f})" if ratio else ""), highlight=False)
    con.print(f"compute layers by executed precision (µs): {doc['compute_precisions']}", highlight=False)
    if doc["silent_precision"]:
        con.print(f"[bold]precision differs from the package[/bold] ({len(doc['silent_precision'])} layers): "
                  + ", ".join(doc["silent_precision"][:6]))
    for note in doc["notes"]:
        con.print(f"note: {note}", highlight=False)
    con.print(m.get("where", ""), highlight=False)
    if "against" in doc:
        c = doc["against"]["comparison"]
        b = doc["against"]["model"]
        con.print(f"\nagainst {b.get('name')} {b.get('version')} ({b.get('precision')}): layer sum "
                  f"{c['baseline_total_ms']:.3f} -> {c['total_ms']:.3f} ms"
                  + (f", speed-up {c['speedup']:.2f}x" if c["speedup"] else ""), highlight=False)
        for label, key in (("faster", "faster"), ("slower", "slower"), ("stayed in float", "stayed_float"),
                           ("precision changed", "precision_changed"),
                           ("ran in another precision than its package", "silent_precision"),
                           ("baseline ran in another precision than its package", "baseline_silent_precision")):
            if c[key]:
                con.print(f"  {label} ({len(c[key])}): {', '.join(c[key][:8])}", highlight=False)
    for label, path in (("trace", trace), ("HTML report", html)):
        if path is not None:
            con.print(f"{label}: {path}", highlight=False)
