"""A full disk under the agent's state directory, for real: a small tmpfs, filled by a filler file.

Installs: whenever the disk fills up (before the install, during the download, the extraction, the journal
write, the switch), the install fails with one clear error, the previous version keeps serving over HTTP,
nothing half-written is left, and the same install succeeds once space is back.
Outbox: growing into a small disk it stops growing and drops its oldest messages (counted); filled to the
last byte by another program it never raises, keeps the newest, and recovers by itself.
"""
from __future__ import annotations

import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from edgeopt.agent import installer as installer_module
from edgeopt.agent.installer import Installer
from edgeopt.agent.outbox import BALLAST_BYTES, LOW_SPACE_BYTES, Outbox
from edgeopt.agent.server import InferenceServer, ModelRegistry
from edgeopt.agent.store import Store
from edgeopt.sdk.errors import EdgeoptError
from edgeopt.sdk.package import sha256_file

from smallfs import fill, free_bytes, needs_mount, small_filesystem  # noqa: E402  (same folder)


def _leftovers(root: Path) -> list[str]:
    """What a failed install must not leave: staging content, temporary and partial files, the journal."""
    found = [p for p in root.rglob("*") if p.name.endswith((".tmp", ".part", ".eopkg")) or p.name == "journal.json"]
    found += list((root / "staging").iterdir()) + list((root / "trash").iterdir())
    return sorted(str(p.relative_to(root)) for p in found)


