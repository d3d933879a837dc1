"""The HTML report of a per-layer profile: a top-layers bar chart and a roofline-style plot (achieved GOP/s
against arithmetic intensity, the machine's measured peaks drawn as ceilings), plus the layer table.

One self-contained file with inline SVG: no script, no CDN (reports are opened on offline machines).
"""
from __future__ import annotations

import html
import math
from typing import Any

from .layers import fmt_flops, roofline_points, top_layers

_COLOURS = {"int8": "#2a7ab0", "fp32": "#d0743c", "bf16": "#b03a7a", "fp16": "#5a9e3a"}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def bar_chart(profile: dict[str, Any], n: int = 15, width: int = 760) -> str:
    """SVG bars of the ``n`` slowest layers, coloured by executed precision."""
    rows = top_layers(profile, n)
    if not rows:
        return "<p>No layer times.</p>"
    longest = max(float(r["median_us"]) for r in rows) or 1.0
    label_w, bar_h = 300, 18
    height = bar_h * len(rows) + 10
    parts = [f'<svg class="bars" width="{width}" height="{height}" role="img" aria-label="top layers">']
    for i, r in enumerate(rows):
        y = i * bar_h + 4
        w = max(1.0, (width - label_w - 90) * float(r["median_us"]) / longest)
        colour = _COLOURS.get(r["precision"], "#888")
        parts.append(f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end">{_e(r["name"][:44])}</text>'
                     f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h - 4}" fill="{colour}">'
                     f'<title>{_e(r["name"])}: {r["median_us"]:.1f} µs, {_e(r["precision"])}</title></rect>'
                     f'<text x="{label_w + w + 4:.1f}" y="{y + 12}">{r["median_us"]:.1f} µs '
                     f'{_e(r["precision"])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def roofline(profile: dict[str, Any], width: int = 760, height: int = 380) -> str:
    """Log-log SVG: x arithmetic intensity (FLOP/byte), y achieved GOP/s; peaks as horizontal ceilings."""
    points = roofline_points(profile)
    peak = profile.get("peak") or {}
    # The all-thread peaks only: the one-thread ones sit close below them and their labels would overlap.
    ceilings = [(f"{k.split('_')[0]} peak (all threads)", float(v))
                for k, v in peak.items() if k.endswith("_gops_all") and v]
    if not points:
        return "<p>No layer with both FLOPs and a byte count to plot.</p>"
    xs = [p["intensity"] for p in points]
    ys = [p["gops"] for p in points] + [v for _, v in ceilings]
    x0, x1 = math.log10(min(xs) / 2), math.log10(max(xs) * 2)
    y0, y1 = math.log10(max(min(ys) / 2, 1e-3)), math.log10(max(ys) * 2)
    m = 50

    def px(x: float) -> float:
        return m + (math.log10(x) - x0) / (x1 - x0 or 1) * (width - 2 * m)

    def py(y: float) -> float:
        return height - m - (math.log10(max(y, 1e-3)) - y0) / (y1 - y0 or 1) * (height - 2 * m)

    parts = [f'<svg class="roofline" width="{width}" height="{height}" role="img" aria-label="roofline">',
             f'<rect x="{m}" y="{m}" width="{width - 2 * m}" height="{height - 2 * m}" fill="none" stroke="#999"/>',
             f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">arithmetic intensity (FLOP/byte, log)'
             f'</text><text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">'
             f'achieved GOP/s (log)</text>']
    for exp in range(math.floor(x0), math.ceil(x1) + 1):
        if x0 <= exp <= x1:
            parts.append(f'<text x="{px(10 ** exp):.1f}" y="{height - m + 14}" text-anchor="middle">{10 ** exp:g}</text>')
    for exp in range(math.floor(y0), math.ceil(y1) + 1):
        if y0 <= exp <= y1:
            parts.append(f'<text x="{m - 4}" y="{py(10 ** exp) + 4:.1f}" text-anchor="end">{10 ** exp:g}</text>')
    for label, value in ceilings:
        y = py(value)
        parts.append(f'<line x1="{m}" x2="{width - m}" y1="{y:.1f}" y2="{y:.1f}" stroke="#c33" stroke-dasharray="4 3"/>'
                     f'<text x="{width - m - 4}" y="{y - 3:.1f}" text-anchor="end" fill="#c33">{_e(label)} '
                     f'{value:.0f}</text>')
    for p in points:
        parts.append(f'<circle cx="{px(p["intensity"]):.1f}" cy="{py(p["gops"]):.1f}" r="4" '
                     f'fill="{_COLOURS.get(p["precision"], "#888")}"><title>{_e(p["name"])}: {p["gops"]:.1f} GOP/s, '
                     f'{p["intensity"]:.1f} FLOP/byte, {_e(p["precision"])}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def layer_table(profile: dict[str, Any], n: int = 100) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("layer", "op type", "ran in", "median µs", "share", "FLOPs", "GOP/s",
                                             "source nodes"))
    body = "".join(
        f"<tr><td>{_e(r['name'])}</td><td>{_e(r['op_type'])}</td><td>{_e(r['precision'])}</td>"
        f"<td>{r['median_us']:.1f}</td><td>{r['share']:.1%}</td><td>{fmt_flops(r['flops'])}</td>"
        f"<td>{r['gops'] if r['gops'] else '-'}</td><td>{_e(', '.join(r['source_nodes'][:4]))}</td></tr>"
        for r in top_layers(profile, n))
    return f'<table class="layers"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def render(profile: dict[str, Any]) -> str:
    """The whole report as one HTML document."""
    m = profile.get("model") or {}
    title = f"{m.get('name', 'model')} {m.get('version', '')}: per-layer profile"
    comparison = ""
    if "against" in profile:
        c = profile["against"]["comparison"]
        speed = f" ({c['speedup']:.2f}x)" if c["speedup"] else ""
        items = "".join(f"<li>{_e(label)} ({len(c[key])}): {_e(', '.join(c[key][:12]))}</li>"
                        for label, key in (("faster", "faster"), ("slower", "slower"),
                                           ("stayed in float", "stayed_float"),
                                           ("precision changed", "precision_changed"),
                                           ("ran in another precision than its package", "silent_precision"))
                        if c[key])
        comparison = (f"<h2>Against {_e(profile['against']['model'].get('name'))} "
                      f"{_e(profile['against']['model'].get('precision'))}</h2><p>layer sum "
                      f"{c['baseline_total_ms']:.3f} ms → {c['total_ms']:.3f} ms"
                      f"{speed}"
                      f"</p><ul>{items}</ul>")
    silent = (f"<p><strong>Precision differs from the package</strong>: "
              f"{_e(', '.join(profile['silent_precision'][:20]))}</p>" if profile.get("silent_precision") else "")
    notes = "".join(f"<li>{_e(n)}</li>" for n in profile.get("notes") or [])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:24px;color:#222}}svg text{{font:11px system-ui,sans-serif}}
table{{border-collapse:collapse}}td,th{{border-bottom:1px solid #ddd;padding:2px 8px;text-align:left}}</style>
</head><body><h1>{_e(title)}</h1>
<p>{_e(profile.get('runtime'))} {_e(profile.get('runtime_version'))} on {_e(profile.get('device'))};
package precision {_e(m.get('precision'))}; {profile.get('runs')} runs; sum of layer medians
{profile.get('layer_sum_ms')} ms, whole-model median without the profiler {profile.get('latency_ms')} ms.</p>
<p>Compute layers by executed precision (µs): {_e(profile.get('compute_precisions'))}</p>
{silent}<h2>Top layers</h2>{bar_chart(profile)}
<h2>Roofline</h2>{roofline(profile)}
{comparison}
<h2>Layers</h2>{layer_table(profile)}
<h2>Notes</h2><ul>{notes}</ul><p>{_e(m.get('where', ''))}</p>
</body></html>
"""
