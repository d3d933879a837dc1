"""The agent's language-model serving against the runtime's own generation loop, in one run (issue 14).

    python benchmarks/llm_agent.py --package slm-int8.eopkg [--public-key edgeopt.pub] \
        [--prompt-tokens 512] [--new-tokens 128] [--streams 1,8] [--rounds 3] [--json OUT.json]

"runtime": OpenVINO GenAI's ContinuousBatchingPipeline stepped by a bare loop (edgeopt.sdk.llm.bench._run:
S requests added at once, stepped until all finish): what the runtime gives with no server around it.
"agent": the same package loaded by the agent's runtime class and served by the agent's HTTP API; S clients
each POST /v1/completions with ``stream: true`` at once and read the server-sent events (time to first token
is the first text delta a client reads). Both generate exactly ``new_tokens`` tokens per request (ignore_eos),
greedy, from the same prompt token ids, with the same scheduler settings (prefix caching off: every prompt
differs anyway). Rounds interleave the two (one of each per stream count per round); figures are medians over
rounds; ratios are measured in the same run. Overhead = the median over rounds of runtime tokens/s / agent
tokens/s - 1, each round's pair measured back to back (goal <= 5%). The clients run in a process of their own
(their threads must not take the agent's GIL). Prefix caching: TTFT of a second prompt sharing the first one's
512-token prefix, agents with it on and off.

Memory per stream: the KV cache's peak use (the pipeline's own figure, a share of its allocated bytes)
divided by the streams, and the process's RSS growth over the run.
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _agent_round(url: str, prompts: list[str], new_tokens: int) -> dict:
    """One round of clients in a process of their own (their threads must not share the agent's GIL)."""
    import subprocess

    done = subprocess.run([sys.executable, __file__, "--client", url, "--new-tokens", str(new_tokens),
                           "--package", "-"], input=json.dumps(prompts), capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise RuntimeError(f"the client process failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def _clients(url: str, prompts: list[str], new_tokens: int) -> dict:
    host, port = url.split("//")[1].split(":")
    results: list[dict] = [None] * len(prompts)  # type: ignore[list-item]
    barrier = threading.Barrier(len(prompts) + 1)

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        body = json.dumps({"model": "slm", "prompt": prompts[i], "max_tokens": new_tokens, "ignore_eos": True,
                           "stream": True, "stream_options": {"include_usage": True}}).encode()
        barrier.wait()
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        stamps, tokens, buf = [], 0, b""
        while True:
            chunk = resp.read1(65536)
            if not chunk:
                break
            now = time.perf_counter()
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if not event.startswith(b"data: ") or event == b"data: [DONE]":
                    continue
                # parsed only where needed: the clients share this host's two cores with the agent
                if b'"usage"' in event:
                    tokens = json.loads(event[6:])["usage"]["completion_tokens"]
                elif b'"text":"' in event and b'"text":""' not in event:
                    stamps.append(now)
        conn.close()
        results[i] = {"t0": t0, "stamps": stamps, "tokens": tokens, "end": time.perf_counter()}

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in results) - start
    first = [r["stamps"][0] - r["t0"] for r in results if r["stamps"]]
    gaps = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    return {"wall_s": wall, "tokens": sum(r["tokens"] for r in results),
            "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_ms": statistics.median(first) * 1e3, "tpot_ms": statistics.median(gaps) * 1e3,
            "tpot_p95_ms": float(np.percentile(gaps, 95)) * 1e3}


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", required=True)
    ap.add_argument("--public-key")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--client", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        print(json.dumps(_clients(args.client, json.loads(sys.stdin.read()), args.new_tokens)))
        return 0
    streams = [int(s) for s in args.streams.split(",")]

    import openvino_genai as genai

    from edgeopt.agent.loader import load_options
    from edgeopt.agent.registry import ModelRegistry
    from edgeopt.agent.runtimes import get_runtime
    from edgeopt.agent.server import InferenceServer
    from edgeopt.sdk.llm.bench import _prompts, _run
    from edgeopt.sdk.pipeline.hostbench import verified_extract

    tmp = Path(tempfile.mkdtemp(prefix="edgeopt-llm-agent-"))
    keys = [Path(args.public_key)] if args.public_key else None
    m, root, _ = verified_extract(Path(args.package), tmp / "pkg", keys)
    rss0 = _rss()
    # the agent's load path, with the scheduler settings the bare loop gets too
    kw = load_options(m, tmp / "cache")
    kw["options"]["name"] = "slm"
    kw["options"]["serving"] = {"max_running": max(streams), "max_queue": 64, "prefix_caching": False,
                                "default_max_tokens": args.new_tokens}
    loaded = get_runtime(m.runtime).load(root / m.model_file, **kw)
    reg = ModelRegistry()
    reg.swap("slm", m.version, loaded, m)
    server = InferenceServer(reg, port=0).start()
    sched = genai.SchedulerConfig()
    sched.cache_size = max(1, int(round(float(kw["options"].get("kv_cache_gb") or 1.0))))
    sched.max_num_seqs = max(streams)
    sched.enable_prefix_caching = False
    pipe = genai.ContinuousBatchingPipeline(str(root), sched, "CPU", dict(m.runtime_options or {}))
    # the same prompt token ids for both: text the agent tokenizes exactly as the bare loop's ids
    ids = [p[0].tolist() for p in _prompts(pipe.get_tokenizer(), max(streams), args.prompt_tokens)]
    texts = [loaded.tokenizer.decode(i, skip_special_tokens=True) for i in ids]
    agent_ids = [loaded.prompt_ids(t) for t in texts]
    tensors = [np.asarray(a, dtype=np.int64)[None, :] for a in agent_ids]
    print(f"{m.name} {m.version} ({m.precision}), OpenVINO GenAI {genai.__version__}; prompts of "
          f"{min(map(len, agent_ids))}-{max(map(len, agent_ids))} tokens, {args.new_tokens} new tokens", flush=True)
    _run(pipe, tensors[:1], 8)
    _agent_round(server.url, texts[:1], 8)
    rows: dict[int, dict[str, list]] = {s: {"runtime": [], "agent": []} for s in streams}
    kv_peak: dict[int, float] = {}
    for r in range(args.rounds):
        for s in streams:
            rt = _run(pipe, tensors[:s], args.new_tokens)
            kv_peak[s] = max(kv_peak.get(s, 0.0), rt["kv_cache_peak_pct"])
            rows[s]["runtime"].append(rt)
            rows[s]["agent"].append(_agent_round(server.url, texts[:s], args.new_tokens))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    rss1 = _rss()
    cache_bytes = int(pipe.get_metrics().kv_cache_size_in_bytes or 0)
    # Prefix caching: a second request that shares the first one's 512-token prefix (a long system prompt),
    # through an agent with prefix caching on ([text_generation] prefix_caching, the default) and the one above
    # (off). Each round takes a prefix neither agent has seen.
    kw["options"]["serving"] = dict(kw["options"]["serving"], prefix_caching=True)
    reg2 = ModelRegistry()
    reg2.swap("slm", m.version, get_runtime(m.runtime).load(root / m.model_file, **kw), m)
    server2 = InferenceServer(reg2, port=0).start()
    more = [p[0].tolist() for p in _prompts(pipe.get_tokenizer(), max(streams) + 2 * args.rounds, args.prompt_tokens)]
    prefix: dict[str, list] = {"on": [], "off": []}
    for r in range(args.rounds):
        for mode, srv in (("on", server2), ("off", server)):
            base = loaded.tokenizer.decode(more[max(streams) + 2 * r + (mode == "off")], skip_special_tokens=True)
            cold = _agent_round(srv.url, [base + " First question: what is this about?"], 4)["ttft_ms"]
            warm = _agent_round(srv.url, [base + " Second question: who wrote it?"], 4)["ttft_ms"]
            prefix[mode].append((cold, warm))
    server2.stop()
    reg2.close()
    server.stop()
    reg.close()
    med = lambda runs, k: statistics.median(x[k] for x in runs)  # noqa: E731
    out = {"package": m.name, "precision": m.precision, "runtime_version": genai.__version__,
           "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rounds": args.rounds, "rows": []}
    print(f"\n{'streams':>7} {'path':<8} {'tokens/s':>9} {'x 1 stream':>10} {'TTFT ms':>8} {'TPOT ms':>8} "
          f"{'TPOT p95':>8} {'overhead':>8}")
    for s in streams:
        for path in ("runtime", "agent"):
            runs = rows[s][path]
            tps = med(runs, "tokens_per_s")
            one = med(rows[streams[0]][path], "tokens_per_s")
            # paired: each round's runtime figure against the same round's agent figure, then the median
            over = (statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(rows[s]["runtime"], runs))
                    - 1 if path == "agent" else 0.0)
            row = {"streams": s, "path": path, "tokens_per_s": tps, "x_one_stream": tps / one,
                   "ttft_ms": med(runs, "ttft_ms"), "tpot_ms": med(runs, "tpot_ms"),
                   "tpot_p95_ms": med(runs, "tpot_p95_ms"), "overhead": over,
                   "rounds_tokens_per_s": [x["tokens_per_s"] for x in runs]}
            out["rows"].append(row)
            print(f"{s:>7} {path:<8} {tps:>9.1f} {tps / one:>9.2f}x {row['ttft_ms']:>8.1f} {row['tpot_ms']:>8.2f} "
                  f"{row['tpot_p95_ms']:>8.2f} {over * 100 if path == 'agent' else 0:>7.1f}%")
    print("\nKV cache (bare loop): " + ", ".join(
        f"{s} streams peak {kv_peak[s]:.2f}% of {cache_bytes / 2**20:.0f} MiB = "
        f"{kv_peak[s] / 100 * cache_bytes / s / 2**20:.1f} MiB per stream" for s in streams)
          + f"; process RSS grew {(rss1 - rss0) / 2**20:.0f} MiB (two pipelines of the model loaded)")
    out["prefix_caching"] = {}
    for mode in ("on", "off"):
        cold = statistics.median(c for c, _ in prefix[mode])
        warm = statistics.median(w for _, w in prefix[mode])
        out["prefix_caching"][mode] = {"first_ttft_ms": cold, "second_ttft_ms": warm, "rounds": prefix[mode]}
        print(f"prefix caching {mode:>3}: TTFT of a {args.prompt_tokens}-token prompt {cold:.1f} ms, of a second one "
              f"sharing its prefix {warm:.1f} ms ({cold / warm:.2f}x)")
    out["kv"] = {"cache_bytes": cache_bytes, "peak_pct": kv_peak,
                 "per_stream_mib": {s: kv_peak[s] / 100 * cache_bytes / s / 2**20 for s in streams}}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