class Serving:
    """The installer's on_switch feeding a real InferenceServer, as in the daemon."""

    def __init__(self):
        self.registry = ModelRegistry()
        self.server = InferenceServer(self.registry, "127.0.0.1", 0).start()

    def on_switch(self, model, loaded) -> None:
        self.registry.swap(model.name, model.version, loaded, model.manifest)

    def version(self) -> str:
        conn = http.client.HTTPConnection(*self.server.address, timeout=30)
        body = json.dumps({"inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                       "data": np.zeros(64).tolist()}]})
        conn.request("POST", "/v2/models/digits/infer", body=body)
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        conn.close()
        assert resp.status == 200, doc
        return doc["model_version"]

    def close(self) -> None:
        self.server.stop()
        self.registry.close()


class _Files(BaseHTTPRequestHandler):
    """Serves one package file (no Content-Length checks on our side: the agent must cope)."""
    path_to_serve: Path

    def do_GET(self):  # noqa: N802
        data = self.path_to_serve.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@needs_mount
@pytest.mark.parametrize("when", ["before", "download", "extract", "journal", "switch"])
def test_install_on_a_full_disk_fails_cleanly_and_the_old_version_serves(when, tmp_path, agent_config, events,
                                                                         make_package, monkeypatch):
    v1, v2 = make_package("1.0.0"), make_package("1.1.0")
    with small_filesystem(tmp_path / "state", 48) as root:
        config = agent_config(state_dir=str(root))
        serving = Serving()
        inst = Installer(Store(root), config, on_event=events, on_switch=serving.on_switch)
        try:
            inst.install_file(v1)
            assert serving.version() == "1.0.0"
            events.clear()
            fillers: list[Path] = []

            def fill_now() -> None:
                fillers.append(fill(root))

            if when == "before":
                fill_now()
            elif when == "extract":  # the disk fills between the free-space check and the extraction
                check = Installer._check_disk_space
                monkeypatch.setattr(Installer, "_check_disk_space", lambda self, m: (check(self, m), fill_now()))
            elif when in ("journal", "switch"):
                point = {"journal": "after_extract", "switch": "before_switch"}[when]
                real = installer_module.crash_point
                monkeypatch.setattr(installer_module, "crash_point",
                                    lambda name: fill_now() if name == point else real(name))
            with pytest.raises(EdgeoptError) as err:
                if when == "download":
                    fillers.append(fill(root, leave=16 * 1024))  # less than the package: ENOSPC mid-download
                    _Files.path_to_serve = v2
                    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
                    threading.Thread(target=httpd.serve_forever, daemon=True).start()
                    try:
                        inst.install_url(f"http://127.0.0.1:{httpd.server_port}/v2.eopkg", sha256_file(v2))
                    finally:
                        httpd.shutdown()
                else:
                    inst.install_file(v2)
            message = err.value.one_line()
            if when == "before":
                assert message.startswith(f"not enough disk space in {root}: the package needs ")
            else:
                doing = {"download": "downloading http://127.0.0.1:", "extract": "extracting digits 1.1.0",
                         "journal": "installing digits 1.1.0 (journal)",
                         "switch": "installing digits 1.1.0 (switch)"}[when]
                assert message.startswith(f"no space left on the device of {root}"), message
                assert f" while {doing}" in message and "bytes free)" in message, message
            failures = [e for e in events if not e["ok"]]
            assert len(failures) == 1, events.kinds()  # one error, not a cascade
            assert failures[0]["version"] in ("1.1.0", None) and "space" in failures[0]["message"]
            assert _leftovers(root) == []
            assert inst.store.versions("digits") == ["1.0.0"] and inst.store.current("digits").version == "1.0.0"
            assert serving.version() == "1.0.0"  # the previous version kept serving throughout
            monkeypatch.undo()
            for f in fillers:  # space comes back: the same install now succeeds
                f.unlink()
            inst.install_file(v2)
            assert serving.version() == "1.1.0"
        finally:
            serving.close()


@needs_mount
def test_outbox_growing_into_a_small_disk_stops_growing_and_drops_the_oldest(tmp_path):
    with small_filesystem(tmp_path / "state", 24) as root:
        box = Outbox(root, max_messages=1_000_000)
        payload = bytes(1500)
        ids = []
        while box.dropped == 0:
            assert len(ids) < 30_000, "the outbox never noticed the disk running low"
            ids.append(box.put("t", payload))
        held = len(box)
        assert None not in ids  # nothing new was refused: the oldest made room
        for _ in range(3000):
            ids.append(box.put("t", payload))
        assert None not in ids and len(box) == held  # it stopped growing...
        assert box.dropped == box.dropped_disk_full == len(ids) - held  # ...and counted every message it dropped
        assert [m.id for m in box.peek(held)][-1] == ids[-1]  # the newest are the ones kept
        assert free_bytes(root) > LOW_SPACE_BYTES // 2  # room left for everything else on that disk
        # the broker comes back and takes everything; at the next outage the outbox holds as many again
        box.ack([m.id for m in box.peek(held)])
        assert len(box) == 0
        more = [box.put("t", payload) for _ in range(held)]
        assert None not in more and len(box) == held
        box.close()
        reopened = Outbox(root)
        assert reopened.dropped_total == len(ids) - held
        reopened.close()


@needs_mount
def test_outbox_on_a_disk_filled_by_another_program_keeps_the_newest_and_recovers(tmp_path, caplog):
    with small_filesystem(tmp_path / "state", 32) as root:
        box = Outbox(root, max_messages=1_000_000)
        assert box.ballast.stat().st_size == BALLAST_BYTES
        first = [box.put("t", bytes(1000)) for _ in range(500)]
        filler = fill(root)  # to the last byte
        assert free_bytes(root) < 4096
        later = [box.put("t", f"new-{i}".encode() + bytes(1000)) for i in range(2000)]
        assert None not in first + later  # never an exception, never the newest dropped
        assert not box.ballast.exists()  # spent to get SQLite out of the full disk
        kept = box.peek(100_000)
        assert kept[-1].id == later[-1] and kept[-1].payload.startswith(b"new-1999")
        assert box.dropped >= 500 and box.disk_full
        # acks while full cannot be written: kept and applied later
        box.ack([m.id for m in kept[:10]])
        assert [m.id for m in box.peek(5)] == [m.id for m in kept[10:15]]
        filler.unlink()  # space returns
        box._ballast_checked = 0.0  # skip the ten-second wait before the ballast is put back
        assert box.put("t", b"after") is not None
        assert not box.disk_full and box.ballast.stat().st_size == BALLAST_BYTES
        assert "no space left on the device" in caplog.text and "the disk has room again" in caplog.text
        box.close()
