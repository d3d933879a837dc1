"""Telemetry cost and agent memory.

Targets (issue 3): the agent's own CPU for telemetry at a 1 s interval < 2% of one core; agent resident
memory beyond the loaded runtime and model < 60 MB.

* CPU: the real `edgeopt-agent` daemon (subprocess, real Mosquitto on 127.0.0.1:1883, digits package
  loaded) idles for ``--seconds`` with ``telemetry_interval_s = 1`` and again with 3600 (no telemetry in
  the window); the difference of the process CPU time is what telemetry costs (snapshot, psutil,
  payload, outbox write, publish, PUBACK, outbox delete). Rounds alternate; medians.
* Memory: RSS of the daemon serving the package (after 200 requests) vs RSS of a bare Python process
  that imports ONNX Runtime and loads + warms up the same model (no edgeopt code at all).

Run:  .venv/bin/python benchmarks/agent_telemetry.py [--seconds 20] [--rounds 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_common import (DIGITS_ONNX, Daemon, build_package, free_port, install, machine,  # noqa: E402
                          write_config)

# The bare runtime with the model loaded and warmed up: no edgeopt, no pydantic, nothing else.
BASELINE = """
import sys, time, numpy as np, onnxruntime as ort, psutil
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
for _ in range(3):
    sess.run(None, {"images": np.zeros((1, 1, 8, 8), np.float32)})
time.sleep(2)
print(psutil.Process().memory_info().rss)
"""


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def idle_cpu(cfg: Path, port: int, seconds: float) -> float:
    """CPU % of one core the idle daemon uses over ``seconds`` (after it settled)."""
    with Daemon(cfg, port) as d:
        time.sleep(3)  # start-up work (load, birth, first telemetry) is not what we measure
        c0, t0 = cpu_seconds(d.pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_seconds(d.pid), time.monotonic()
    return 100.0 * (c1 - c0) / (t1 - t0)


def agent_rss(cfg: Path, port: int) -> int:
    import http.client

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from agent_common import binary_request, post

    with Daemon(cfg, port) as d:
        body, headers = binary_request(np.zeros((1, 1, 8, 8), np.float32))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(200):
            post(conn, "/v2/models/digits/infer", body, headers)
        conn.close()
        time.sleep(2)
        return psutil.Process(d.pid).memory_info().rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgeopt-bench-") as tmp:
        work = Path(tmp)
        pkg, pub = build_package(DIGITS_ONNX, work / "pkg", name="digits", runtime="onnxruntime")
        on_dir, off_dir = work / "tel-1s", work / "tel-off"
        on_dir.mkdir()
        off_dir.mkdir()
        port_on, port_off = free_port(), free_port()
        cfg_on = write_config(on_dir, pub, api_port=port_on, interval_s=1.0, device_id="bench-tel-1")
        cfg_off = write_config(off_dir, pub, api_port=port_off, interval_s=3600.0, device_id="bench-tel-2")
        install(cfg_on, pkg)
        install(cfg_off, pkg)
        on, off = [], []
        for _ in range(args.rounds):
            on.append(idle_cpu(cfg_on, port_on, args.seconds))
            off.append(idle_cpu(cfg_off, port_off, args.seconds))
        base = int(subprocess.run([sys.executable, "-c", BASELINE, str(DIGITS_ONNX)], capture_output=True,
                                  text=True, check=True).stdout.strip())
        rss = agent_rss(cfg_on, port_on)
    import statistics

    result = {"machine": machine(), "seconds": args.seconds, "rounds": args.rounds,
              "cpu_percent_telemetry_1s": statistics.median(on), "cpu_percent_no_telemetry": statistics.median(off),
              "telemetry_cpu_percent_of_one_core": statistics.median(on) - statistics.median(off),
              "rss_runtime_and_model_mb": base / 2**20, "rss_agent_mb": rss / 2**20,
              "rss_agent_beyond_runtime_mb": (rss - base) / 2**20}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Agent telemetry cost and memory, digits package ({machine()})")
    for col in ("measure", "value", "baseline (same run)", "difference", "target"):
        table.add_column(col)
    diff = result["telemetry_cpu_percent_of_one_core"]
    table.add_row("idle agent CPU, telemetry every 1 s", f"{result['cpu_percent_telemetry_1s']:.2f} %",
                  f"{result['cpu_percent_no_telemetry']:.2f} % (no telemetry)", f"{diff:+.2f} % of one core",
                  "< 2 %: " + ("met" if diff < 2 else "MISSED"))
    extra = result["rss_agent_beyond_runtime_mb"]
    table.add_row("agent RSS, serving digits", f"{result['rss_agent_mb']:.1f} MB",
                  f"{result['rss_runtime_and_model_mb']:.1f} MB (runtime + model only)", f"{extra:+.1f} MB",
                  "< 60 MB: " + ("met" if extra < 60 else "MISSED"))
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
