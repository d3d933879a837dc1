"""Writer throughput on PostgreSQL with a share of NUL-bearing telemetry (issue 9: 1% of them made storage
8x slower: PostgreSQL refuses NUL in text, so whole batches were refused and written again one by one).

The ingest's real writer loop (no broker: the messages are put straight into its queue) drains N
pre-built telemetry messages, of which ``--nul-percent`` carry a NUL in their model name, into a fresh
PostgreSQL database; it reports messages per second and what was counted.

    .venv/bin/python benchmarks/ingest_nul.py --messages 20000 --nul-percent 0 1
"""
from __future__ import annotations

import argparse
import os
import secrets
import threading
import time
from datetime import datetime, timezone


def run(pg_url: str, messages: int, nul_percent: float) -> dict:
    import psycopg
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from edgeopt.dashboard.db import init_db
    from edgeopt.dashboard.ingest import IngestService, IngestSettings
    from edgeopt.dashboard.ingest_writer import Incoming
    from edgeopt.dashboard.simulate import SimDevice

    base = make_url(pg_url)
    name = f"edgeopt_nul_{secrets.token_hex(4)}"
    admin = dict(host=base.host, port=base.port or 5432, user=base.username, dbname="postgres", autocommit=True)
    with psycopg.connect(**admin) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    url = base.set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)
    try:
        init_db(url)
        devs = [SimDevice(f"nul-{i:04d}", fleet="bench", seed=i) for i in range(200)]
        bad = SimDevice("nul-bad", fleet="bench", models=("dig\u0000its",))
        every = int(100 / nul_percent) if nul_percent else 0
        now = datetime.now(timezone.utc)
        items = []
        for k in range(messages):
            d = bad if every and k % every == every - 1 else devs[k % len(devs)]
            items.append(Incoming(d.topic("telemetry"), d.telemetry(requests=20)[0].to_json(), now))
        svc = IngestService(IngestSettings(database_url=url, max_buffer=messages + 1, rollup_every_s=0))
        for it in items:
            svc.queue.put(it)
        run_loop = svc.loop.run if hasattr(svc, "loop") else svc._write_loop  # before/after the fix
        t0 = time.perf_counter()
        t = threading.Thread(target=run_loop, daemon=True)
        t.start()
        while not svc.queue.empty() or (getattr(getattr(svc, "loop", None), "items", None) is not None):
            time.sleep(0.01)
        svc.stop_event.set()
        t.join(120)
        seconds = time.perf_counter() - t0
        with svc.engine.connect() as conn:
            ctrs = dict(conn.execute(text("SELECT reason, count FROM ingest_counters")).all())
        svc.engine.dispose()
        return dict(nul_percent=nul_percent, messages=messages, seconds=round(seconds, 2),
                    msg_per_s=round(messages / seconds), counters=ctrs)
    finally:
        with psycopg.connect(**admin) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pg-url", default=os.environ.get("EDGEOPT_TEST_POSTGRES_URL",
                                                       "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--nul-percent", type=float, nargs="+", default=[0.0, 1.0])
    args = ap.parse_args()
    for pct in args.nul_percent:
        print(run(args.pg_url, args.messages, pct), flush=True)


if __name__ == "__main__":
    main()
