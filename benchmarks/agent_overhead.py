"""Local API overhead: p50/p99 latency at batch 1 through the agent vs the direct runtime call.

Target (issue 3): p50 through the agent <= direct runtime call + 1 ms for the digits model.

The agent is the real `edgeopt-agent` daemon (subprocess) serving a real signed digits package; the
direct call loads the same installed package with the same loader in this process. One client on one
keep-alive connection, requests pre-encoded (the client's own encoding is not the agent's overhead).
Rounds alternate direct / agent so drifting machine load hits both; the table shows medians of rounds.

Run:  .venv/bin/python benchmarks/agent_overhead.py [--requests 2000] [--rounds 3] [--json]
"""
from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_common import (DIGITS_ONNX, Daemon, binary_request, build_package, free_port, install,  # noqa: E402
                          json_request, machine, median_of, percentiles, post, write_config)


def direct(loaded, x: np.ndarray, n: int) -> dict:
    feeds = {"images": x}
    for _ in range(50):
        loaded.infer(feeds)
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        loaded.infer(feeds)
        samples.append(time.perf_counter() - t)
    return percentiles(samples)


def through_agent(port: int, body: bytes, headers: dict, n: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(50):
        assert post(conn, "/v2/models/digits/infer", body, headers) == 200
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        status = post(conn, "/v2/models/digits/infer", body, headers)
        samples.append(time.perf_counter() - t)
        if status != 200:
            raise RuntimeError(f"agent answered {status}")
    conn.close()
    return percentiles(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "openvino"])
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()

    from edgeopt.agent.config import load_config
    from edgeopt.agent.loader import load_installed
    from edgeopt.agent.store import Store

    x = np.load(DIGITS_ONNX.parent / "digits_heldout.npz")["images"][:1]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="edgeopt-bench-") as tmp:
        work = Path(tmp)
        pkg, pub = build_package(DIGITS_ONNX, work / "pkg", name="digits", runtime=args.runtime)
        for mode, batching in (("batching on (max 16)", {"max_batch": 16}), ("batching off", {"enabled": False})):
            port = free_port()
            cfg = write_config(work, pub, api_port=port, batching=batching, broker_port=free_port())
            install(cfg, pkg)
            config = load_config(cfg)
            loaded = load_installed(Store(config.state_dir).current("digits"), config)
            runs = {"direct": [], "agent JSON": [], "agent binary": []}
            with Daemon(cfg, port):
                for _ in range(args.rounds):
                    runs["direct"].append(direct(loaded, x, args.requests))
                    runs["agent binary"].append(through_agent(port, *binary_request(x), args.requests))
                    runs["agent JSON"].append(through_agent(port, *json_request(x), args.requests))
            loaded.close()
            rows[mode] = {k: {"p50_ms": median_of(v, "p50_ms"), "p99_ms": median_of(v, "p99_ms")}
                          for k, v in runs.items()}

    result = {"machine": machine(), "runtime": args.runtime, "requests_per_round": args.requests,
              "rounds": args.rounds, "modes": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Agent API overhead, digits, batch 1, {args.runtime} ({machine()})")
    for col in ("config", "path", "p50 ms", "p99 ms", "p50 overhead ms", "p50 ratio", "target p50 <= direct+1 ms"):
        table.add_column(col)
    for mode, r in rows.items():
        d = r["direct"]
        for path, v in r.items():
            over = v["p50_ms"] - d["p50_ms"]
            ok = "" if path == "direct" else ("met" if over <= 1.0 else "MISSED")
            table.add_row(mode, path, f"{v['p50_ms']:.3f}", f"{v['p99_ms']:.3f}", f"{over:+.3f}",
                          f"{v['p50_ms'] / d['p50_ms']:.2f}x", ok)
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
