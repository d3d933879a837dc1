"""A non-editable install (the wheel `pip install .` builds) carries every data file the parts need."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import importlib.resources as r, sys
import edgeopt.sdk, edgeopt.dashboard
assert edgeopt.sdk.__file__.startswith(sys.argv[1]), edgeopt.sdk.__file__   # the wheel's copy, not the checkout
from edgeopt.sdk.profile import builtin_profile_paths, load_profile
assert {"cpu", "igpu", "npu", "gpu", "arm"} <= set(builtin_profile_paths())
load_profile("npu")
for pkg, name in [("edgeopt.dashboard.templates", "base.html"), ("edgeopt.dashboard.static", "charts.js"),
                  ("edgeopt.dashboard.migrations.versions", "0001_initial_schema.py"),
                  ("edgeopt.dashboard", "alembic.ini"), ("edgeopt.sdk.templates", "report.html"),
                  ("edgeopt.agent.systemd", "edgeopt-agent.service"), ("edgeopt.agent.examples", "agent.toml")]:
    assert r.files(pkg).joinpath(name).is_file(), (pkg, name)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_carries_data_files_and_migrates(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, timeout=240)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    *map(str, wheels.glob("*.whl"))], check=True, capture_output=True, timeout=120)
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", CHECK, str(target)], env=env, capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    # the installed migrations create the schema
    db = tmp_path / "d.db"
    mig = subprocess.run([sys.executable, "-c", "from edgeopt.dashboard.cli import main; main()", "init-db",
                          "--database-url", f"sqlite:///{db}"], env=env, capture_output=True, text=True,
                         cwd=tmp_path)
    assert mig.returncode == 0, mig.stderr[-2000:]
    assert db.stat().st_size > 0
