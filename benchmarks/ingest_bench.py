"""Ingest throughput and CPU per message: telemetry through Mosquitto into PostgreSQL, one and two ingest processes.

Queue-drain method: a private Mosquitto runs on a free port; for each configuration a fresh PostgreSQL
database is created and N ``edgeopt-dashboard ingest`` processes (the real console script, fixed client
ids, shared subscription, persistent sessions) subscribe and are killed (-9, so the sessions stay). Several
paho publisher processes (QoS 1) then publish pre-built telemetry payloads (the contracts'
TelemetryPayload, one model, DDSketch histogram) into those sessions; once every PUBACK is in, ingest
starts again under the same ids and drains the queue. The clock runs from that start to the moment the
last row is in the database, so the publishers are not the limit. Zero loss is checked by sequence
numbers: every device must have exactly seq 1..K once. Ingest CPU is the ingest processes' own user+system
time (psutil) minus their start-up (measured on the priming start), per stored message. ``--profile N``
adds one two-process run under cProfile in every thread (benchmarks/profiled_ingest.py) and prints the N
functions with the most CPU of their own.

    .venv/bin/python benchmarks/ingest_bench.py --messages 60000 --repeats 3 --profile 25
    (needs PostgreSQL: --pg-url, default $EDGEOPT_TEST_POSTGRES_URL or
     postgresql+psycopg://postgres@127.0.0.1:5432/test)

Prints a table of medians; target: two processes, zero loss, zero duplicates, ingest CPU <= 100 us/msg.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("edgeopt-dashboard"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(workdir: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    # Unlimited queues: a slow consumer must show up as time, never as dropped messages.
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 0\nmax_inflight_messages 0\nmax_queued_bytes 0\n")
    proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def publisher(port: int, first_device: int, n_devices: int, per_device: int, ready, go, done) -> None:
    """One load-generator process: builds its payloads, then publishes them as fast as it can (QoS 1)."""
    from edgeopt.dashboard.simulate import Publisher, SimDevice

    devs = [SimDevice(f"bench-{first_device + i:05d}", fleet="bench", seed=first_device + i)
            for i in range(n_devices)]
    # One payload per device, reused with a new seq: building 60k pydantic payloads would dominate.
    base = {d.device_id: d.telemetry(requests=40, interval_s=10)[0] for d in devs}
    msgs = []
    for k in range(1, per_device + 1):
        for d in devs:
            p = base[d.device_id].model_copy(update={"seq": k})
            msgs.append((d.topic("telemetry"), p.to_json()))
    pub = Publisher("127.0.0.1", port)
    ready.release()
    go.wait()
    for topic, payload in msgs:
        pub.publish(topic, payload)
    pub.wait_acked(600)
    done.put(time.time())
    pub.close()



def start_publishers(port: int, devices: int, publishers: int, per_device: int):
    """Fork ``publishers`` processes splitting ``devices`` between them; return (processes, go event, done queue)
    once every one is connected and waiting for ``go``."""
    ctx = mp.get_context("fork")
    ready, go, done = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    share = devices // publishers
    procs = [ctx.Process(target=publisher, args=(port, i * share, share if i < publishers - 1
                                                 else devices - i * share, per_device, ready, go, done))
             for i in range(publishers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()
    return procs, go, done

def run_once(pg_url: str, n_ingest: int, messages: int, devices: int, publishers: int, workdir: Path,
             batch_size: int, flush_ms: int, profile_dir: Path | None = None) -> dict:
    import psycopg
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from edgeopt.dashboard.db import init_db

    base = make_url(pg_url)
    name = f"edgeopt_bench_{secrets.token_hex(4)}"
    admin = dict(host=base.host, port=base.port or 5432, user=base.username, dbname=base.database or "postgres",
                 autocommit=True)
    with psycopg.connect(**admin) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    url = base.set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)
    broker = ingests = None
    try:
        init_db(url)
        broker, port = start_broker(workdir)
        env = dict(os.environ, EDGEOPT_DATABASE_URL=url)
        ids = [f"bench-ingest-{i}" for i in range(n_ingest)]

        def start_ingest(tag: str) -> list[subprocess.Popen]:
            procs = []
            for i in range(n_ingest):
                argv = [EXE] if profile_dir is None or tag == "prime" else [
                    sys.executable, str(ROOT / "benchmarks" / "profiled_ingest.py"),
                    str(profile_dir / f"ingest{n_ingest}-{i}.prof")]
                log = open(workdir / f"ingest{i}-{tag}.log", "w")
                procs.append(subprocess.Popen(
                    argv + ["ingest", "--broker", f"mqtt://127.0.0.1:{port}", "--rollup-every", "0",
                            "--client-id", ids[i], "--batch-size", str(batch_size), "--flush-ms", str(flush_ms)],
                    stdout=subprocess.DEVNULL, stderr=log, env=env))
            return procs

        def wait_subscribed(tag: str) -> None:
            deadline = time.monotonic() + 60
            while any((workdir / f"ingest{i}-{tag}.log").read_text().count("subscriptions granted") < 1
                      for i in range(n_ingest)):
                if time.monotonic() > deadline:
                    raise RuntimeError("ingest did not subscribe")
                time.sleep(0.05)

        def cpu(procs) -> float:
            return sum(sum(psutil.Process(p.pid).cpu_times()[:2]) for p in procs)

        import psutil

        per_device = messages // devices
        total = per_device * devices
        # Queue-drain: the ingest processes first create their persistent sessions (shared subscription,
        # session expiry 3600 s) and are killed (-9, so the sessions stay); every message is then published
        # into those sessions, and only then does ingest start again under the same client ids and drain
        # the queue. The publishers are thus not the limit, and the clock and the CPU time are ingest's own.
        ingests = start_ingest("prime")
        wait_subscribed("prime")
        # Start-up CPU (imports, connect, subscribe) with nothing to do: subtracted from the drain run's
        # CPU so the figure is per-message work. Measured on the priming start, the same code path.
        startup_cpu = cpu(ingests)
        for p in ingests:
            p.kill()
            p.wait(30)
        procs, go, done = start_publishers(port, devices, publishers, per_device)
        cpu0_broker = sum(psutil.Process(broker.pid).cpu_times()[:2])
        t_pub = time.time()
        go.set()
        pub_end = max(done.get(timeout=600) for _ in procs)
        for p in procs:
            p.join(30)
        engine = create_engine(url)
        t0 = time.time()
        ingests = start_ingest("drain")
        count, last_change, last_count = 0, time.time(), -1
        with engine.connect() as conn:
            # Stop waiting when nothing new arrived for 30 s: that is loss (reported), not slowness.
            while count < total and time.time() - last_change < 30:
                time.sleep(0.05)
                count = conn.execute(text("SELECT count(*) FROM telemetry_raw")).scalar()
                if count != last_count:
                    last_change, last_count = time.time(), count
            t_end = time.time() if count >= total else last_change
            cpu_ingest = cpu(ingests) - startup_cpu
            per_dev = conn.execute(text(
                "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM telemetry_raw GROUP BY device_pk")).all()
            dupes = conn.execute(text("SELECT coalesce(sum(count), 0) FROM ingest_counters "
                                      "WHERE reason = 'duplicate'")).scalar()
        engine.dispose()
        cpu_broker = sum(psutil.Process(broker.pid).cpu_times()[:2]) - cpu0_broker
        complete = (len(per_dev) == devices and all(r == (per_device, per_device, 1, per_device) for r in per_dev))
        for p in ingests:
            p.send_signal(signal.SIGTERM)
        for p in ingests:
            p.wait(30)
        split = []
        for i in range(n_ingest):
            line = [ln for ln in (workdir / f"ingest{i}-drain.log").read_text().splitlines() if "ingest stopped:" in ln]
            kv = dict(x.split("=") for x in line[-1].split("ingest stopped: ")[1].split()) if line else {}
            split.append(int(kv.get("telemetry", 0)))
        # Rates and CPU per *stored* message (one model per payload: one row each), so a run that loses
        # messages cannot look fast.
        return {"ingest": n_ingest, "messages": total, "rows": count, "seconds": t_end - t0,
                "publish_seconds": pub_end - t_pub, "startup_cpu_s": startup_cpu,
                "msg_per_s": count / (t_end - t0), "zero_loss": complete,
                "duplicates": dupes, "split": split, "ingest_cpu_us_per_msg": cpu_ingest / max(count, 1) * 1e6,
                "broker_cpu_us_per_msg": cpu_broker / total * 1e6}
    finally:
        for p in ingests or []:
            if p.poll() is None:
                p.kill()
        if broker is not None:
            broker.terminate()
            broker.wait(10)
        with psycopg.connect(**admin) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pg-url", default=os.environ.get("EDGEOPT_TEST_POSTGRES_URL",
                                                       "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--messages", type=int, default=60_000, help="Telemetry messages per run.")
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--publishers", type=int, default=3, help="Load-generator processes.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--flush-ms", type=int, default=200)
    ap.add_argument("--profile", type=int, default=25, metavar="N",
                    help="After the timed runs, one more two-process run under cProfile (every thread); print "
                         "its N most expensive functions by own time (0: no profile run).")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    results: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for n in (1, 2):
                res = run_once(args.pg_url, n, args.messages, args.devices, args.publishers, Path(tmp),
                               args.batch_size, args.flush_ms)
                results[n].append(res)
                print(f"run {r + 1}/{args.repeats} ingest={n}: {res['msg_per_s']:.0f} msg/s "
                      f"({res['messages']} in {res['seconds']:.2f} s, publish {res['publish_seconds']:.2f} s), "
                      f"zero loss={res['zero_loss']}, duplicates={res['duplicates']}, split={res['split']}, "
                      f"ingest CPU {res['ingest_cpu_us_per_msg']:.0f} us/msg, broker CPU "
                      f"{res['broker_cpu_us_per_msg']:.0f} us/msg",
                      flush=True)
    med = {n: statistics.median(x["msg_per_s"] for x in v) for n, v in results.items()}
    table = Table(title=f"Ingest into PostgreSQL, {args.messages} telemetry msgs, {args.devices} devices, "
                        f"{args.publishers} publishers, medians of {args.repeats}")
    for col in ("ingest processes", "msg/s (median)", "ratio vs one", "zero loss (all runs)", "duplicates",
                "ingest CPU us/msg"):
        table.add_column(col)
    for n in (1, 2):
        table.add_row(str(n), f"{med[n]:.0f}", f"{med[n] / med[1]:.2f}",
                      str(all(x["zero_loss"] for x in results[n])), str(sum(x["duplicates"] for x in results[n])),
                      f"{statistics.median(x['ingest_cpu_us_per_msg'] for x in results[n]):.0f}")
    Console().print(table)
    cpu2 = statistics.median(x["ingest_cpu_us_per_msg"] for x in results[2])
    ok = (cpu2 <= 100 and all(x["zero_loss"] for v in results.values() for x in v)
          and not any(x["duplicates"] for v in results.values() for x in v))
    print(f"target: two processes, zero loss, zero duplicates, ingest CPU <= 100 us/msg: "
          f"{'met' if ok else 'NOT met'} ({cpu2:.0f} us/msg; load average {os.getloadavg()})")
    if args.profile:
        import pstats
        with tempfile.TemporaryDirectory() as tmp:
            prof_dir = Path(tmp) / "prof"
            prof_dir.mkdir()
            res = run_once(args.pg_url, 2, args.messages, args.devices, args.publishers, Path(tmp),
                           args.batch_size, args.flush_ms, profile_dir=prof_dir)
            print(f"profiled run (cProfile slows it): {res['msg_per_s']:.0f} msg/s, zero loss={res['zero_loss']}")
            files = sorted(str(f) for f in prof_dir.glob("*.prof"))
            if not files:
                print("no profile written (did ingest exit cleanly on SIGTERM?)")
                return
            stats = pstats.Stats(*files)
            print(f"two ingest processes, {res['messages']} messages: functions by own time "
                  f"(tottime s; per message = tottime / {res['messages']})")
            stats.sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
