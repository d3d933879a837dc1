"""A real browser (Debian's headless Chromium driven by Playwright, no browser download) against the
real app served by werkzeug on a free port: log in, fleet page, a device's latency chart drawn from
the JSON API, package upload, a deployment started and followed live. Screenshots go to test-artifacts/."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from dashboard_web_fixtures import (PASSWORD, ROOT, app, db, make_package, seed_fleet, trusted_keys)  # noqa: F401
from test_deployments import Subscriber, agent_result, tick

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture
def server(app, mqtt_broker):
    from werkzeug.serving import make_server

    app.config["BROKER_URL"] = mqtt_broker.url
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    port = srv.server_port
    app.config["PUBLIC_URL"] = f"http://127.0.0.1:{port}"
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{port}"
    srv.shutdown()
    t.join(5)


@pytest.fixture
def browser(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (the browser tests need it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM, args=FLAGS,
                                                   headless=True, viewport={"width": 1280, "height": 900})
        yield ctx
        ctx.close()


def wait_until(cond, timeout: float = 15.0, what: str = "condition"):
    """Poll from Python: the app's CSP (script-src 'self') forbids Playwright's string predicates."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_login_fleet_device_chart_and_deployment(app, server, browser, mqtt_broker, tmp_path, trusted_keys, db_backend):
    seed_fleet(app, n=6, minutes=40)
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))

    page.goto(server + "/fleet")
    assert page.url.startswith(server + "/login")
    shot(page, f"login-{db_backend}")
    page.fill("#username", "operator")
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(server + "/fleet")
    assert page.inner_text("#count-devices") == "6"
    page.wait_for_selector("#fleet-latency[data-state=ready]")
    assert int(page.get_attribute("#fleet-latency", "data-points")) > 0
    assert page.locator("#fleet-latency canvas").count() == 1  # uPlot
    assert [t.strip().lower() for t in page.locator("#fleet-latency .u-legend th").all_inner_texts()][-3:] == ["p50", "p95", "p99"]
    shot(page, f"fleet-{db_backend}")

    page.click("#slowest a >> nth=0")
    page.wait_for_url(server + "/devices/edge-005")
    page.wait_for_selector("#latency-chart[data-state=ready]")
    chart = page.locator("#latency-chart")
    assert int(chart.get_attribute("data-points")) >= 3 * 5  # p50, p95, p99 points over 40 min at 3-min steps
    assert chart.locator("canvas").count() == 1 and chart.locator("details.chart-data tbody tr").count() >= 5
    page.wait_for_selector("#batch-chart[data-state=ready]")
    assert page.locator("#batch-chart rect.bar").count() == 2
    # Range selector: 1 h reads raw telemetry (every 30 s): more points.
    page.click(".range-picker button[data-range='1h']")
    wait_until(lambda: chart.get_attribute("data-state") == "ready"
               and int(chart.get_attribute("data-points") or 0) >= 3 * 60, what="the 1 h chart")
    page.wait_for_selector("#cpu-chart[data-state=ready]")
    shot(page, f"device-{db_backend}")

    page.goto(server + "/devices?status=online&sort=p95&order=desc")
    assert page.locator("#device-table tbody tr").count() == 6
    assert page.inner_text("#device-table tbody tr:first-child td:first-child") == "edge-005"
    shot(page, f"devices-{db_backend}")

    pkg = make_package(tmp_path / "digits-2.0.0.eopkg", trusted_keys["key"], version="2.0.0")
    page.goto(server + "/packages")
    page.set_input_files("#file", str(pkg))
    page.click("form[enctype] button[type=submit]")
    page.wait_for_selector("text=digits 2.0.0 (cpu) uploaded: signature and hashes verified")
    shot(page, f"package-{db_backend}")

    sub = Subscriber(mqtt_broker.port)
    try:
        page.click("text=Deploy…")
        page.check("input[name=target_kind][value=group]")
        page.fill("#stage_percent", "50")
        page.click("#start-deployment")
        page.wait_for_selector("text=deployment started: stage 1 sent to 3 devices")
        msgs = sub.wait_for(3)
        assert len(msgs) == 3 and all(c.command == "deploy" for _, c in msgs)
        # The agents answer; the page, polling the API, shows it without a reload.
        from edgeopt.sdk import topics

        for t, c in msgs:
            agent_result(app, topics.parse(t).device_id, c, "succeeded", "switched to 2.0.0")
        tick(app)
        wait_until(lambda: page.inner_text("[data-count=succeeded]") == "3", what="live progress")
        assert page.inner_text("[data-field=stage]").startswith("stage 2 of 2")
        shot(page, f"deployment-{db_backend}")
    finally:
        sub.close()

    # Alert rules are edited on the alerts page by operators.
    page.goto(server + "/alerts")
    page.fill("#rule-name", "digits p95 SLO")
    page.select_option("#rule-kind", "p95_slo")
    page.fill("#rule-model", "digits")
    page.fill("#rule-ms", "50")
    page.click("form.filters button[type=submit]")
    page.wait_for_selector("text=rule 'digits p95 SLO' saved")
    # edge-003..005 (medians 54, 162, 486 ms) break a 50 ms p95 SLO.
    assert page.locator("#open-alerts tbody tr").count() == 3
    shot(page, f"alerts-{db_backend}")

    # Narrow screen: the layout folds into one column and stays readable.
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(server + "/devices/edge-001")
    page.wait_for_selector("#latency-chart[data-state=ready]")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot(page, f"device-mobile-{db_backend}")
    assert problems == [], problems
