"""Reliability run: PostgreSQL restarted while two ingest processes run at full load.

Starts its OWN PostgreSQL cluster (initdb + pg_ctl from /usr/lib/postgresql/*/bin, in a temporary
directory, on a free port; never the shared server) and a private Mosquitto with the broker settings
docs/ingest-reliability.md recommends. Two real ``edgeopt-dashboard ingest`` processes share the
subscription; three publisher processes send pre-built telemetry (1,000 devices) at QoS 1 as fast as the
broker takes it. When a third of the messages is in the database, PostgreSQL is restarted
(``pg_ctl restart -m fast``: every connection terminated; ``-m immediate``: a crash and WAL recovery).
Scenario ``kill9`` also kills one ingest process with SIGKILL while PostgreSQL is down and starts it
again (same data directory, so same slot, client id and broker session) once PostgreSQL is back.

Pass: every device holds seq 1..K exactly once (zero lost, zero duplicated rows); the report also gives
the redeliveries the database dropped as duplicates, the outage, and how long ingest took to catch up.

    .venv/bin/python benchmarks/ingest_faults.py --messages 60000 --scenarios fast,immediate,kill9
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_bench import EXE, free_port, start_publishers  # noqa: E402

BROKER_CONF = ("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
               # What the ingest needs from Mosquitto (docs/ingest-reliability.md): room to queue messages for
               # an ingest session that is away (kill -9, restart) or not acknowledging (database down).
               "max_queued_messages {queue}\nmax_queued_bytes 0\n")


class OwnPostgres:
    """A throw-away PostgreSQL cluster on a free port (run as the postgres user when we are root)."""

    def __init__(self, workdir: Path):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not bins:
            raise SystemExit("no /usr/lib/postgresql/*/bin/pg_ctl: install postgresql")
        self.bin = Path(bins[-1]).parent
        self.dir = workdir / "pg"
        self.port = free_port()
        self.dir.mkdir()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            os.chmod(workdir, 0o755)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync")

    def _run(self, tool: str, *args: str) -> float:
        t0 = time.monotonic()
        subprocess.run([*self.as_user, str(self.bin / tool), *args], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        return time.monotonic() - t0

    def ctl(self, *args: str) -> float:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=50"
        return self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-o", opts, "-w", *args)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/edgeopt"


def start_ingest(url: str, port: int, data: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, EDGEOPT_DATABASE_URL=url, EDGEOPT_DATA_DIR=str(data))
    return subprocess.Popen([EXE, "ingest", "--broker", f"mqtt://127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=open(log, "a"), env=env)


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def run_scenario(scenario: str, messages: int, devices: int, publishers: int, workdir: Path,
                 broker_queue: int = 1_000_000) -> dict:
    import psycopg
    from sqlalchemy import create_engine, text

    from edgeopt.dashboard.db import init_db

    pg = OwnPostgres(workdir)
    pg.ctl("start")
    broker = None
    ingests: list[subprocess.Popen] = []
    try:
        with psycopg.connect(host="127.0.0.1", port=pg.port, user="postgres", dbname="postgres", autocommit=True) as c:
            c.execute("CREATE DATABASE edgeopt")
        init_db(pg.url)
        port = free_port()
        (workdir / "mosquitto.conf").write_text(BROKER_CONF.format(port=port, queue=broker_queue))
        broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c",
                                   str(workdir / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                                  stderr=open(workdir / "mosquitto.log", "w"))
        logs = [workdir / f"ingest{i}.log" for i in range(2)]
        ingests = [start_ingest(pg.url, port, workdir / "data", logs[i]) for i in range(2)]
        wait_for(lambda: all(lg.read_text().count("subscriptions granted") >= 1 for lg in logs), 60, "ingest")
        per_device = messages // devices
        total = per_device * devices
        procs, go, done = start_publishers(port, devices, publishers, per_device)
        engine = create_engine(pg.url, pool_pre_ping=True)
        state = {"count": 0}

        def count() -> int:
            try:
                with engine.connect() as conn:
                    state["count"] = conn.execute(text("SELECT count(*) FROM telemetry_raw")).scalar()
            except Exception:  # noqa: BLE001 - PostgreSQL is down right now
                pass
            return state["count"]

        t0 = time.time()
        go.set()
        wait_for(lambda: count() >= total // 3, 300, "a third of the messages")
        at_restart = state["count"]
        t_down = time.time()
        killed = None
        if scenario == "kill9":
            pg.ctl("stop", "-m", "fast")
            wait_for(lambda: any("unavailable" in lg.read_text() for lg in logs), 30, "the ingest to notice")
            killed = ingests[0]
            killed.kill()
            killed.wait()
            pg.ctl("start")
        else:
            pg.ctl("restart", "-m", scenario)
        t_up = time.time()
        if killed is not None:
            ingests[0] = start_ingest(pg.url, port, workdir / "data", logs[0])
        last, last_change = -1, time.time()
        while count() < total and time.time() - last_change < 60:  # 60 s without progress: loss, reported
            if state["count"] != last:
                last, last_change = state["count"], time.time()
            time.sleep(0.1)
        t_end = time.time() if state["count"] >= total else last_change
        pub_end = max(done.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(30)
        with engine.connect() as conn:
            per_dev = conn.execute(text("SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM telemetry_raw "
                                        "GROUP BY device_pk")).all()
            rows = conn.execute(text("SELECT count(*) FROM telemetry_raw")).scalar()
            distinct = conn.execute(text("SELECT count(*) FROM (SELECT DISTINCT device_pk, seq FROM telemetry_raw) x")).scalar()
            ctrs = dict(conn.execute(text("SELECT reason, count FROM ingest_counters")).all())
            letters = conn.execute(text("SELECT count(*) FROM dead_letters")).scalar()
        engine.dispose()
        for p in ingests:
            p.send_signal(signal.SIGTERM)
        for p in ingests:
            p.wait(60)
        text_logs = "".join(lg.read_text() for lg in logs)
        complete = len(per_dev) == devices and all(r == (per_device, per_device, 1, per_device) for r in per_dev)
        return dict(scenario=scenario, broker_queue=broker_queue, messages=total, rows=rows,
                    duplicate_rows=rows - distinct,
                    zero_loss=complete, redelivered_dropped=int(ctrs.get("duplicate", 0)),
                    rows_at_restart=at_restart, outage_s=round(t_up - t_down, 2),
                    caught_up_after_s=round(t_end - t_up, 2), seconds=round(t_end - t0, 2),
                    publish_seconds=round(pub_end - t0, 2), msg_per_s=round(total / (t_end - t0)),
                    thread_deaths=text_logs.count("died:"), dead_letters=letters,
                    resumed_sessions=text_logs.count("session resumed"),
                    broker_dropped="Outgoing messages are being dropped" in (workdir / "mosquitto.log").read_text())
    finally:
        for p in ingests:
            if p.poll() is None:
                p.kill()
        if broker is not None:
            broker.terminate()
            broker.wait(10)
        try:
            pg.ctl("stop", "-m", "immediate")
        except subprocess.CalledProcessError:
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=60_000)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--publishers", type=int, default=3)
    ap.add_argument("--scenarios", default="fast,immediate,kill9",
                    help="Comma list of: fast, immediate (pg_ctl restart modes), kill9 (stop, kill -9 one ingest, start).")
    ap.add_argument("--broker-queue", type=int, default=1_000_000,
                    help="Mosquitto max_queued_messages (its default, 1000, shows what an unprepared broker drops).")
    args = ap.parse_args()
    results = []
    for scenario in args.scenarios.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            res = run_scenario(scenario, args.messages, args.devices, args.publishers, Path(tmp), args.broker_queue)
        results.append(res)
        print(json.dumps(res), flush=True)
    ok = all(r["zero_loss"] and r["duplicate_rows"] == 0 for r in results)
    print(f"zero lost, zero duplicated in every scenario: {'yes' if ok else 'NO'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
