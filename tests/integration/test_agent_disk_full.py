"""`edgeopt-agent` as a real process with its state directory on a small tmpfs that fills up to the last
byte while the broker is away and the outbox grows: inference goes on, the outbox drops its oldest
messages (counted in telemetry), and once space and the broker return everything resumes by itself."""
from __future__ import annotations

import http.client
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from agent_support import Broker, Subscriber, agent_test_fixtures, free_port, infer, wait_for
from edgeopt.agent.config import render_config

_fx = agent_test_fixtures()
make_package = _fx.make_package
agent_keys = _fx.agent_keys

_spec = importlib.util.spec_from_file_location("edgeopt_test_smallfs",
                                               Path(__file__).resolve().parents[1] / "agent" / "smallfs.py")
smallfs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smallfs)

AGENT = [sys.executable, "-m", "edgeopt.agent.daemon"]


def _gauge(port: int, name: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


@smallfs.needs_mount
def test_outbox_on_a_full_state_disk_drops_oldest_and_recovers(tmp_path, agent_keys, make_package, digits_heldout):
    from edgeopt.agent.config import load_config
    from edgeopt.agent.installer import Installer
    from edgeopt.agent.store import Store

    x = np.load(digits_heldout)["images"][:1]
    api_port, broker_port = free_port(), free_port()
    with smallfs.small_filesystem(tmp_path / "state", 48) as state:
        config_path = tmp_path / "agent.toml"
        config_path.write_text(render_config(device_id="full-1", fleet="itest",
                                             broker=f"mqtt://127.0.0.1:{broker_port}", state_dir=state,
                                             trusted_keys=[agent_keys.trusted_public], api_port=api_port,
                                             telemetry_interval_s=0.1))
        config = load_config(config_path)
        Installer(Store(state), config).install_file(make_package("1.0.0"))
        proc = subprocess.Popen(AGENT + ["--config", str(config_path)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        broker = sub = None
        try:
            def ready():
                if proc.poll() is not None:
                    raise AssertionError(f"agent exited: {proc.stderr.read()[-2000:]}")
                try:
                    return infer(("127.0.0.1", api_port), x)[0] == 200
                except OSError:
                    return False

            wait_for(ready, 60, what="the agent's API")
            wait_for(lambda: _gauge(api_port, "edgeopt_outbox_pending") >= 5, 30, what="telemetry in the outbox")
            filler = smallfs.fill(state)  # the broker is away and the disk is now full to the last byte
            wait_for(lambda: _gauge(api_port, "edgeopt_outbox_dropped") >= 5, 60, what="drops counted")
            assert _gauge(api_port, "edgeopt_outbox_disk_full") == 1
            held = _gauge(api_port, "edgeopt_outbox_pending")
            for _ in range(20):  # inference does not notice
                code, body = infer(("127.0.0.1", api_port), x)
                assert code == 200 and body["model_version"] == "1.0.0"
            dropped = _gauge(api_port, "edgeopt_outbox_dropped")
            wait_for(lambda: _gauge(api_port, "edgeopt_outbox_dropped") >= dropped + 10, 60, what="more drops")
            assert _gauge(api_port, "edgeopt_outbox_pending") <= held  # it stopped growing

            filler.unlink()  # space returns, then the broker
            broker = Broker(tmp_path / "broker", port=broker_port).start()
            sub = Subscriber("127.0.0.1", broker_port, "itest", "full-1")
            reported = wait_for(lambda: [p for p in sub.of("telemetry") if p.dropped > 0], 60,
                                what="telemetry reporting the drops")
            assert reported[-1].dropped >= dropped
            wait_for(lambda: _gauge(api_port, "edgeopt_outbox_pending") < 5, 60, what="the outbox drained")
            wait_for(lambda: _gauge(api_port, "edgeopt_outbox_disk_full") == 0, 30, what="the outbox to recover")
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            if sub is not None:
                sub.close()
            if broker is not None:
                broker.stop()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "no space left on the device" in err and "the disk has room again" in err
