"""Dashboard pages under load: fleet overview, device list and a 24 h device chart with 10,000 devices and
10 million raw telemetry rows in PostgreSQL, measured against the real server (``edgeopt-dashboard serve``,
waitress) with a small threaded HTTP load client (keep-alive connections, Bearer token).

    .venv/bin/python benchmarks/dashboard_pages.py --devices 10000 --raw-rows 10000000 --requests 300
    (needs PostgreSQL: --pg-url, default $EDGEOPT_TEST_POSTGRES_URL or postgresql+psycopg://postgres@127.0.0.1:5432/test)

Seeding is done server-side with ``generate_series`` (10 M raw rows take a few minutes). One-minute
and one-hour rollups are generated for the first ``--chart-devices`` devices (24 h of 1-minute buckets,
30 days of hourly ones) and fleet rollups for the whole fleet: the pages read those, not the raw rows.
The baseline is ``/healthz`` (one ``SELECT 1``) measured in the same run; the table shows each page's
p50/p95 and its p95 as a multiple of the baseline's. Target: every page under 200 ms at p95.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
HIST = [0, 0, 0, 0, 0, 0, 0, 2, 6, 14, 22, 18, 12, 8, 6, 4, 3, 2, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]


def pg_admin(url: str):
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return psycopg.connect(host=u.host or "127.0.0.1", port=u.port or 5432, user=u.username or "postgres",
                           password=u.password, dbname=u.database or "postgres", autocommit=True)


def seed(url: str, devices: int, raw_rows: int, chart_devices: int) -> float:
    """Fill the database server-side; returns seconds taken."""
    t0 = time.perf_counter()
    from sqlalchemy.orm import Session

    from edgeopt.dashboard import histograms, partitions
    from edgeopt.dashboard.db import make_engine
    from edgeopt.sdk.telemetry import Histogram, legacy_to_bins

    # The same shape as before schema 1.1, spread over the DDSketch keys and stored packed.
    bins = legacy_to_bins(HIST)
    hist = "\\x" + histograms.pack(Histogram(bins)).hex()
    fleet_hist = "\\x" + histograms.pack(Histogram({k: c * 10000 for k, c in bins.items()})).hex()
    engine = make_engine(url)
    with Session(engine) as s, s.begin():
        if partitions.is_partitioned(s):  # PostgreSQL: days of the seeded range, as the rollup job makes them
            now = datetime.now(timezone.utc)
            partitions.ensure_range(s, now - timedelta(seconds=10 * max(1, raw_rows // devices) + 86400), now)
    engine.dispose()
    per_device = max(1, raw_rows // devices)
    with pg_admin(url) as c:
        c.execute("""
            INSERT INTO devices (device_id, fleet, status, offline_reason, status_changed_at, last_seen, first_seen,
                                 agent_version, capabilities, profile, last_p95_ms, last_cpu_percent, last_rss_bytes,
                                 telemetry_interval_s, session_id)
            SELECT 'dev-' || lpad(i::text, 5, '0'), 'bench',
                   CASE WHEN i %% 10 = 0 THEN 'offline' ELSE 'online' END,
                   CASE WHEN i %% 10 = 0 THEN 'will' END, now() - interval '1 hour', now(), now() - interval '30 days',
                   '0.1.0', '{"cpu_flags": ["avx2"]}'::json, (ARRAY['cpu','igpu','npu','gpu','arm'])[1 + i %% 5],
                   (i %% 997) * 0.1, (i %% 100)::float, 200000000 + i, 10, 's1'
            FROM generate_series(1, %s) AS i""", (devices,))
        c.execute("""INSERT INTO installed_packages (device_pk, name, version, profile, runtime, updated_at)
                     SELECT id, 'digits', '1.0.' || (id % 3), profile, 'onnxruntime', now() FROM devices""")
        c.execute("""INSERT INTO device_groups (name, description, created_at)
                     SELECT 'line-' || g, '', now() FROM generate_series(0, 9) g""")
        c.execute("""INSERT INTO device_group_members (group_id, device_pk, source)
                     SELECT g.id, d.id, 'agent' FROM devices d JOIN device_groups g ON g.name = 'line-' || (d.id % 10)""")
        # Raw telemetry, in chunks of devices so progress shows and no single statement runs for minutes.
        step = max(1, devices // 20)
        for lo in range(1, devices + 1, step):
            c.execute(f"""
                INSERT INTO telemetry_raw (device_pk, model, model_version, ts, session_id, seq, interval_s, requests,
                                           errors, throughput_ips, hist_counts, hist_sum_ms, p50_ms, p95_ms, p99_ms,
                                           queue_depth, batch_sizes, cpu_percent, rss_bytes)
                SELECT d.id, 'digits', '1.0.0', now() - (k * 10) * interval '1 second', 's1', k, 10, 100, 0, 10,
                       '{hist}'::bytea, 500, 4.2, 9.5, 14.0, 0, '{{"1": 100}}'::json, 30, 200000000
                FROM devices d CROSS JOIN generate_series(1, %s) AS k
                WHERE d.id BETWEEN %s AND %s""", (per_device, lo, lo + step - 1))
            print(f"  raw rows: devices {lo}..{min(devices, lo + step - 1)}", file=sys.stderr, flush=True)
        for table, n, unit in (("rollup_1m", 1440, "minute"), ("rollup_1h", 720, "hour")):
            c.execute(f"""
                INSERT INTO {table} (device_pk, model, bucket_start, requests, errors, samples, hist_counts,
                                     hist_sum_ms, cpu_avg, rss_avg, queue_depth_max, batch_sizes)
                SELECT d.id, 'digits', date_trunc('{unit}', now()) - k * interval '1 {unit}', 600, 0, 6,
                       '{hist}'::bytea, 3000, 30, 200000000, 1, '{{"1": 600}}'::json
                FROM devices d CROSS JOIN generate_series(0, %s) AS k WHERE d.id <= %s""", (n - 1, chart_devices))
        for res, n, unit in (("1m", 2880, "minute"), ("1h", 720, "hour")):
            c.execute(f"""
                INSERT INTO fleet_rollup (resolution, model, bucket_start, devices, requests, errors, hist_counts,
                                          hist_sum_ms)
                SELECT '{res}', 'digits', date_trunc('{unit}', now()) - k * interval '1 {unit}', %s, 6000000, 0,
                       '{fleet_hist}'::bytea, 30000000
                FROM generate_series(0, %s) AS k""", (devices, n - 1))
        c.execute("ANALYZE")
        count = c.execute("SELECT count(*) FROM telemetry_raw").fetchone()[0]
    print(f"  seeded {devices} devices, {count} raw rows", file=sys.stderr)
    return time.perf_counter() - t0


def load(port: int, token: str, path: str, requests: int, concurrency: int) -> list[float]:
    """Latencies (ms) of ``requests`` GETs spread over ``concurrency`` keep-alive connections."""
    out: list[float] = []
    lock = threading.Lock()
    per = [requests // concurrency + (1 if i < requests % concurrency else 0) for i in range(concurrency)]

    def worker(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        for _ in range(n):
            t = time.perf_counter()
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{path}: HTTP {resp.status}")
            mine.append((time.perf_counter() - t) * 1000)
        conn.close()
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=worker, args=(n,)) for n in per]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20)[18]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg-url", default=os.environ.get("EDGEOPT_TEST_POSTGRES_URL",
                                                      "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--raw-rows", type=int, default=10_000_000)
    ap.add_argument("--chart-devices", type=int, default=100)
    ap.add_argument("--requests", type=int, default=300, help="requests per page")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--threads", type=int, default=8, help="waitress threads")
    ap.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table
    from sqlalchemy.engine import make_url

    from edgeopt.dashboard.db import init_db

    name = f"edgeopt_pages_{secrets.token_hex(4)}"
    with pg_admin(args.pg_url) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    url = make_url(args.pg_url).set(drivername="postgresql+psycopg", database=name).render_as_string(False)
    server = None
    try:
        init_db(url)
        print(f"seeding {name} ...", file=sys.stderr)
        seed_s = seed(url, args.devices, args.raw_rows, args.chart_devices)
        env = dict(os.environ, EDGEOPT_DATABASE_URL=url, EDGEOPT_DATA_DIR=tempfile.mkdtemp(prefix="pages-bench-"))
        subprocess.run([BIN / "edgeopt-dashboard", "create-user", "bench", "--role", "viewer", "--password",
                        "bench-password"], env=env, check=True, capture_output=True)
        token = json.loads(subprocess.run([BIN / "edgeopt-dashboard", "create-token", "bench", "--json"], env=env,
                                          check=True, capture_output=True, text=True).stdout)["token"]
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([BIN / "edgeopt-dashboard", "serve", "--port", str(port), "--threads",
                                   str(args.threads)], env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/healthz")
                break
            except OSError:
                time.sleep(0.2)
        dev = "dev-00042"
        pages = [("baseline: /healthz", "/healthz"),
                 ("fleet overview (page)", "/fleet"),
                 ("fleet overview (API)", "/api/v1/fleet"),
                 ("fleet latency 24 h (API)", "/api/v1/fleet/series?range=24h"),
                 ("device list, page 1 (page)", "/devices"),
                 ("device list, page 120 by p95 (API)", "/api/v1/devices?page=120&sort=p95&order=desc"),
                 ("device list, search + filter (API)", "/api/v1/devices?q=dev-0004&status=online&profile=npu"),
                 ("device detail (page)", f"/devices/{dev}"),
                 ("device chart 24 h (API)", f"/api/v1/devices/{dev}/series?range=24h"),
                 ("device chart 1 h, raw rows (API)", f"/api/v1/devices/{dev}/series?range=1h")]
        results = []
        for label, path in pages:
            load(port, token, path, 10, 2)  # warm-up
            lat = load(port, token, path, args.requests, args.concurrency)
            results.append((label, path, statistics.median(lat), p95(lat)))
        base = results[0][3]
        table = Table(title=f"Dashboard pages: {args.devices} devices, {args.raw_rows:,} raw rows, PostgreSQL, "
                            f"{args.requests} requests x {args.concurrency} connections (seeded in {seed_s:.0f} s)")
        for col in ("page", "p50 ms", "p95 ms", "p95 / baseline p95", "< 200 ms p95"):
            table.add_column(col, justify="left" if col == "page" else "right")
        ok = True
        for label, _path, med, q95 in results:
            passed = q95 < 200
            ok &= passed
            table.add_row(label, f"{med:.1f}", f"{q95:.1f}", f"{q95 / base:.1f}x", "yes" if passed else "NO")
        Console().print(table)
        return 0 if ok else 1
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        if not args.keep:
            with pg_admin(args.pg_url) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    sys.exit(main())
