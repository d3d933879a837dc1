"""Page latency with 10,000 devices and 10 million telemetry rows in PostgreSQL.

1. ``generate``: a fresh PostgreSQL database (Alembic schema) filled fast with COPY: 10,000 devices (5
   profiles, 20 groups, tags, 1-2 installed packages, 90 % online), 1,000 one-minute telemetry rows per
   device ending now (10,000,000 rows, latency histograms in the DDSketch layout, stored packed, drawn from
   per-device distributions), the 1-minute rollups (INSERT .. SELECT on the server), 1-hour and fleet
   rollups (numpy). On PostgreSQL with migration 0005 the raw rows go into their daily partitions.
2. ``measure``: the real server (``edgeopt-dashboard serve``, waitress) on that database, a user and an API
   token made with the CLI, and a small load tool (N client threads, ``requests``) timing the fleet
   overview, the device list (plain, filtered, searched, sorted, deep page) and a 24 h device chart, pages
   and their JSON API twins. ``/healthz`` (one ``SELECT 1``) is the baseline measured in the same run.

    .venv/bin/python benchmarks/pages_bench.py --devices 10000 --rows-per-device 1000      # both steps
    .venv/bin/python benchmarks/pages_bench.py --keep --db-name edgeopt_pages               # keep the data
    .venv/bin/python benchmarks/pages_bench.py --reuse --db-name edgeopt_pages             # measure only

Target: p95 < 200 ms for every page and API route timed, the 24 h and 7 d device charts included.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

EXE = str(Path(sys.executable).with_name("edgeopt-dashboard"))
PROFILES = ["cpu", "npu", "igpu", "gpu", "arm"]


def _admin(base):
    import psycopg

    return psycopg.connect(host=base.host, port=base.port or 5432, user=base.username,
                           dbname=base.database or "postgres", autocommit=True)


def generate(url: str, devices: int, rows_per_device: int, seed: int = 1) -> dict:
    """Fill the (migrated, empty) database at ``url``; returns timings."""
    import psycopg
    from sqlalchemy.engine import make_url

    from sqlalchemy.orm import Session

    from edgeopt.dashboard import histograms, partitions
    from edgeopt.dashboard.db import make_engine
    from edgeopt.sdk.telemetry import SKETCH_BINS, SKETCH_KEY_MAX, SKETCH_KEY_MIN, sketch_key, sketch_value

    u = make_url(url)
    rng = np.random.default_rng(seed)
    now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    start = now - timedelta(minutes=rows_per_device)
    nb = SKETCH_BINS
    values = np.array([sketch_value(SKETCH_KEY_MIN + i) for i in range(nb)])
    engine = make_engine(url)
    with Session(engine) as s, s.begin():
        if partitions.is_partitioned(s):  # the days of the generated range, as the rollup job makes them
            partitions.ensure_range(s, start, now)
    engine.dispose()

    def packed_hex(keys: np.ndarray, counts: np.ndarray) -> str:
        nz = counts > 0
        rec = np.empty(int(nz.sum()), dtype=histograms.RECORD)
        rec["k"], rec["c"] = keys[nz], counts[nz]
        return rec.tobytes().hex()

    all_keys = np.arange(SKETCH_KEY_MIN, SKETCH_KEY_MAX + 1)

    def dense_packed(row: np.ndarray) -> bytes:
        return bytes.fromhex(packed_hex(all_keys, row))

    t = {}
    with psycopg.connect(host=u.host, port=u.port or 5432, user=u.username, dbname=u.database) as conn:
        t0 = time.perf_counter()
        with conn.cursor() as cur:
            with cur.copy("COPY devices (id, device_id, fleet, status, offline_reason, status_changed_at, last_seen,"
                          " first_seen, session_id, session_ts, status_seq, heartbeat_deadline, telemetry_interval_s,"
                          " agent_version, capabilities, profile, last_p95_ms, last_cpu_percent, last_rss_bytes)"
                          " FROM STDIN") as cp:
                for i in range(1, devices + 1):
                    online = rng.random() < 0.9
                    prof = PROFILES[i % len(PROFILES)]
                    cp.write_row([i, f"dev-{i:05d}", f"fleet-{i % 4}", "online" if online else "offline",
                                  None if online else "will", start, now, start, "s1", start, 1,
                                  now + timedelta(minutes=3) if online else None, 60.0, "0.1.0",
                                  json.dumps({"profile": prof}), prof, None, float(rng.uniform(5, 90)),
                                  int(rng.integers(50, 500)) * 2**20])
            with cur.copy("COPY device_groups (id, name, description, created_at) FROM STDIN") as cp:
                for g in range(1, 21):
                    cp.write_row([g, f"line-{g:02d}", "", start])
            with cur.copy("COPY device_group_members (group_id, device_pk, source) FROM STDIN") as cp:
                for i in range(1, devices + 1):
                    cp.write_row([1 + i % 20, i, "agent"])
            with cur.copy("COPY device_tags (device_pk, tag) FROM STDIN") as cp:
                for i in range(1, devices + 1, 7):
                    cp.write_row([i, "canary"])
            with cur.copy("COPY installed_packages (device_pk, name, version, profile, runtime, updated_at) "
                          "FROM STDIN") as cp:
                for i in range(1, devices + 1):
                    prof = PROFILES[i % len(PROFILES)]
                    cp.write_row([i, "digits", "1.1.0" if i % 3 else "1.0.0", prof, "openvino", start])
                    if i % 2:
                        cp.write_row([i, "detector", "2.0.0", prof, "onnxruntime", start])
            for table in ("devices", "device_groups"):
                cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        conn.commit()
        t["devices_s"] = time.perf_counter() - t0

        # Telemetry: one row per device per minute for model "digits"; COPY in text format, built per device.
        t0 = time.perf_counter()
        ts_text = [(start + timedelta(minutes=k, seconds=1)).strftime("%Y-%m-%d %H:%M:%S+00") for k in range(rows_per_device)]
        hour_of = [(start + timedelta(minutes=k)).replace(minute=0) for k in range(rows_per_device)]
        fleet_1m = np.zeros((rows_per_device, nb), dtype=np.int64)
        fleet_req_1m = np.zeros(rows_per_device, dtype=np.int64)
        hours = sorted(set(hour_of))
        hour_idx = np.array([hours.index(h) for h in hour_of])
        fleet_1h = np.zeros((len(hours), nb), dtype=np.int64)
        fleet_req_1h = np.zeros(len(hours), dtype=np.int64)
        p95_last = {}
        with conn.cursor() as cur:
            with cur.copy("COPY telemetry_raw (device_pk, model, model_version, ts, session_id, seq, interval_s, "
                          "requests, errors, throughput_ips, hist_counts, hist_sum_ms, p50_ms, p95_ms, p99_ms, "
                          "queue_depth, batch_sizes, cpu_percent, rss_bytes) FROM STDIN") as cp:
                h1_rows = []
                for i in range(1, devices + 1):
                    median = float(rng.lognormal(np.log(4.0), 0.6))
                    samples = rng.lognormal(np.log(median), 0.5, size=4000)
                    # the device's distribution over the sketch's keys (only the keys it reaches)
                    keys, kc = np.unique([sketch_key(float(v)) for v in samples], return_counts=True)
                    req = rng.integers(400, 800, size=rows_per_device)
                    counts = rng.multinomial(req, kc / kc.sum())
                    cpu = rng.uniform(5, 90, size=rows_per_device)
                    fleet_1m[:, keys - SKETCH_KEY_MIN] += counts
                    fleet_req_1m += req
                    for hi in range(len(hours)):
                        fleet_1h[hi, keys - SKETCH_KEY_MIN] += counts[hour_idx == hi].sum(axis=0)
                    np.add.at(fleet_req_1h, hour_idx, req)
                    sum_ms = counts @ values[keys - SKETCH_KEY_MIN]
                    p95 = float(np.percentile(samples, 95))
                    p95_last[i] = p95
                    buf = io.StringIO()
                    for k in range(rows_per_device):
                        hc = "\\\\x" + packed_hex(keys, counts[k])
                        r = int(req[k])
                        buf.write(f"{i}\tdigits\t1.1.0\t{ts_text[k]}\ts1\t{k + 1}\t60\t{r}\t{r // 200}\t{r / 60:.3f}\t"
                                  f"{hc}\t{sum_ms[k]:.2f}\t{median:.3f}\t{p95:.3f}\t{p95 * 1.3:.3f}\t{k % 4}\t"
                                  f'{{"1":{r // 2},"4":{r - r // 2}}}\t{cpu[k]:.1f}\t{200 * 2**20}\n')
                    cp.write(buf.getvalue())
                    # 1 h rollups of this device, from the same counts
                    for hi, h in enumerate(hours):
                        sel = hour_idx == hi
                        c = counts[sel].sum(axis=0)
                        h1_rows.append([i, "digits", h, int(req[sel].sum()), int((req[sel] // 200).sum()),
                                        int(sel.sum()), bytes.fromhex(packed_hex(keys, c)), float(sum_ms[sel].sum()),
                                        float(cpu[sel].mean()), float(200 * 2**20), 3,
                                        json.dumps({"1": int(req[sel].sum() // 2)})])
                    if i % 1000 == 0:
                        print(f"  telemetry: {i}/{devices} devices, {i * rows_per_device:,} rows, "
                              f"{time.perf_counter() - t0:.0f} s", flush=True)
            conn.commit()
            t["telemetry_copy_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            cur.execute("INSERT INTO rollup_1m (device_pk, model, bucket_start, requests, errors, samples, hist_counts,"
                        " hist_sum_ms, cpu_avg, rss_avg, queue_depth_max, batch_sizes) SELECT device_pk, model,"
                        " date_trunc('minute', ts), requests, errors, 1, hist_counts, hist_sum_ms, cpu_percent,"
                        " rss_bytes, queue_depth, batch_sizes FROM telemetry_raw")
            conn.commit()
            t["rollup_1m_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            with cur.copy("COPY rollup_1h (device_pk, model, bucket_start, requests, errors, samples, hist_counts,"
                          " hist_sum_ms, cpu_avg, rss_avg, queue_depth_max, batch_sizes) FROM STDIN") as cp:
                for row in h1_rows:
                    cp.write_row(row)
            with cur.copy("COPY fleet_rollup (resolution, model, bucket_start, devices, requests, errors, hist_counts,"
                          " hist_sum_ms) FROM STDIN") as cp:
                for k in range(rows_per_device):
                    cp.write_row(["1m", "digits", start + timedelta(minutes=k), devices, int(fleet_req_1m[k]),
                                  int(fleet_req_1m[k] // 200), dense_packed(fleet_1m[k]), 0.0])
                for hi, h in enumerate(hours):
                    cp.write_row(["1h", "digits", h, devices, int(fleet_req_1h[hi]), int(fleet_req_1h[hi] // 200),
                                  dense_packed(fleet_1h[hi]), 0.0])
            cur.executemany("UPDATE devices SET last_p95_ms = %s WHERE id = %s",
                            [(v, k) for k, v in p95_last.items()])
            cur.execute("INSERT INTO rollup_state (name, value, updated_at) SELECT 'rollup_raw_id', max(id), now() "
                        "FROM telemetry_raw")
            conn.commit()
            t["rollup_1h_fleet_s"] = time.perf_counter() - t0
        conn.autocommit = True
        t0 = time.perf_counter()
        conn.execute("VACUUM ANALYZE")
        t["vacuum_analyze_s"] = time.perf_counter() - t0
        t["raw_rows"] = conn.execute("SELECT count(*) FROM telemetry_raw").fetchone()[0]
        t["db_size"] = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()[0]
    return t


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(url: str, devices: int, requests_per_endpoint: int, clients: int, workdir: Path) -> list[dict]:
    import requests

    env = dict(os.environ, EDGEOPT_DATABASE_URL=url, EDGEOPT_DATA_DIR=str(workdir))
    user = f"bench{secrets.token_hex(3)}"
    subprocess.run([EXE, "create-user", user, "--role", "viewer", "--password", secrets.token_hex(8)],
                   env=env, check=True, capture_output=True)
    token = json.loads(subprocess.run([EXE, "create-token", user, "--json"], env=env, check=True,
                                      capture_output=True, text=True).stdout)["token"]
    port = free_port()
    log = open(workdir / "serve.log", "w")
    server = subprocess.Popen([EXE, "serve", "--port", str(port), "--threads", "8"], env=env,
                              stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {(workdir / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.2)
        rnd = random.Random(7)
        dev = lambda: f"dev-{rnd.randint(1, devices):05d}"  # noqa: E731
        endpoints = {
            "baseline: /healthz": lambda: "/healthz",
            "fleet overview page /fleet": lambda: "/fleet",
            "fleet summary API": lambda: "/api/v1/fleet",
            "fleet 24h latency chart API": lambda: "/api/v1/fleet/series?range=24h",
            "device list page /devices": lambda: f"/devices?page={rnd.randint(1, devices // 50)}",
            "device list API (page)": lambda: f"/api/v1/devices?page={rnd.randint(1, devices // 50)}",
            "device list API (filter+sort)": lambda: rnd.choice([
                "/api/v1/devices?status=offline&sort=last_seen&order=desc",
                "/api/v1/devices?profile=npu&group=line-07&sort=p95&order=desc",
                "/api/v1/devices?package=digits@1.0.0&sort=p95&order=desc&page=3",
                f"/api/v1/devices?q={rnd.randint(10, 99)}&sort=device_id"]),
            "device detail page": lambda: f"/devices/{dev()}",
            "device 24h chart API": lambda: f"/api/v1/devices/{dev()}/series?range=24h",
            "device 7d chart API": lambda: f"/api/v1/devices/{dev()}/series?range=7d",
            "device 1h chart API (raw rows)": lambda: f"/api/v1/devices/{dev()}/series?range=1h",
            "fleet 7d latency chart API": lambda: "/api/v1/fleet/series?range=7d",
        }
        results = []
        headers = {"Authorization": f"Bearer {token}"}
        for name, make in endpoints.items():
            times: list[float] = []
            errors: list[str] = []
            paths = [make() for _ in range(requests_per_endpoint)]
            lock = threading.Lock()

            def worker(chunk: list[str]) -> None:
                s = requests.Session()
                for p in chunk:
                    t0 = time.perf_counter()
                    r = s.get(base + p, headers=headers, timeout=30)
                    dt = time.perf_counter() - t0
                    with lock:
                        times.append(dt)
                        if r.status_code != 200:
                            errors.append(f"{p}: {r.status_code}")
            for p in paths[:3]:  # warm up connections and caches
                requests.get(base + p, headers=headers, timeout=30)
            threads = [threading.Thread(target=worker, args=(paths[i::clients],)) for i in range(clients)]
            t0 = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.perf_counter() - t0
            ms = sorted(x * 1000 for x in times)
            results.append({"endpoint": name, "n": len(ms), "p50_ms": statistics.median(ms),
                            "p95_ms": ms[max(0, int(round(0.95 * len(ms))) - 1)], "max_ms": ms[-1],
                            "rps": len(ms) / wall, "errors": errors[:3], "n_errors": len(errors)})
            print(f"  {name}: p50 {results[-1]['p50_ms']:.1f} ms, p95 {results[-1]['p95_ms']:.1f} ms, "
                  f"{results[-1]['rps']:.0f} req/s, errors {len(errors)}", flush=True)
        return results
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pg-url", default=os.environ.get("EDGEOPT_TEST_POSTGRES_URL",
                                                       "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--rows-per-device", type=int, default=1_000)
    ap.add_argument("--requests", type=int, default=200, help="Requests per endpoint.")
    ap.add_argument("--clients", type=int, default=4, help="Concurrent client threads.")
    ap.add_argument("--db-name", default=None, help="Database name (default: a random edgeopt_pages_*).")
    ap.add_argument("--keep", action="store_true", help="Keep the database afterwards.")
    ap.add_argument("--reuse", action="store_true", help="Measure an existing generated database (--db-name).")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table
    from sqlalchemy.engine import make_url

    from edgeopt.dashboard.db import init_db

    base = make_url(args.pg_url)
    name = args.db_name or f"edgeopt_pages_{secrets.token_hex(3)}"
    url = base.set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)
    try:
        if not args.reuse:
            with _admin(base) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                c.execute(f'CREATE DATABASE "{name}"')
            init_db(url)
            print(f"generating {args.devices:,} devices x {args.rows_per_device:,} rows into {name} ...", flush=True)
            t = generate(url, args.devices, args.rows_per_device)
            print("generated:", json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in t.items()}),
                  flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            results = measure(url, args.devices, args.requests, args.clients, Path(tmp))
    finally:
        if not args.keep and not args.reuse:
            with _admin(base) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    baseline = results[0]["p95_ms"]
    table = Table(title=f"Pages and API, {args.devices:,} devices, {args.devices * args.rows_per_device:,} raw rows, "
                        f"{args.clients} clients, {args.requests} requests each (waitress, 8 threads)")
    for col in ("endpoint", "p50 ms", "p95 ms", "p95 / baseline", "p95 / 200 ms target", "req/s", "errors"):
        table.add_column(col)
    for r in results:
        table.add_row(r["endpoint"], f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}", f"{r['p95_ms'] / baseline:.1f}",
                      f"{r['p95_ms'] / 200:.2f}", f"{r['rps']:.0f}", str(r["n_errors"]))
    Console().print(table)
    bad = [r["endpoint"] for r in results[1:] if r["p95_ms"] >= 200 or r["n_errors"]]
    print("target p95 < 200 ms: " + ("met" if not bad else "NOT met for " + ", ".join(bad)))
    if any(r["n_errors"] for r in results):
        print("errors:", [r["errors"] for r in results if r["errors"]])


if __name__ == "__main__":
    main()
