"""The README's first command, run for real: scripts/demo.sh --smoke.

It packages the digits model twice (1.0.0 and 1.1.0), creates the SQLite dashboard, installs the package on a
local agent, starts agent + ingest + web + traffic against the real Mosquitto, waits until the dashboard's
API shows the device online with telemetry, uploads both packages, and stops.
"""
import os
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_smoke(tmp_path):
    env = dict(os.environ, EDGEOPT_DEMO_DIR=str(tmp_path / "demo"), EDGEOPT_DEMO_WEB_PORT=str(_free_port()),
               EDGEOPT_DEMO_API_PORT=str(_free_port()))
    out = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), "--smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=580)
    log = out.stdout[-4000:] + out.stderr[-4000:]
    assert out.returncode == 0, log
    assert "dashboard: demo-01 online, p95" in out.stdout, log
    assert "uploaded digits-cpu-1.1.0.eopkg" in out.stdout, log
    assert "smoke run: everything answered" in out.stdout
    # nothing keeps running after the script: no one listens on its ports any more
    for port in (env["EDGEOPT_DEMO_WEB_PORT"], env["EDGEOPT_DEMO_API_PORT"]):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", int(port))) != 0, f"something still listens on port {port}"
