"""Dynamic batching: 16 concurrent clients, throughput and latency with batching on vs off.

Target (issue 3): on the digits package, throughput with batching >= 2x the same agent with batching
off; on the ResNet-18-class package report both with p99 (the batcher must at least not lose throughput).

Real `edgeopt-agent` daemons (subprocesses) serve the same signed package, one with
``[batching] max_batch = 16`` and one with ``enabled = false`` (with ``--spinning-rows``, a second pair
serves a package whose profile lets ONNX Runtime's intra-op threads spin, its own default). 16 closed-loop
keep-alive clients send pre-built batch-1 binary-tensor requests for ``--seconds``: by default on one
epoll thread (``--generator epoll``, the way wrk drives connections, ~15 us of CPU per request), or one
raw-socket thread each in 4 processes (``--generator threads``). Rounds alternate the agents; the table
shows medians of rounds and each round's figure.

Run:  .venv/bin/python benchmarks/agent_batching.py [--model digits|resnet18|both] [--seconds 5] [--rounds 3]
          [--generator epoll|threads] [--spinning-rows] [--json]
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_common import (DIGITS_ONNX, Daemon, RawClient, binary_request, build_package, epoll_clients,  # noqa: E402
                          free_port, http_request_bytes, install, machine, median_of, percentiles, resnet18_path,
                          write_config)

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


def _epoll_process(port: int, request: bytes, connections: int, start_at: float, stop_at: float, out) -> None:
    out.put(epoll_clients(port, request, connections, start_at, stop_at))


def load_test(port: int, model: str, body: bytes, headers: dict, clients: int, seconds: float,
              generator: str = "epoll", procs: int | None = None, agent_pid: int | None = None) -> dict:
    """``clients`` closed-loop clients. ``epoll`` (default): the connections share one epoll thread per
    process (1 process). ``threads``: one thread per client, spread over 4 processes (a single Python
    process with 16 client threads is itself GIL-bound and would cap the agent's measured throughput)."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 1.0 + 0.1 * clients
    stop_at = start_at + seconds
    path = f"/v2/models/{model}/infer"
    procs = procs or (1 if generator == "epoll" else 4)
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    if generator == "epoll":
        request = http_request_bytes(port, path, body, headers)
        workers = [ctx.Process(target=_epoll_process, args=(port, request, n, start_at, stop_at, out))
                   for n in per if n]
    else:
        workers = [ctx.Process(target=_client_process, args=(port, path, body, headers, n, start_at, stop_at, out))
                   for n in per if n]
    for w in workers:
        w.start()
    # The agent's own CPU time over the measured window (all its threads, runtime threads included).
    agent = psutil.Process(agent_pid) if agent_pid else None
    cpu0 = None
    if agent is not None:
        time.sleep(max(0.0, start_at - time.time()))
        cpu0 = sum(agent.cpu_times()[:2])
    flat: list[float] = []
    errors = 0
    cpu1 = None
    for _ in workers:
        lat, err = out.get(timeout=seconds + 120)
        if cpu1 is None and agent is not None:
            cpu1 = sum(agent.cpu_times()[:2])
        flat += lat
        errors += err
    for w in workers:
        w.join(10)
    result = percentiles(flat)
    result.update(throughput=len(flat) / seconds, errors=errors)
    if cpu0 is not None and cpu1 is not None and flat:
        result["agent_cpu_us"] = (cpu1 - cpu0) / len(flat) * 1e6
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


OFF, ON = "batching off", "batching on (max 16)"


def bench_model(name: str, work: Path, clients: int, seconds: float, rounds: int,
                runtime_override: str | None = None, generator: str = "epoll",
                spinning_rows: bool = False, event_loop: str = "asyncio") -> dict:
    """Rounds alternate the agents; medians of rounds. With ``spinning_rows`` (ONNX Runtime only) two more
    agents serve a package whose profile turns ``intra_op_spinning`` on (ONNX Runtime's own default)."""
    onnx_path, runtime, make_input = MODELS[name]
    runtime = runtime_override or runtime
    variants = {"": None}
    if spinning_rows and runtime == "onnxruntime":
        variants[", ORT threads spinning"] = True
    body, headers = binary_request(make_input())
    batching = {OFF: {"enabled": False}, ON: {"max_batch": 16, "max_delay_ms": 2.0}}
    ports, cfgs = {}, {}
    for k, (suffix, spinning) in enumerate(variants.items()):
        pkg, pub = build_package(onnx_path(), work / f"pkg-{name}-{k}", name=name, runtime=runtime,
                                 spinning=spinning)
        for base, limits in batching.items():
            mode = base + suffix
            d = work / f"{name}-{k}-{base.split()[1]}"
            d.mkdir()
            ports[mode] = free_port()
            cfgs[mode] = write_config(d, pub, api_port=ports[mode], batching=limits, broker_port=free_port(),
                                      event_loop=event_loop)
            install(cfgs[mode], pkg)
    modes = list(cfgs)
    runs: dict[str, list] = {m: [] for m in modes}
    hist = {}
    with contextlib.ExitStack() as stack:
        pids = {mode: stack.enter_context(Daemon(cfgs[mode], ports[mode])).pid for mode in modes}
        for _ in range(rounds):
            for mode in modes:
                runs[mode].append(load_test(ports[mode], name, body, headers, clients, seconds, generator,
                                            agent_pid=pids[mode]))
        for mode in modes:
            hist[mode] = batch_histogram(ports[mode], name)
    out = {}
    for mode in modes:
        out[mode] = {k: median_of(runs[mode], k) for k in ("throughput", "p50_ms", "p99_ms", "agent_cpu_us")}
        out[mode]["errors"] = sum(r["errors"] for r in runs[mode])
        out[mode]["batches"] = hist[mode]
        out[mode]["rounds"] = [round(r["throughput"]) for r in runs[mode]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="both", choices=["digits", "resnet18", "both"])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--resnet-runtime", default=None, choices=["openvino", "onnxruntime"],
                    help="runtime of the ResNet-18 package (default openvino)")
    ap.add_argument("--generator", default="epoll", choices=["epoll", "threads"],
                    help="load generator: one epoll thread for all connections (default), or a thread per client")
    ap.add_argument("--spinning-rows", action="store_true",
                    help="also measure both agents with ONNX Runtime's spinning intra-op threads (its own default)")
    ap.add_argument("--event-loop", default="asyncio", choices=["asyncio", "uvloop"],
                    help="the agents' [api] event_loop (default asyncio, as the agent)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    names = ["digits", "resnet18"] if args.model == "both" else [args.model]
    results = {}
    with tempfile.TemporaryDirectory(prefix="edgeopt-bench-") as tmp:
        for name in names:
            results[name] = bench_model(name, Path(tmp), args.clients, args.seconds, args.rounds,
                                        args.resnet_runtime if name == "resnet18" else None, args.generator,
                                        args.spinning_rows, args.event_loop)
    runtimes = {n: (args.resnet_runtime if n == "resnet18" and args.resnet_runtime else MODELS[n][1]) for n in names}
    doc = {"machine": machine(), "clients": args.clients, "seconds": args.seconds, "rounds": args.rounds,
           "generator": args.generator, "event_loop": args.event_loop,
           "runtimes": runtimes, "results": results}
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Dynamic batching, {args.clients} concurrent clients, batch-1 requests, "
                        f"{args.generator} load generator, event loop {args.event_loop} ({machine()})")
    for col in ("model", "agent", "throughput req/s", "ratio vs off", "p50 ms", "p99 ms", "agent CPU us/req",
                "errors", "batch sizes", "rounds req/s"):
        table.add_column(col)
    for name, modes in results.items():
        runtime = runtimes[name]
        for mode, r in modes.items():
            # each agent against the same agent (same package) with batching off
            base = modes[mode.replace(ON, OFF)]["throughput"]
            table.add_row(f"{name} ({runtime})", mode, f"{r['throughput']:.0f}", f"{r['throughput'] / base:.2f}x",
                          f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['agent_cpu_us']:.0f}", str(r["errors"]),
                          r["batches"],
                          " ".join(str(x) for x in r["rounds"]))
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
