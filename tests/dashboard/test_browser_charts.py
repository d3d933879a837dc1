"""The uPlot charts in a real browser (headless Chromium): a 24 h device chart answers hover with every
series' value, the cursor is shared with the page's other charts, a drag zooms in and "Reset zoom" goes
back, the log scale redraws, a version switch is marked, and screen readers get a summary and a table.
Screenshots go to test-artifacts/."""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pytest

from dashboard_web_fixtures import PASSWORD, app, db, ingest, trusted_keys  # noqa: F401
from test_browser import browser, server, shot, wait_until  # noqa: F401

pytestmark = pytest.mark.browser


def _seed_day(app) -> datetime:
    """Two devices with 24 h of telemetry every 5 minutes, rolled up, and a version switch 6 h ago; day-0 also
    serves the language model 'chat' (text-generation figures, issue 14)."""
    from edgeopt.dashboard.rollup import run_rollup
    from edgeopt.dashboard.simulate import SimDevice, minute_series
    from edgeopt.sdk.telemetry import EventPayload

    engine = app.extensions["edgeopt_engine"]
    now = datetime.now(timezone.utc).replace(microsecond=0)
    start = now - timedelta(hours=24)
    devices = [SimDevice(f"day-{i}", models=("digits", "chat") if i == 0 else ("digits",), median_ms=4.0 * (i + 1),
                         seed=i, stateful=("digits",) if i == 0 else (), text=("chat",) if i == 0 else ())
               for i in range(2)]
    ingest(engine, [(d.topic("status"), d.status("online", ts=start - timedelta(seconds=1)).to_json())
                    for d in devices], start)
    series = minute_series(devices, start, 24 * 60, interval_s=300.0, requests=40)
    ingest(engine, [(t, p) for t, p, _ in series], now)
    d = devices[0]
    switch = EventPayload(device_id=d.device_id, session_id=d.session_id, seq=d.next_seq(),
                          ts=now - timedelta(hours=6), event="switch", model="digits", version="2.0.0",
                          from_version="1.0.0")
    ingest(engine, [(d.topic("events"), switch.to_json())], now)
    run_rollup(engine, now + timedelta(minutes=2))
    return now


def _box(page, selector: str) -> dict:
    box = page.locator(selector).bounding_box()
    assert box, f"{selector} is not on the page"
    return box


