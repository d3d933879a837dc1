"""A package made by the real `edgeopt package` CLI (int8, signed) installs, serves and rolls back."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeopt.agent.config import load_config
from edgeopt.agent.loader import load_serving
from edgeopt.agent.store import Store

EDGEOPT = str(Path(sys.executable).with_name("edgeopt"))


@pytest.mark.slow
def test_cli_built_package_installs_and_serves(tmp_path, agent_keys, agent_config_file, make_package,
                                               digits_model, digits_calib, digits_heldout):
    pkg = tmp_path / "digits-cpu.eopkg"
    built = subprocess.run([EDGEOPT, "package", str(digits_model), "--profile", "cpu", "--calib", str(digits_calib),
                            "--heldout", str(digits_heldout), "--sign-key", str(agent_keys.trusted_private),
                            "--name", "digits", "--version", "2.0.0", "--iterations", "5", "-o", str(pkg), "--json"],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    cfg = str(agent_config_file)

    def agent(*args):
        return subprocess.run([EDGEOPT, "agent", *args, "--config", cfg, "--json"], capture_output=True, text=True,
                              timeout=300)

    # an older fixture package first, so the real one is an upgrade and a rollback has somewhere to go
    assert agent("install", str(make_package("1.0.0"))).returncode == 0
    done = agent("install", str(pkg))
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["installed"]["version"] == "2.0.0" and doc["installed"]["precision"] == "int8"
    self_test = [e for e in doc["events"] if e["event"] == "self_test"][0]
    assert self_test["ok"] and self_test["details"]["samples"] >= 1

    # what a restarted daemon serves: the int8 package, still accurate on the held-out digits
    config = load_config(agent_config_file)
    serving = load_serving(Store(config.state_dir), config)
    model, loaded = serving["digits"]
    assert model.version == "2.0.0"
    data = np.load(digits_heldout)
    logits = np.concatenate([loaded.infer({"images": data["images"][i:i + 50]})["logits"]
                             for i in range(0, len(data["images"]), 50)])
    accuracy = float((logits.argmax(1) == data["labels"]).mean())
    assert accuracy >= 0.97, accuracy

    back = agent("rollback", "digits")
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["installed"]["version"] == "1.0.0"
