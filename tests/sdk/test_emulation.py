"""edgeopt.sdk.emulation and the target worker, without running the emulator (tests/integration/
test_arm_emulated.py runs it for real)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgeopt.sdk.emulation import ArmEmulator, EmulationError, find_emulator
from edgeopt.sdk.pipeline.golden import golden_key, read_golden


def test_missing_sysroot_names_the_script(tmp_path, monkeypatch):
    monkeypatch.setattr("edgeopt.sdk.emulation.shutil.which", lambda name: "/usr/bin/" + name)
    with pytest.raises(EmulationError) as err:
        find_emulator(tmp_path / "nothing")
    assert err.value.one_line() == (
        f"no aarch64 sysroot in {tmp_path / 'nothing'} (ready, sysroot/usr/bin/python3.11 and site/ are expected "
        "there) (build it with scripts/arm-sysroot.sh (needs root or sudo once, for apt-get))")
    monkeypatch.setattr("edgeopt.sdk.emulation.shutil.which", lambda name: None)
    with pytest.raises(EmulationError, match=r"^qemu-aarch64-static is not installed, so nothing can run as aarch64"):
        find_emulator(tmp_path)


@pytest.mark.parametrize("cpu", ["Cortex-A72", "max;id", "-cpu", "a" * 40, "../x"])
def test_cpu_names_are_checked_before_they_reach_a_command_line(cpu, tmp_path):
    with pytest.raises(EmulationError, match="is not a QEMU CPU model name"):
        find_emulator(tmp_path, cpu)


def test_emulated_command_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/host/site")
    monkeypatch.setenv("PYTHONHOME", "/host")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/host/lib")
    monkeypatch.setenv("VIRTUAL_ENV", "/host/venv")
    emu = ArmEmulator(root=tmp_path, qemu="/usr/bin/qemu-aarch64-static", cpu="cortex-a72")
    with emu.session() as py:
        assert py.command(["-c", "pass"]) == [
            "/usr/bin/qemu-aarch64-static", "-cpu", "cortex-a72", "-L", str(tmp_path / "sysroot"),
            str(tmp_path / "sysroot/usr/bin/python3.11"), "-s", "-c", "pass"]
        env = py.env()
        # the host's x86 Python settings never leak into the aarch64 interpreter
        assert "PYTHONHOME" not in env and "LD_LIBRARY_PATH" not in env and "VIRTUAL_ENV" not in env
        assert env["PYTHONPATH"].split(":") == [str(py.source), str(tmp_path / "site")]
        linked = {p.name: p.resolve() for p in (py.source / "edgeopt").iterdir()}
        import edgeopt.agent
        import edgeopt.sdk

        assert set(linked) == {"sdk", "agent", "hardware_profiles"}  # never the dashboard
        assert linked["sdk"] == __import__("pathlib").Path(edgeopt.sdk.__file__).resolve().parent
    assert not py.source.exists()  # the session's folder is gone afterwards
    assert ArmEmulator(root=tmp_path, qemu="q").describe()["cpu"] == "max"


def test_target_worker_runs_a_model_on_this_host(tmp_path, digits_model, digits_heldout):
    """The program --validate-on starts on the target, run natively: same outputs as a direct session."""
    import onnxruntime as ort

    images = np.load(digits_heldout)["images"][:3]
    np.savez(tmp_path / "in.npz", **{golden_key("input", i, "images"): images[i:i + 1] for i in range(3)})
    done = subprocess.run([sys.executable, "-m", "edgeopt.sdk.target_worker", str(digits_model), "onnxruntime",
                           str(tmp_path / "in.npz"), str(tmp_path / "out.npz")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["samples"] == 3 and summary["runtime"] == "onnxruntime"
    outs = [o for _, o in read_golden((tmp_path / "out.npz").read_bytes())]
    sess = ort.InferenceSession(str(digits_model), providers=["CPUExecutionProvider"])
    for i, o in enumerate(outs):
        np.testing.assert_allclose(o["logits"], sess.run(None, {"images": images[i:i + 1]})[0], rtol=1e-5, atol=1e-5)
    bad = subprocess.run([sys.executable, "-m", "edgeopt.sdk.target_worker", str(digits_model), "onnxruntime",
                          str(tmp_path / "in.npz"), str(tmp_path / "o2.npz"), "--options", "[1]"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip() == (
        "target_worker: error: ValueError: --options must be a JSON object")
    assert not (tmp_path / "o2.npz").exists()