def test_24h_chart_hover_zoom_log_markers_and_table(app, server, browser, db_backend):
    _seed_day(app)
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(server + "/login")
    page.fill("#username", "viewer")
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.goto(server + "/devices/day-0")
    page.wait_for_selector("#latency-chart[data-state=ready]")
    page.wait_for_selector("#throughput-chart[data-state=ready]")
    chart = page.locator("#latency-chart")
    assert chart.locator("canvas").count() == 1
    assert int(chart.get_attribute("data-points")) >= 3 * 250  # 24 h of 3-minute points, three series

    # Screen readers: a summary naming every series, and the data as a table (one row per point).
    label = chart.get_attribute("aria-label")
    assert label.startswith("Latency") and all(f"{s}: min " in label for s in ("p50", "p95", "p99")), label
    rows = chart.locator("details.chart-data tbody tr").count()
    assert rows * 3 == int(chart.get_attribute("data-points"))

    # The chart's data as CSV, from the link on the chart.
    href = chart.locator("a.csv-export").get_attribute("href")
    assert "format=csv" in href and "range=24h" in href
    resp = page.request.get(server + href)
    assert resp.ok and resp.headers["content-type"].startswith("text/csv")
    assert resp.text().splitlines()[0].startswith("t,p50,p95,p99,requests")

    # Live sequences of the stateful model (issue 16): charted like the other series.
    page.wait_for_selector("#sequences-chart[data-state=ready]")
    assert int(page.locator("#sequences-chart").get_attribute("data-points")) >= 250
    assert len(resp.text().splitlines()) == rows + 1

    # The version switch 6 h ago is marked on the latency chart.
    assert chart.get_attribute("data-markers") == "1"

    # The language model's charts (issue 14): TTFT p50/p95 from the merged sketches, time per output token,
    # generated tokens/s and KV cache use, each drawn from the 'chat' series; none for a model without text.
    assert page.locator(".card.text-model[data-model=chat]").count() == 4
    for sel in ("#ttft-chart-1", "#tpot-chart-1", "#tokens-chart-1", "#kv-chart-1"):
        page.wait_for_selector(f"{sel}[data-state=ready]")
        assert page.locator(f"{sel} canvas").count() == 1, sel
    ttft = page.locator("#ttft-chart-1")
    assert int(ttft.get_attribute("data-points")) >= 2 * 250  # p50 and p95, 24 h of 3-minute points
    label = ttft.get_attribute("aria-label")
    assert label.startswith("Time to first token: chat") and all(f"{s}: min " in label for s in ("p50", "p95")), label
    assert int(page.locator("#kv-chart-1").get_attribute("data-points")) >= 2 * 250
    assert "%" in page.locator("#kv-chart-1").get_attribute("aria-label")  # shares drawn as percentages
    ttft_csv = page.request.get(server + ttft.locator("a.csv-export").get_attribute("href"))
    assert ttft_csv.ok and "model=chat" in ttft.locator("a.csv-export").get_attribute("href")
    assert "ttft_p95" in ttft_csv.text().splitlines()[0].split(",")

    # Hover in the middle of the plot: the legend reads out p50, p95 and p99 in ms at that time...
    over = _box(page, "#latency-chart .u-over")
    page.mouse.move(over["x"] + over["width"] * 0.5, over["y"] + over["height"] * 0.5)
    wait_until(lambda: re.search(r"p95\s*[\d.]+ ms", chart.get_attribute("data-readout") or ""), what="hover readout")
    readout = chart.get_attribute("data-readout")
    assert all(re.search(rf"{s}\s*[\d.]+ ms", readout) for s in ("p50", "p95", "p99")), readout
    # ... and the throughput chart's cursor follows (shared cursor), with its own value.
    wait_until(lambda: re.search(r"inferences/s\s*[\d.]+", page.get_attribute("#throughput-chart", "data-readout") or ""),
               what="the shared cursor on the throughput chart")
    # ... and so does the language model's TTFT chart, in ms
    wait_until(lambda: re.search(r"p95\s*[\d.]+ ms", page.get_attribute("#ttft-chart-1", "data-readout") or ""),
               what="the shared cursor on the TTFT chart")
    shot(page, f"chart-24h-hover-{db_backend}")

    # Drag from 30% to 60% of the width: the visible range shrinks to about that; reset restores it.
    x_min, x_max = int(chart.get_attribute("data-x-min")), int(chart.get_attribute("data-x-max"))
    assert 23 * 3600 <= x_max - x_min <= 25 * 3600
    y = over["y"] + over["height"] * 0.5
    page.mouse.move(over["x"] + over["width"] * 0.3, y)
    page.mouse.down()
    page.mouse.move(over["x"] + over["width"] * 0.45, y, steps=5)
    page.mouse.move(over["x"] + over["width"] * 0.6, y, steps=5)
    page.mouse.up()
    wait_until(lambda: chart.get_attribute("data-zoomed") == "true", what="zoom")
    z_min, z_max = int(chart.get_attribute("data-x-min")), int(chart.get_attribute("data-x-max"))
    assert x_min < z_min < z_max < x_max
    assert (z_max - z_min) == pytest.approx(0.3 * (x_max - x_min), rel=0.1)
    shot(page, f"chart-24h-zoomed-{db_backend}")
    chart.locator("button.reset-zoom").click()
    wait_until(lambda: chart.get_attribute("data-zoomed") == "false", what="reset zoom")
    assert (int(chart.get_attribute("data-x-min")), int(chart.get_attribute("data-x-max"))) == (x_min, x_max)

    # Log scale: the latency chart redraws on a logarithmic axis.
    chart.locator(".log-toggle input").check()
    wait_until(lambda: chart.get_attribute("data-log") == "true", what="log scale")
    assert chart.locator("canvas").count() == 1
    shot(page, f"chart-24h-log-{db_backend}")

    # The fleet page: fleet-wide TTFT (every device's sketches merged) and tokens/s of the language model.
    page.goto(server + "/fleet")
    for sel in ("#fleet-ttft-1", "#fleet-tokens-1"):
        page.wait_for_selector(f"{sel}[data-state=ready]")
        assert int(page.locator(sel).get_attribute("data-points")) >= 200, sel
    assert page.locator("#fleet-ttft-1").get_attribute("aria-label").startswith("Time to first token: chat (fleet)")
    shot(page, f"fleet-text-{db_backend}")
    assert problems == [], problems
