"""Dynamic batching: 16 concurrent clients, throughput and latency with batching on vs off.

Target (issue 3): on the digits package, throughput with batching >= 2x the same agent with batching
off; on the ResNet-18-class package report both with p99 (the batcher must at least not lose throughput).

Two real `edgeopt-agent` daemons (subprocesses) serve the same signed package, one with
``[batching] max_batch = 16`` and one with ``enabled = false``. 16 client threads (keep-alive, binary
tensors, requests built once, raw-socket clients in 4 processes so the load generator stays small and
is not itself GIL-bound) send batch-1 requests in a closed loop for ``--seconds``; rounds alternate the
two agents and the table shows medians of rounds.

Run:  .venv/bin/python benchmarks/agent_batching.py [--model digits|resnet18|both] [--seconds 5] [--rounds 3]
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_common import (DIGITS_ONNX, Daemon, RawClient, binary_request, build_package, free_port,  # noqa: E402
                          install, machine, median_of, percentiles, resnet18_path, write_config)

MODELS = {
    # name: (onnx path getter, runtime, input builder)
    "digits": (lambda: DIGITS_ONNX, "onnxruntime",
               lambda: np.load(DIGITS_ONNX.parent / "digits_heldout.npz")["images"][:1]),
    "resnet18": (resnet18_path, "openvino",
                 lambda: np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)),
}


def _client_process(port: int, path: str, body: bytes, headers: dict, threads: int, start_at: float,
                    stop_at: float, out) -> None:
    """One load-generator process: ``threads`` closed-loop clients between two wall-clock instants."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads

    def client(k: int) -> None:
        conn = RawClient(port, path, body, headers)
        conn.send()  # connect + warm
        time.sleep(max(0.0, start_at - time.time()))
        mine = latencies[k]
        while time.time() < stop_at:
            t = time.perf_counter()
            status = conn.send()
            if status != 200:
                errors[k] += 1
            elif time.time() <= stop_at:  # only requests completed inside the window count
                mine.append(time.perf_counter() - t)
        conn.close()

    pool = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put(([x for lst in latencies for x in lst], sum(errors)))


def load_test(port: int, model: str, body: bytes, headers: dict, clients: int, seconds: float,
              procs: int = 4) -> dict:
    """``clients`` closed-loop clients spread over ``procs`` processes (a single Python process with 16
    client threads is itself GIL-bound and would cap the agent's measured throughput)."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 1.0 + 0.1 * clients
    stop_at = start_at + seconds
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    workers = [ctx.Process(target=_client_process, args=(port, f"/v2/models/{model}/infer", body, headers, n,
                                                         start_at, stop_at, out)) for n in per if n]
    for w in workers:
        w.start()
    flat: list[float] = []
    errors = 0
    for _ in workers:
        lat, err = out.get(timeout=seconds + 120)
        flat += lat
        errors += err
    for w in workers:
        w.join(10)
    result = percentiles(flat)
    result.update(throughput=len(flat) / seconds, errors=errors)
    return result


def batch_histogram(port: int, model: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    counts = {}
    for line in text.splitlines():
        if line.startswith(f'edgeopt_batches_total{{model="{model}"'):
            size = int(line.split('size="')[1].split('"')[0])
            counts[size] = int(float(line.rsplit(" ", 1)[1]))
    total = sum(counts.values()) or 1
    mean = sum(s * c for s, c in counts.items()) / total
    return f"mean {mean:.1f}, max {max(counts, default=0)}"


def bench_model(name: str, work: Path, clients: int, seconds: float, rounds: int,
                runtime_override: str | None = None) -> dict:
    onnx_path, runtime, make_input = MODELS[name]
    runtime = runtime_override or runtime
    pkg, pub = build_package(onnx_path(), work / f"pkg-{name}", name=name, runtime=runtime)
    body, headers = binary_request(make_input())
    modes = {"batching off": {"enabled": False}, "batching on (max 16)": {"max_batch": 16, "max_delay_ms": 2.0}}
    ports, cfgs = {}, {}
    for mode, batching in modes.items():
        d = work / f"{name}-{mode.split()[1]}"
        d.mkdir()
        ports[mode] = free_port()
        cfgs[mode] = write_config(d, pub, api_port=ports[mode], batching=batching, broker_port=free_port())
        install(cfgs[mode], pkg)
    runs: dict[str, list] = {m: [] for m in modes}
    hist = {}
    with Daemon(cfgs["batching off"], ports["batching off"]), \
            Daemon(cfgs["batching on (max 16)"], ports["batching on (max 16)"]):
        for _ in range(rounds):
            for mode in modes:
                runs[mode].append(load_test(ports[mode], name, body, headers, clients, seconds))
        for mode in modes:
            hist[mode] = batch_histogram(ports[mode], name)
    out = {}
    for mode in modes:
        out[mode] = {k: median_of(runs[mode], k) for k in ("throughput", "p50_ms", "p99_ms")}
        out[mode]["errors"] = sum(r["errors"] for r in runs[mode])
        out[mode]["batches"] = hist[mode]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="both", choices=["digits", "resnet18", "both"])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--resnet-runtime", default=None, choices=["openvino", "onnxruntime"],
                    help="runtime of the ResNet-18 package (default openvino)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    names = ["digits", "resnet18"] if args.model == "both" else [args.model]
    results = {}
    with tempfile.TemporaryDirectory(prefix="edgeopt-bench-") as tmp:
        for name in names:
            results[name] = bench_model(name, Path(tmp), args.clients, args.seconds, args.rounds,
                                        args.resnet_runtime if name == "resnet18" else None)
    runtimes = {n: (args.resnet_runtime if n == "resnet18" and args.resnet_runtime else MODELS[n][1]) for n in names}
    doc = {"machine": machine(), "clients": args.clients, "seconds": args.seconds, "rounds": args.rounds,
           "runtimes": runtimes, "results": results}
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Dynamic batching, {args.clients} concurrent clients, batch-1 requests ({machine()})")
    for col in ("model", "agent", "throughput req/s", "ratio vs off", "p50 ms", "p99 ms", "errors", "batch sizes"):
        table.add_column(col)
    for name, modes in results.items():
        runtime = runtimes[name]
        base = modes["batching off"]["throughput"]
        for mode, r in modes.items():
            table.add_row(f"{name} ({runtime})", mode, f"{r['throughput']:.0f}", f"{r['throughput'] / base:.2f}x",
                          f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", str(r["errors"]), r["batches"])
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
