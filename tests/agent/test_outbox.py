"""The on-disk outbox: order, acks, bound with counted drops, persistence across reopen (real SQLite)."""
from __future__ import annotations

import contextlib
import sqlite3
import threading

from edgeopt.agent.outbox import FILENAME, Outbox


def test_messages_come_out_in_order_until_acked(tmp_path):
    box = Outbox(tmp_path)
    ids = [box.put("t/a", f"m{i}".encode()) for i in range(5)]
    assert [m.payload for m in box.peek(10)] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert [m.id for m in box.peek(2, after_id=ids[1])] == ids[2:4]
    box.ack(ids[:2])
    assert len(box) == 3
    assert [m.payload for m in box.peek(10)] == [b"m2", b"m3", b"m4"]
    box.close()


def test_survives_reopen(tmp_path):
    box = Outbox(tmp_path)
    box.put("t/a", b"kept", qos=1, retain=True)
    box.close()
    again = Outbox(tmp_path)
    (msg,) = again.peek(10)
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == ("t/a", b"kept", 1, True)
    assert len(again) == 1
    again.close()
    with contextlib.closing(sqlite3.connect(tmp_path / FILENAME)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_bounded_drops_oldest_and_counts(tmp_path):
    box = Outbox(tmp_path, max_messages=10)
    for i in range(25):
        box.put("t", str(i).encode())
    assert len(box) == 10
    assert box.dropped == 15
    assert [m.payload for m in box.peek(100)] == [str(i).encode() for i in range(15, 25)]
    box.close()
    again = Outbox(tmp_path, max_messages=10)
    assert again.dropped == 0  # the telemetry figure counts this process's drops
    assert again.dropped_total == 15
    again.close()


def test_concurrent_writers_lose_nothing(tmp_path):
    box = Outbox(tmp_path)

    def writer(k: int):
        for i in range(50):
            box.put("t", f"{k}-{i}".encode())

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    payloads = [m.payload.decode() for m in box.peek(1000)]
    assert len(payloads) == 200 == len(box)
    for k in range(4):  # each writer's messages stay in its own order
        mine = [p for p in payloads if p.startswith(f"{k}-")]
        assert mine == [f"{k}-{i}" for i in range(50)]
    box.close()
