"""Render a :class:`~edgeopt.sdk.compare.CompareReport` as one self-contained HTML file.

The page has inline CSS and, per profile, a latency-vs-accuracy scatter drawn by matplotlib as inline SVG,
followed by the candidate table. Nothing is loaded from the network (reports are read on offline machines).
"""
from __future__ import annotations

import html
import io
import logging
import os
import string
import tempfile
from pathlib import Path
from typing import Any

from .errors import InputError, missing_extra

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).resolve().parent / "templates" / "report.html"


def _fmt(value: Any, spec: str = "", none: str = "–") -> str:
    if value is None:
        return none
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def _size(n: int | None) -> str:
    if n is None:
        return "–"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.2f} MiB"
    return f"{n / 1024:.1f} KiB"


def scatter_svg(profile: dict[str, Any]) -> str:
    """Latency (x) vs min cosine to fp32 (y) of one profile's measured candidates, as an inline <svg>."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise missing_extra("matplotlib", "sdk") from None
    rows = [r for r in profile["candidates"] if r.get("status") == "measured" and r.get("p50_ms") is not None]
    # x is what the pick ranks by: the run-off latency where the candidate took part in it.
    xs = {id(r): r.get("runoff_p50_ms") or r["p50_ms"] for r in rows}
    # Accuracy is drawn as 1 - cosine on a log axis: cosines of 0.999 and 0.9999 differ by 10x in error, and a
    # linear cosine axis squeezes every faithful candidate into one line under a single bad one.
    floor = 1e-6
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "edgeopt", "font.size": 9}):
        fig, ax = plt.subplots(figsize=(10, 4.2))
        try:
            for r in rows:
                # The task metric that decided the gate (agreement-style, 1.0 = fp32); cosine for old reports.
                value = r.get("metric_value") if r.get("metric_value") is not None and r.get("metric_value") <= 1.0 \
                    else r.get("min_cosine")
                y = max(1.0 - value, floor) if value is not None else 1.0
                color = "#1a7f37" if r.get("passed") else "#cf222e"
                marker = "*" if r.get("picked") else ("o" if r.get("passed") else "x")
                extra = {"edgecolors": "black"} if r.get("picked") else {}
                ax.scatter([xs[id(r)]], [y], c=color, marker=marker, s=220 if r.get("picked") else 45,
                           zorder=3, **extra)
                # Numbers, not labels, beside the points: the table's "#" column names them without overlap.
                ax.annotate(str(r.get("index", "")), (xs[id(r)], y), textcoords="offset points", xytext=(6, 3),
                            fontsize=8, color="#1f2328")
            ax.set_yscale("log")
            bounded = next((r for r in rows if r.get("metric_bound") is not None), None)
            budget = bounded["metric_bound"] if bounded else profile.get("budget", {}).get("min_cosine")
            what = (bounded.get("metric_name") or "task metric") if bounded else "cosine"
            if budget is not None and budget < 1.0:
                ax.axhline(1.0 - budget, color="#bc4c00", linestyle="--", linewidth=1,
                           label=f"budget: {what} >= {budget}")
            base = (profile.get("baseline") or {}).get("p50_ms")
            if base:
                ax.axvline(base, color="#57606a", linestyle=":", linewidth=1, label="fp32 ONNX Runtime baseline")
            ax.legend(loc="best", fontsize=8)
            ax.set_xlabel("p50 latency, ms (run-off where measured; lower is better)")
            ax.set_ylabel("1 - task metric vs fp32 (lower is better)")
            ax.set_title(f"profile {profile['profile']}: latency vs accuracy (★ = pick, x = over budget)")
            ax.grid(True, alpha=0.3, which="both")
            fig.tight_layout()
            buf = io.StringIO()
            fig.savefig(buf, format="svg", metadata={"Date": None})
        finally:
            plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prolog and doctype: the SVG is inlined into HTML


_COLUMNS = ("#", "configuration", "status", "size (vs fp32)", "p50 ms", "run-off ms", "throughput/s", "speedup", "GFLOP/s",
            "min cosine", "top-1 agree", "metric drop", "why")


def _table(profile: dict[str, Any]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in _COLUMNS)
    body = []
    for r in profile["candidates"]:
        status = r.get("status")
        if status == "measured":
            verdict = ('<span class="pass">within budget</span>' if r.get("passed")
                       else '<span class="fail">over budget</span>')
        elif status == "failed":
            verdict = '<span class="fail">failed</span>'
        else:
            verdict = '<span class="skip">not run</span>'
        src = r.get("source_size_bytes")
        rel = f" ({r['size_bytes'] / src:.0%})" if r.get("size_bytes") and src else ""
        thr = 1000.0 / r["p50_ms"] * profile.get("batch_size", 1) if r.get("p50_ms") else None
        top1 = r.get("top1_agreement")
        cells = [
            str(r.get("index", "")), ("★ " if r.get("picked") else "") + r["candidate"], None,
            _size(r.get("size_bytes")) + rel,
            _fmt(r.get("p50_ms"), ".3f"), _fmt(r.get("runoff_p50_ms"), ".3f"), _fmt(thr, ".1f"),
            _fmt(r.get("speedup"), ".2f") + (
                "x" if r.get("speedup") is not None else ""),
            _fmt(r.get("achieved_gflops"), ".1f"), _fmt(r.get("min_cosine"), ".4f"),
            _fmt(top1 * 100 if top1 is not None else None, ".1f") + ("%" if top1 is not None else ""),
            _fmt(r.get("metric_drop"), ".2f"), None,
        ]
        tds = []
        for i, c in enumerate(cells):
            if i == 2:
                tds.append(f"<td>{verdict}</td>")
            elif i == len(cells) - 1:
                tds.append(f'<td class="reason">{html.escape(r.get("reason") or "")}</td>')
            else:
                tds.append(f"<td>{html.escape(c)}</td>")
        cls = ' class="picked"' if r.get("picked") else ""
        body.append(f"<tr{cls}>{''.join(tds)}</tr>")
    return (f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            "</div>")


def _section(profile: dict[str, Any]) -> str:
    parts = [f"<section id=\"profile-{html.escape(profile['profile'])}\">",
             f"<h2>Profile <code>{html.escape(profile['profile'])}</code> "
             f"<span class=\"meta\">({html.escape(profile['target_device'])}, batch {profile['batch_size']})</span></h2>"]
    if profile.get("proxy_note"):
        parts.append(f"<p class=\"proxy\"><strong>Host-CPU proxy.</strong> {html.escape(profile['proxy_note'])}</p>")
    budget = profile.get("budget", {})
    parts.append(f"<p class=\"meta\">Accuracy budget: min cosine ≥ {budget.get('min_cosine')}, top-1 agreement ≥ "
                 f"{budget.get('min_top1_agreement')}, metric drop ≤ {budget.get('max_metric_drop')} points. "
                 f"fp32 ONNX Runtime baseline p50: {_fmt((profile.get('baseline') or {}).get('p50_ms'), '.3f')} ms.</p>")
    if profile.get("pick"):
        parts.append(f"<p>Pick: <strong>{html.escape(profile['pick'])}</strong></p>")
    for note in profile.get("notes", []):
        parts.append(f"<p class=\"nopick\">{html.escape(note)}</p>")
    if any(r.get("status") == "measured" for r in profile["candidates"]):
        parts.append(f"<div class=\"chart\">{scatter_svg(profile)}</div>")
    parts.append(_table(profile))
    parts.append("</section>")
    return "\n".join(parts)


def render_html(doc: dict[str, Any]) -> str:
    """The HTML page for a compare document (``CompareReport.to_dict()``)."""
    from .. import sdk

    flops = doc.get("flops") or {}
    peak = doc.get("peak") or {}
    facts = [("model", doc["model"]), ("measured", doc.get("created_at", "")),
             ("machine", " ".join(str(v) for v in (doc.get("machine") or {}).values() if v))]
    if flops.get("gflops"):
        facts.append(("model compute", f"{flops['gflops']:.3f} GFLOP per sample (2 x MACs of Conv/Gemm/MatMul)"))
    if peak:
        facts.append(("measured peak", f"fp32 {peak['fp32_gops_1t']:.0f} / int8 {peak['int8_gops_1t']:.0f} GOP/s "
                                       f"per core; {peak['fp32_gops_all']:.0f} / {peak['int8_gops_all']:.0f} GOP/s "
                                       f"on {peak['threads_all']} threads ({peak['runtime']} GEMM)"))
    facts_html = "\n".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in facts)
    template = string.Template(TEMPLATE.read_text(encoding="utf-8"))
    profiles = ", ".join(p["profile"] for p in doc["profiles"])
    return template.substitute(
        version=html.escape(getattr(sdk, "__version__", "")),
        title=html.escape(f"edgeopt compare: {Path(doc['model']).name}"),
        subtitle=html.escape(f"profiles: {profiles}"), facts=facts_html,
        sections="\n".join(_section(p) for p in doc["profiles"]),
        noise=html.escape(f"{doc.get('noise', 0):.0%}"),
    )


def write_html(doc: dict[str, Any], path: str | Path) -> Path:
    """Write the report atomically (a temporary file renamed into place: no half-written report)."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise InputError(f"--html {path}: is a directory", hint="give a file name such as report.html")
    if not path.parent.exists():
        raise InputError(f"--html {path}: folder {path.parent} does not exist", hint="create it first")
    text = render_html(doc)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report is meant to be opened and shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("wrote compare report %s (%d bytes)", path, len(text))
    return path
