"""Hardware probe on this machine, and the capability check that refuses packages it cannot run."""
from __future__ import annotations

import copy
import json
import platform

import pytest

from edgeopt.agent.probe import can_run, probe
from edgeopt.sdk.package import Manifest, SourceModel, TensorSpec
from edgeopt.sdk.profile import load_profile


@pytest.fixture(scope="module")
def caps():
    return probe()


def test_probe_reports_this_machine(caps):
    assert caps["arch"] == platform.machine()
    assert caps["os"] == platform.system()
    assert caps["cores_logical"] >= 1 and caps["memory_bytes"] > 0
    assert caps["cpu_model"]
    if platform.machine() == "x86_64":
        assert "sse2" in caps["cpu_flags"]
    # the runtimes installed in the dev environment, as they report themselves
    assert "CPU" in caps["openvino_devices"]
    assert "CPUExecutionProvider" in caps["ort_providers"]
    assert caps["tflite"] is True
    assert caps["runtimes"]["openvino"]["available"] is True
    json.dumps(caps)  # goes into the retained status message as is


def _manifest(profile="cpu", runtime="onnxruntime", device="CPUExecutionProvider", **profile_edits):
    prof = load_profile(profile).to_dict()
    for key, value in profile_edits.items():
        prof["target"][key] = value
    return Manifest(name="m", version="1.0.0", profile=prof, runtime=runtime, runtime_version="x", device=device,
                    precision="fp32", model_file="model.onnx",
                    inputs=[TensorSpec(name="x", dtype="float32", shape=[1])],
                    outputs=[TensorSpec(name="y", dtype="float32", shape=[1])],
                    source_model=SourceModel(filename="m.onnx", format="onnx", sha256="0" * 64))


def test_cpu_packages_run_here(caps):
    assert can_run(_manifest(), caps)[0]
    ok, reason = can_run(_manifest(runtime="openvino", device="CPU"), caps)
    assert ok and reason.endswith("can run here (openvino device CPU present)")


def test_wrong_arch_refused(caps):
    fake = dict(caps, arch="riscv64")
    ok, reason = can_run(_manifest(), fake)
    assert not ok and reason == ("m 1.0.0 (profile cpu, onnxruntime on CPUExecutionProvider) is built for "
                                 "x86_64/aarch64; this device is riscv64")


def test_missing_cpu_flags_refused(caps):
    ok, reason = can_run(_manifest(cpu_flags=["avx2", "no_such_flag"]), caps)
    assert not ok and reason.endswith("needs CPU flags no_such_flag, which this CPU lacks")


def test_unavailable_runtime_refused(caps):
    fake = copy.deepcopy(caps)
    fake["runtimes"]["tflite"] = {"available": False, "reason": "tflite is not installed"}
    ok, reason = can_run(_manifest("arm", runtime="tflite", device="CPU", arch=["x86_64"]), fake)
    assert not ok and reason.endswith("needs runtime tflite, which is not available here (tflite is not installed)")


def test_absent_accelerators_refused(caps):
    ok, reason = can_run(_manifest("gpu", runtime="onnxruntime", device="CUDAExecutionProvider"), caps)
    assert not ok
    assert "targets nvidia-gpu device CUDAExecutionProvider, which onnxruntime does not have here" in reason
    ok, reason = can_run(_manifest("igpu", runtime="openvino", device="GPU"), caps)
    assert not ok and "targets intel-gpu device GPU, which openvino does not have here (available: CPU)" in reason


def test_numbered_openvino_gpu_matches(caps):
    fake = copy.deepcopy(caps)
    fake["runtimes"]["openvino"]["devices"] = ["CPU", "GPU.0", "GPU.1"]
    assert can_run(_manifest("igpu", runtime="openvino", device="GPU"), fake)[0]


def test_probe_cli_json_and_table():
    from click.testing import CliRunner

    from edgeopt.sdk.cli import cli

    result = CliRunner().invoke(cli, ["agent", "probe", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["arch"] == platform.machine()
    table = CliRunner().invoke(cli, ["agent", "probe"])
    assert table.exit_code == 0 and "openvino" in table.stdout and "cpu flags" in table.stdout


def _auxv(hwcap: int, hwcap2: int) -> bytes:
    import struct

    # AT_PAGESZ, AT_HWCAP, AT_HWCAP2, AT_NULL: the layout the kernel (or QEMU) gives a 64-bit process
    return struct.pack("<8Q", 6, 4096, 16, hwcap, 26, hwcap2, 0, 0)


def test_aarch64_features_come_from_the_auxiliary_vector():
    from edgeopt.agent.probe import _auxv_features

    # bits 0 fp, 1 asimd, 20 asimddp (HWCAP); bit 13 i8mm (HWCAP2): the int8 dot-product kernels' switches
    assert _auxv_features(_auxv(1 << 0 | 1 << 1 | 1 << 20, 1 << 13)) == ["asimd", "asimddp", "fp", "i8mm"]
    assert _auxv_features(_auxv(0, 0)) == []
    assert _auxv_features(b"\x01\x02\x03") == []  # truncated: nothing read, nothing made up


def test_emulated_aarch64_ignores_the_hosts_cpuinfo(monkeypatch, tmp_path):
    """QEMU user mode shows an aarch64 process the x86 host's /proc/cpuinfo: its flags must not be reported."""
    import builtins

    from edgeopt.agent import probe as probe_mod

    x86 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU part\t: 0xd0b\nHardware\t: BCM2835\n"
    auxv = _auxv(1 << 0 | 1 << 1 | 1 << 20 | 1 << 7, 0)
    real_open = builtins.open

    def fake(cpuinfo):
        monkeypatch.setattr(probe_mod.Path, "read_text", lambda self, **kw: cpuinfo)
        monkeypatch.setattr(builtins, "open", lambda f, *a, **k: __import__("io").BytesIO(auxv)
                            if f == "/proc/self/auxv" else real_open(f, *a, **k))

    fake(x86)
    model, flags, source = probe_mod._cpuinfo("aarch64")
    assert model is None and flags == ["asimd", "asimddp", "crc32", "fp"] and source.startswith("auxv")
    assert "emulated" in source
    fake(arm)
    model, flags, source = probe_mod._cpuinfo("aarch64")
    assert model == "BCM2835" and flags == ["asimd", "asimddp", "crc32", "fp"] and source == "auxv"
    fake(x86)
    assert probe_mod._cpuinfo("x86_64") == ("AMD EPYC", ["avx2", "fpu", "sse2"], "cpuinfo")
