"""A language-model package served by the real agent (issue 14): SmolLM2-135M-Instruct packaged at int8 by the
CLI, installed by `edgeopt agent install` (verify, load, golden-prompt self-test, switch), served by the daemon
(`python -m edgeopt.agent.daemon`) with a Mosquitto broker of its own.

Streaming chat through the `openai` client library, plain completions with stop sequences, the KServe generate
and generate_stream endpoints, a client that disconnects mid-stream (its generation is cancelled), a prompt
longer than the context, malformed requests, the bounded queue answering busy, and the TTFT / tokens / KV
figures in the telemetry that reaches the broker.
"""
from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest

from agent_support import Broker, Subscriber, free_port, package_as_version, wait_for
from edgeopt.agent.config import render_config

pytestmark = pytest.mark.slow

MAX_QUEUE = 3


def _metric(url: str, name: str) -> float:
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    m = re.search(rf'^{name}{{model="slm"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else float("nan")


def _post(url: str, path: str, doc, raw: bytes | None = None) -> tuple[int, dict, bytes]:
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", path, body=raw if raw is not None else json.dumps(doc).encode(),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), body


@pytest.fixture(scope="module")
def served(slm_int8_package, keypair, tmp_path_factory):
    d = tmp_path_factory.mktemp("llm-agent")
    broker = Broker(d / "broker").start()
    port = free_port()
    cfg = d / "agent.toml"
    cfg.write_text(render_config(device_id="slm-1", fleet="itest", broker=broker.url, state_dir=d / "state",
                                 trusted_keys=[keypair[1]], api_port=port, telemetry_interval_s=0.5)
                   + f"\n[text_generation]\nmax_queue = {MAX_QUEUE}\nmax_running = 4\n")
    install = subprocess.run([sys.executable, "-m", "edgeopt.sdk.cli", "agent", "install", str(slm_int8_package[0]),
                              "--config", str(cfg), "--json"], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    sub = Subscriber("127.0.0.1", broker.port, "itest", "slm-1")
    log = open(d / "daemon.log", "w")
    daemon = subprocess.Popen([sys.executable, "-m", "edgeopt.agent.daemon", "--config", str(cfg)], stdout=log,
                              stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready():
        assert daemon.poll() is None, (d / "daemon.log").read_text()[-2000:]
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v2/models/slm/ready")
            return conn.getresponse().status == 200
        except OSError:
            return False

    wait_for(ready, 180, 0.2, "the daemon to serve slm")
    try:
        yield {"url": url, "install": json.loads(install.stdout), "sub": sub, "log": d / "daemon.log", "config": cfg}
    finally:
        daemon.terminate()
        daemon.wait(30)
        log.close()
        sub.close()
        broker.stop()


def test_install_replays_the_golden_prompts(served):
    events = {e["event"]: e for e in served["install"]["events"]}
    assert events["self_test"]["ok"] and events["self_test"]["details"]["samples"] == 3
    assert events["self_test"]["details"]["min_prefix_agreement"] >= 0.5
    assert served["install"]["installed"]["runtime"] == "openvino-genai"


def test_streaming_chat_through_the_openai_client(served):
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["slm"]
    stream = client.chat.completions.create(
        model="slm", messages=[{"role": "user", "content": "What is the capital of France?"}], stream=True,
        max_tokens=32, stream_options={"include_usage": True})
    deltas, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.choices:
            deltas.append(chunk.choices[0].delta.content or "")
            reasons.append(chunk.choices[0].finish_reason)
        else:
            usage = chunk.usage
    text = "".join(deltas)
    assert "Paris" in text and len(deltas) >= 4  # streamed token by token, not one block
    assert reasons[-1] in ("stop", "length") and all(r is None for r in reasons[:-1])
    assert usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 32


def test_completion_with_a_stop_sequence_and_a_non_streamed_chat(served):
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model="slm", prompt="The capital of France is", max_tokens=24, stop=["."])
    assert "Paris" in r.choices[0].text and "." not in r.choices[0].text and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="slm", max_tokens=8, messages=[
        {"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}])
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 8


def test_kserve_generate_and_generate_stream(served):
    status, _, body = _post(served["url"], "/v2/models/slm/generate",
                            {"text_input": "The capital of France is", "parameters": {"max_tokens": 8}})
    doc = json.loads(body)
    assert status == 200 and doc["model_name"] == "slm" and doc["model_version"] and "Paris" in doc["text_output"]
    status, headers, body = _post(served["url"], "/v2/models/slm/generate_stream",
                                  {"text_input": "The capital of France is", "parameters": {"max_tokens": 8}})
    events = [json.loads(line[6:]) for line in body.decode().split("\n\n") if line.startswith("data: ")]
    assert status == 200 and headers["Content-Type"] == "text/event-stream" and len(events) >= 3
    assert "".join(e["text_output"] for e in events) == doc["text_output"]  # greedy: the same text, streamed
    assert events[-1]["finish_reason"] == "length"


def test_a_client_that_goes_away_cancels_its_generation(served):
    url = served["url"]
    before = _metric(url, "edgeopt_text_cancelled_total")
    generated = _metric(url, "edgeopt_text_generated_tokens_total")
    body = json.dumps({"model": "slm", "prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True,
                       "stream": True}).encode()
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        got = b""
        while got.count(b"data: ") < 5:
            got += s.recv(65536)
        assert got.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in got
    wait_for(lambda: _metric(url, "edgeopt_text_cancelled_total") == before + 1, 30, what="the cancellation")
    wait_for(lambda: _metric(url, "edgeopt_text_requests_running") == 0, 30, what="the engine to be idle")
    time.sleep(0.5)
    # stopped within a few steps of the disconnect, far from the 4000 tokens asked for
    assert _metric(url, "edgeopt_text_generated_tokens_total") - generated < 500


def test_a_prompt_longer_than_the_context_and_malformed_requests(served):
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="context is 8192 tokens"):
        client.completions.create(model="slm", prompt="word " * 9000, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="plus max_tokens"):
        client.completions.create(model="slm", prompt="Hello there, how are you", max_tokens=8190)
    with pytest.raises(openai.NotFoundError, match="not a text-generation model served here"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    url = served["url"]
    cases = [
        (b"{not json", "JSON"),
        (json.dumps({"model": "slm", "messages": "hi"}).encode(), "non-empty list"),
        (json.dumps({"model": "slm", "messages": [{"role": "robot", "content": "x"}]}).encode(), "role"),
        (json.dumps({"model": "slm", "messages": [{"role": "user", "content": "x"}], "n": 2}).encode(), "'n'"),
        (json.dumps({"model": "slm", "messages": [{"role": "user", "content": "x"}],
                     "stop": ["a"] * 20}).encode(), "'stop'"),
        (json.dumps({"model": "slm", "messages": [{"role": "user", "content": "x"}],
                     "max_tokens": -1}).encode(), "'max_tokens'"),
        (b"[" * 100_000, "deeper"),
    ]
    for raw, needle in cases:
        status, _, body = _post(url, "/v1/chat/completions", None, raw=raw)
        err = json.loads(body)["error"]
        assert status == 400 and needle in err["message"] and "\n" not in err["message"], (raw[:40], err)
    status, _, body = _post(url, "/v2/models/slm/generate", {"text_input": 5})
    assert status == 400 and "text_input" in json.loads(body)["error"]
    status, _, body = _post(url, "/v2/models/slm/infer", {"inputs": []})
    assert status == 400
    # the agent still serves after all of them
    status, _, body = _post(url, "/v2/models/slm/generate", {"text_input": "Hi", "parameters": {"max_tokens": 2}})
    assert status == 200


def test_the_queue_is_bounded_and_answers_busy(served):
    url = served["url"]
    host, port = url.split("//")[1].split(":")
    socks = []
    body = json.dumps({"model": "slm", "prompt": "Count:", "max_tokens": 3000, "ignore_eos": True,
                       "stream": True}).encode()
    try:
        for _ in range(MAX_QUEUE):
            s = socket.create_connection((host, int(port)), timeout=30)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            socks.append(s)
        status, headers, body = _post(url, "/v1/completions", {"model": "slm", "prompt": "Hi", "max_tokens": 2})
        assert status == 503 and headers.get("Retry-After") == "1"
        assert "busy" in json.loads(body)["error"]["message"]
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: _post(url, "/v1/completions", {"model": "slm", "prompt": "Hi", "max_tokens": 2})[0] == 200,
             60, 0.2, "room in the queue again")


def test_telemetry_carries_ttft_tokens_and_kv_cache(served):
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(model="slm", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)

    def text_figures():
        for p in served["sub"].of("telemetry"):
            for m in p.models:
                if m.model == "slm" and m.text is not None and m.text.generated_tokens > 0 and m.text.ttft.keys:
                    return m
        return None

    m = wait_for(text_figures, 30, what="telemetry with text figures")
    t = m.text
    assert t.ttft_p50_ms > 0 and t.tokens_per_s > 0 and t.prompt_tokens > 0
    assert t.kv_cache_peak is not None and 0 < t.kv_cache_peak <= 1
    assert m.requests >= 1 and m.latency.keys  # whole-request latency in the usual histogram too


def test_an_update_is_hot_swapped_and_rolled_back_like_any_package(served, slm_int8_package, keypair, tmp_path):
    """`edgeopt agent install` of 1.1.0 from another process while the daemon serves (it swaps, a stream in
    flight on 1.0.0 finishes), then `edgeopt agent rollback`: the daemon serves 1.0.0 again."""
    url, cfg = served["url"], served["config"]
    newer = package_as_version(slm_int8_package[0], tmp_path / "slm-1.1.0.eopkg", "1.1.0", keypair[0])
    models = lambda: json.loads(  # noqa: E731
        subprocess.run(["curl", "-s", url + "/v1/models"], capture_output=True, text=True).stdout)["data"][0]
    assert models()["version"] == "1.0.0"
    long = {}

    def stream_on_old():
        long["r"] = _post(url, "/v2/models/slm/generate_stream",
                          {"text_input": "Once", "parameters": {"max_tokens": 300, "ignore_eos": True}})

    t = threading.Thread(target=stream_on_old)
    t.start()
    cli = [sys.executable, "-m", "edgeopt.sdk.cli", "agent"]
    done = subprocess.run(cli + ["install", str(newer), "--config", str(cfg)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    wait_for(lambda: models()["version"] == "1.1.0", 60, 0.5, "the daemon to serve 1.1.0")
    t.join(120)
    status, _, body = long["r"]
    events = [json.loads(x[6:]) for x in body.decode().split("\n\n") if x.startswith("data: ")]
    assert status == 200 and events[-1]["finish_reason"] == "length" and events[-1]["model_version"] == "1.0.0"
    done = subprocess.run(cli + ["rollback", "slm", "--config", str(cfg), "--json"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    wait_for(lambda: models()["version"] == "1.0.0", 60, 0.5, "the daemon to serve 1.0.0 again")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="slm", max_tokens=12,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content
