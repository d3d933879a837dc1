"""The device and fleet pages show the text-generation charts (issue 14) for language models only: the
server-rendered chart elements (the browser draws them: test_browser_charts.py)."""
from __future__ import annotations

from dashboard_web_fixtures import app, client, login, trusted_keys  # noqa: F401
from test_text_generation import llm_app  # noqa: F401


def test_pages_show_text_charts_only_for_text_models(client, llm_app):
    login(client, "viewer")
    page = client.get("/devices/llm-0").get_data(as_text=True)
    for chart in ("ttft-chart-1", "tpot-chart-1", "tokens-chart-1", "kv-chart-1"):
        assert f'id="{chart}"' in page
    assert "Time to first token: chat" in page and "model=chat" in page
    assert "ttft-chart" not in client.get("/devices/cnn-0").get_data(as_text=True)
    fleet = client.get("/fleet").get_data(as_text=True)
    assert 'id="fleet-ttft-1"' in fleet and 'id="fleet-tokens-1"' in fleet and "ttft_p95" in fleet
