"""The stateful pipeline (what an NPU runs: OpenVINO GenAI's LLMPipeline, one request at a time) behind the same
engine and API, on this CPU with [text_generation] pipeline = "stateful" (no NPU here: the package's NPU settings
are the SDK's, tests/sdk/test_llm_profiles.py). Streams, a queued second request, cancellation, the same greedy
answers as the continuous-batching pipeline."""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import openai
import pytest

from edgeopt.agent.config import TextGenerationConfig
from edgeopt.agent.loader import load_options, self_test, warm_up
from edgeopt.agent.registry import ModelRegistry
from edgeopt.agent.runtimes import get_runtime
from edgeopt.agent.server import InferenceServer
from edgeopt.sdk.package import PackageReader

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stateful(slm_int8_package, tmp_path_factory):
    d = tmp_path_factory.mktemp("stateful")
    with PackageReader(slm_int8_package[0]) as reader:
        reader.extract_to(d / "pkg")
        m = reader.manifest
    kw = load_options(m, d / "cache")
    kw["options"]["serving"] = TextGenerationConfig(pipeline="stateful").model_dump()
    loaded = get_runtime(m.runtime).load(Path(d / "pkg") / m.model_file, **kw)
    warm_up(loaded, package_dir=d / "pkg", manifest=m)
    report = self_test(loaded, d / "pkg", m)
    reg = ModelRegistry()
    reg.swap(m.name, m.version, loaded, m)
    server = InferenceServer(reg, port=0).start()
    yield server, loaded, report
    server.stop()
    reg.close()


def test_golden_prompts_and_the_pipeline_it_runs(stateful):
    _, loaded, report = stateful
    assert report["samples"] == 3 and report["min_prefix_agreement"] == 1.0
    assert loaded.describe()["pipeline"] == "stateful" and loaded.engine.max_running == 1


def test_two_streams_are_served_one_after_the_other(stateful):
    server, loaded, _ = stateful
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    out = {}

    def ask(key, prompt):
        t0 = time.perf_counter()
        chunks = list(client.completions.create(model="slm", prompt=prompt, max_tokens=40, stream=True,
                                                extra_body={"ignore_eos": True}))
        out[key] = ("".join(c.choices[0].text for c in chunks if c.choices), time.perf_counter() - t0)

    threads = [threading.Thread(target=ask, args=(k, p)) for k, p in (("a", "The sea is"), ("b", "Paris is"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(out["a"][0]) > 40 and len(out["b"][0]) > 40
    stats = loaded.text_metrics
    assert stats.total_generated >= 80


def test_a_disconnect_cancels_the_running_generation_and_the_next_one_runs(stateful):
    server, loaded, _ = stateful
    host, port = server.address
    before = loaded.text_metrics.total_cancelled
    body = json.dumps({"model": "slm", "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True,
                       "stream": True}).encode()
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        got = b""
        while got.count(b"data: ") < 3:
            got += s.recv(65536)
    deadline = time.monotonic() + 30
    while loaded.text_metrics.total_cancelled == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loaded.text_metrics.total_cancelled == before + 1
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="slm", max_tokens=12,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content and loaded.engine.healthy
