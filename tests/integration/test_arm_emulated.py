"""The `arm` profile run for real on a 64-bit ARM CPU emulated by QEMU (user mode): the agent, its runtimes
and numpy are aarch64 builds (scripts/arm-sysroot.sh; scripts/test.sh builds it), the packages are real
models packaged on this x86 host. Emulation proves instruction-set correctness and the ARM kernels'
numerics, never speed (docs/arm-emulation.md).
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent_support import Broker, Subscriber, free_port, wait_for
from edgeopt.agent.config import render_config
from edgeopt.sdk.emulation import EmulationError, find_emulator
from edgeopt.sdk.package import PackageReader, load_private_key, write_package
from edgeopt.sdk.pipeline.golden import read_golden

ROOT = Path(__file__).resolve().parents[2]
EDGEOPT = [sys.executable, "-m", "edgeopt.sdk.cli"]
# Generous: an emulated CPU runs 10-50x slower than this one, and the CI machine is shared.
EMULATED_TIMEOUT_S = 600

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emulator():
    try:
        return find_emulator()
    except EmulationError as exc:  # a missing sysroot is a broken set-up, never a reason to skip
        pytest.fail(f"{exc.one_line()}; scripts/test.sh builds it", pytrace=False)


@pytest.fixture(scope="module")
def arm_py(emulator):
    with emulator.session() as py:
        yield py


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("arm-keys")
    subprocess.run(EDGEOPT + ["keygen", "--out", str(d)], check=True, capture_output=True)
    return d / "edgeopt.key", d / "edgeopt.pub"


def _package(out: Path, model: Path, key: Path, *args: str) -> Path:
    done = subprocess.run(EDGEOPT + ["package", str(model), "-p", "arm", "--sign-key", str(key), "-o", str(out),
                                     "--iterations", "5", *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def digits_arm(tmp_path_factory, keys, digits_model, digits_calib, digits_heldout) -> Path:
    """The digits CNN, int8 (QDQ) for ONNX Runtime, validated on the host as before."""
    out = tmp_path_factory.mktemp("arm-pkg") / "digits-arm.eopkg"
    return _package(out, digits_model, keys[0], "--calib", str(digits_calib), "--heldout", str(digits_heldout),
                    "--input-shape", "images:1,1,8,8", "--name", "digits")


@pytest.fixture(scope="module")
def digits_int8_tflite(tmp_path_factory, digits_model, digits_calib) -> Path:
    """The digits CNN as an int8 TFLite model (tests/assets/digits_tflite.py: converted, then ai-edge-quantizer)."""
    sys.path.insert(0, str(ROOT / "tests" / "assets"))
    import digits_tflite

    d = tmp_path_factory.mktemp("digits-tflite")
    return digits_tflite.int8_tflite(digits_tflite.float_tflite(digits_model, d / "digits_f32.tflite"), digits_calib,
                                     d / "digits_int8.tflite")


@pytest.fixture(scope="module")
def digits_litert_arm(tmp_path_factory, keys, digits_int8_tflite, digits_heldout) -> Path:
    """The int8 TFLite digits CNN packaged for LiteRT (as exported: the SDK does not re-quantize .tflite)."""
    out = tmp_path_factory.mktemp("arm-pkg") / "digits-litert-arm.eopkg"
    return _package(out, digits_int8_tflite, keys[0], "--heldout", str(digits_heldout), "--name", "digits-litert")


@pytest.fixture(scope="module")
def face_arm(tmp_path_factory, keys, tflite_model, tflite_inputs) -> Path:
    """MediaPipe's BlazeFace detector for LiteRT, as exported (float16 weights: the SDK cannot make int8 TFLite)."""
    out = tmp_path_factory.mktemp("arm-pkg") / "face-arm.eopkg"
    return _package(out, tflite_model, keys[0], "--heldout", str(tflite_inputs["heldout"]), "--name", "face")


def _config(tmp_path: Path, pub: Path, broker_port: int, api_port: int, name: str = "arm-1") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(render_config(device_id=name, fleet="armtest", broker=f"mqtt://127.0.0.1:{broker_port}",
                                  state_dir=tmp_path / f"state-{name}", trusted_keys=[pub], api_port=api_port,
                                  telemetry_interval_s=0.5))
    return path


def _emulated_install(arm_py, package: Path, config: Path) -> subprocess.CompletedProcess:
    return arm_py.run(["-m", "edgeopt.sdk.cli", "agent", "install", str(package), "--config", str(config), "--json"],
                      timeout=EMULATED_TIMEOUT_S)


def _golden(package: Path):
    with PackageReader(package) as pkg:
        return pkg.manifest, read_golden(pkg.read(pkg.manifest.golden.file))


def test_sysroot_pins_name_every_agent_dependency():
    """The aarch64 site-packages hold the agent's own dependencies: a dependency added to pyproject.toml
    without an aarch64 pin would only fail on a device."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [d for d in project["dependencies"] + project["optional-dependencies"]["agent"]
              if "python_version < '3.11'" not in d]
    norm = lambda s: re.split(r"[<>=!~;\[ ]", s, 1)[0].strip().lower().replace("_", "-")  # noqa: E731
    lines = (ROOT / "scripts" / "arm-requirements.txt").read_text().splitlines()
    pinned = {norm(line): line for line in lines if line.strip() and not line.startswith("#")}
    assert sorted({norm(d) for d in wanted} - set(pinned)) == []
    assert all("==" in line for line in pinned.values())  # exact pins: what was seen to work under QEMU
    assert {"onnxruntime", "ai-edge-litert"} <= set(pinned)  # the arm profile's runtimes


def test_sysroot_script_is_idempotent(emulator):
    """A second run of scripts/arm-sysroot.sh on a built sysroot changes nothing and says so."""
    before = (emulator.root / "ready").stat().st_mtime_ns
    done = subprocess.run([str(ROOT / "scripts" / "arm-sysroot.sh"), str(emulator.root)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith(f"arm-sysroot: up to date in {emulator.root} (qemu-aarch64 ")
    assert "aarch64 CPython 3.11" in done.stdout and "onnxruntime 1.22.1, ai-edge-litert 1.4.0" in done.stdout
    assert (emulator.root / "ready").stat().st_mtime_ns == before
    check = subprocess.run([str(ROOT / "scripts" / "arm-sysroot.sh"), "--check", str(emulator.root)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and check.stdout.strip() == f"arm-sysroot: ready in {emulator.root}"


def test_probe_reports_the_features_of_the_cpu_qemu_presents(emulator):
    """QEMU's default `max` CPU has SVE, i8mm and the dot product; a Cortex-A72 (Raspberry Pi 4) has none of
    them: the probe on each reports what the runtimes will see there."""
    code = ("import json; from edgeopt.agent.probe import probe; c = probe(); "
            "print(json.dumps([c['arch'], c['cpu_flags'], c['cpu_model']]))")
    seen = {}
    for cpu in ("max", "cortex-a72"):
        with find_emulator(emulator.root, cpu).session() as py:
            done = py.run(["-c", code], timeout=EMULATED_TIMEOUT_S)
        assert done.returncode == 0, done.stderr[-2000:]
        seen[cpu] = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["max"][0] == seen["cortex-a72"][0] == "aarch64"
    assert seen["max"][2] is None  # the x86 host's model name is not reported as this CPU's
    assert {"fp", "asimd", "asimddp", "i8mm", "sve"} <= set(seen["max"][1])
    a72 = set(seen["cortex-a72"][1])
    assert {"fp", "asimd", "crc32"} <= a72 and not {"asimddp", "i8mm", "sve", "sse2"} & a72


def test_agent_on_aarch64_installs_self_tests_serves_and_reports(arm_py, keys, digits_arm, digits_litert_arm,
                                                                tmp_path):
    """Install (verify, extract, load, golden self-test on aarch64, switch) int8 packages of the digits CNN for
    ONNX Runtime and for LiteRT, then the daemon serves tritonclient requests and its telemetry reaches the
    host's broker."""
    import tritonclient.http as httpclient

    broker = Broker(tmp_path / "broker").start()
    api_port = free_port()
    config = _config(tmp_path, keys[1], broker.port, api_port)
    daemon = None
    sub = Subscriber("127.0.0.1", broker.port, "armtest", "arm-1")
    try:
        for pkg, runtime in ((digits_arm, "onnxruntime"), (digits_litert_arm, "tflite")):
            done = _emulated_install(arm_py, pkg, config)
            assert done.returncode == 0, done.stderr[-3000:]
            doc = json.loads(done.stdout)
            installed = doc["installed"]
            assert (installed["runtime"], installed["profile"], installed["precision"]) == (runtime, "arm", "int8")
            events = {e["event"]: e for e in doc["events"]}
            assert events["self_test"]["ok"] and events["self_test"]["details"]["samples"] >= 1, events
            assert events["switch"]["ok"] and events["install"]["ok"]

        log = (tmp_path / "daemon.log").open("wb")
        daemon = arm_py.popen(["-m", "edgeopt.agent.entry", "--config", str(config)], stdout=log,
                              stderr=subprocess.STDOUT)
        status = wait_for(lambda: [s for s in sub.of("status") if s.state == "online"], EMULATED_TIMEOUT_S,
                          interval=0.5, what="the emulated agent's birth message")[-1]
        caps = status.capabilities
        # The capability probe as the emulated CPU presents itself: aarch64, its features from the
        # auxiliary vector (Advanced SIMD and the int8 dot product), not the x86 host's /proc/cpuinfo.
        assert caps["arch"] == "aarch64"
        assert {"fp", "asimd", "asimddp"} <= set(caps["cpu_flags"]) and "sse2" not in caps["cpu_flags"]
        assert "emulated" in caps["cpu_flags_source"]
        assert "CPUExecutionProvider" in caps["ort_providers"] and caps["tflite"] is True

        client = httpclient.InferenceServerClient(f"127.0.0.1:{api_port}", network_timeout=EMULATED_TIMEOUT_S,
                                                  connection_timeout=EMULATED_TIMEOUT_S)
        try:
            wait_for(lambda: _ready(client), EMULATED_TIMEOUT_S, interval=0.5, what="the emulated API's readiness")
            for pkg in (digits_arm, digits_litert_arm):
                manifest, samples = _golden(pkg)
                feeds, want = samples[0]
                inputs = []
                for name, arr in feeds.items():
                    inp = httpclient.InferInput(name, list(arr.shape), "FP32")
                    inp.set_data_from_numpy(np.ascontiguousarray(arr, np.float32), binary_data=True)
                    inputs.append(inp)
                result = client.infer(manifest.name, inputs)
                for name, expected in want.items():
                    spec = manifest.golden
                    np.testing.assert_allclose(result.as_numpy(name), expected, atol=spec.atol, rtol=spec.rtol)
        finally:
            client.close()

        def served():
            return [m for t in sub.of("telemetry") for m in t.models if m.requests]
        stats = wait_for(lambda: {m.model for m in served()} >= {"digits", "digits-litert"} and served(), 120,
                         interval=0.2, what="telemetry with requests for both models")
        assert sum(m.requests for m in stats if m.model == "digits") == 1
        assert sum(m.requests for m in stats if m.model == "digits-litert") == 1
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(120)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(10)
        sub.close()
        broker.stop()
    assert daemon.returncode == 0, (tmp_path / "daemon.log").read_text()[-3000:]


def _ready(client) -> bool:
    try:
        return client.is_server_ready()
    except Exception:  # not listening yet
        return False


def _with_exact_golden(src: Path, dst: Path, private_key: Path) -> Path:
    """The same package, re-signed, with a golden tolerance that only the builder's own kernels can meet:
    atol 0, rtol 0, cosine 1 (what an x86-only numeric assumption amounts to)."""
    work = dst.parent / (dst.stem + "-files")
    with PackageReader(src) as pkg:
        manifest = pkg.manifest
        work.mkdir()
        files = {}
        for name in manifest.files:
            (work / name).write_bytes(pkg.read(name))
            files[name] = work / name
    tight = manifest.golden.model_copy(update={"atol": 0.0, "rtol": 0.0, "min_cosine": 1.0})
    manifest = manifest.model_copy(update={"golden": tight, "files": {}})
    write_package(dst, manifest, files, load_private_key(private_key))
    return dst


def test_too_tight_golden_tolerance_is_caught_on_aarch64(arm_py, keys, face_arm, tflite_model, tflite_inputs,
                                                        tmp_path):
    """A golden tolerance that holds only for x86 kernels: the x86 agent installs the package, the aarch64
    agent refuses it with the sample, output and figures named and keeps nothing; a package validated on
    aarch64 (golden outputs from the ARM kernels) passes the same exact tolerance there."""
    tight = _with_exact_golden(face_arm, tmp_path / "face-tight.eopkg", keys[0])
    # The agent's own self-test on x86 (the x86 agent refuses an arm package, so it runs here directly):
    # the builder's kernels reproduce themselves exactly.
    from edgeopt.agent.loader import self_test
    from edgeopt.agent.runtimes import get_runtime

    with PackageReader(tight) as pkg:
        manifest = pkg.manifest
        pkg.extract_to(tmp_path / "x86")
    loaded = get_runtime("tflite").load(tmp_path / "x86" / manifest.model_file, device="CPU")
    try:
        assert self_test(loaded, tmp_path / "x86", manifest)["max_abs_error"] == 0.0
    finally:
        loaded.close()

    arm_config = _config(tmp_path, keys[1], free_port(), free_port(), name="tight-arm")
    done = _emulated_install(arm_py, tight, arm_config)
    assert done.returncode != 0
    line = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: self-test failed on golden sample \d+, output '(regressors|classificators)': "
                        r"max abs error [0-9.e-]+ \(atol 0, rtol 0\), cosine 0\.9999[0-9]+ \(min 1\) \(this device "
                        r"computes different results than the package's builder; not switched\)", line), line
    listed = arm_py.run(["-m", "edgeopt.sdk.cli", "agent", "list", "--config", str(arm_config), "--json"],
                        timeout=EMULATED_TIMEOUT_S)
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stdout + listed.stderr

    # Validated on aarch64: the golden outputs are the ARM kernels' own, so the exact tolerance holds there.
    validated = _package(tmp_path / "face-arm-validated.eopkg", tflite_model, keys[0], "--heldout",
                         str(tflite_inputs["heldout"]), "--name", "face", "--validate-on", "aarch64")
    manifest, _ = _golden(validated)
    v = manifest.validation
    assert v.ran_on == "aarch64 (emulated)" and v.target.arch == "aarch64" and v.target.emulated
    assert v.target.runtime_version == "ai-edge-litert 1.4.0"
    # the host's and the ARM kernels really differ for this model (else this test proves nothing)
    assert max(o.max_abs_error for o in v.target.vs_host) > 0
    assert manifest.benchmark.host_proxy  # speed figures are still the host's, labelled as a proxy
    tight_validated = _with_exact_golden(validated, tmp_path / "face-validated-tight.eopkg", keys[0])
    done = _emulated_install(arm_py, tight_validated, arm_config)
    assert done.returncode == 0, done.stderr[-3000:]


def test_validate_on_aarch64_records_where_validation_ran(emulator, keys, digits_model, digits_calib,
                                                         digits_heldout, tmp_path):
    """`edgeopt package --validate-on aarch64 --arm-cpu cortex-a72` of the int8 digits CNN: the gate and the
    golden samples come from the emulated Raspberry Pi 4 class CPU, the manifest says so, and the host
    benchmark stays a labelled proxy."""
    out = _package(tmp_path / "digits-v.eopkg", digits_model, keys[0], "--calib", str(digits_calib), "--heldout",
                   str(digits_heldout), "--input-shape", "images:1,1,8,8", "--validate-on", "aarch64",
                   "--arm-cpu", "cortex-a72", "--json")
    manifest, golden = _golden(out)
    v = manifest.validation
    assert v.passed and v.ran_on == "aarch64 (emulated)"
    t = v.target
    assert (t.arch, t.emulated, t.cpu, t.runtime_version) == ("aarch64", True, "cortex-a72", "onnxruntime 1.22.1")
    assert t.emulator.startswith("qemu-aarch64 version") and t.samples == v.samples == 64
    assert [o.name for o in t.vs_host] == ["logits"] and t.wall_seconds > 0
    assert manifest.benchmark.host_proxy and manifest.precision == "int8"
    assert any(d.startswith("validated on aarch64 (emulated by qemu-aarch64") and "CPU cortex-a72)" in d
               and "not a speed figure" in d for d in manifest.decisions)
    assert manifest.format_version == "1.1" and len(golden) == manifest.golden.count


EXACT_METRIC = """
import numpy as np


def neg_max_abs(reference, optimized, labels):
    # 0 when every output equals the reference exactly, below 0 otherwise: an x86-only assumption
    return -max(float(np.max(np.abs(np.asarray(o[k], np.float64) - np.asarray(r[k], np.float64))))
                for r, o in zip(reference, optimized) for k in r)
"""


def test_budget_that_holds_on_x86_but_not_on_aarch64_fails_the_package(emulator, keys, tflite_model, tflite_inputs,
                                                                       tmp_path):
    """A metric budget only x86's own kernels meet (no change at all vs the host's float run): the host
    check passes, the aarch64 run misses it, and `--validate-on aarch64` refuses to write the package."""
    (tmp_path / "exact_metric.py").write_text(EXACT_METRIC)
    out = tmp_path / "face-exact.eopkg"
    args = EDGEOPT + ["package", str(tflite_model), "-p", "arm", "--heldout", str(tflite_inputs["heldout"]),
                      "--sign-key", str(keys[0]), "--iterations", "5", "--metric", "exact_metric:neg_max_abs",
                      "--max-metric-drop", "0"]
    on_host = subprocess.run(args + ["-o", str(tmp_path / "face-host.eopkg")], capture_output=True, text=True,
                             timeout=600, cwd=tmp_path)
    assert on_host.returncode == 0, on_host.stderr[-2000:]
    done = subprocess.run(args + ["-o", str(out), "--validate-on", "aarch64"], capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert done.returncode == 6, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: tflite/as-exported\S* holds the accuracy budget of profile 'arm' on the host but not "
                        r"on aarch64 \(emulated by qemu-aarch64 version [^)]*\), CPU \w+\): exact_metric:neg_max_abs "
                        r"dropped [0-9.e-]+ .*budget 0; no package written \(the ARM kernels compute differently from "
                        r"the host's; .*\)", line), line
    assert not out.exists()


def test_validate_on_aarch64_without_a_sysroot_is_one_clear_error(digits_model, digits_calib, tmp_path):
    done = subprocess.run(EDGEOPT + ["package", str(digits_model), "-p", "arm", "--calib", str(digits_calib),
                                     "--input-shape", "images:1,1,8,8", "--no-sign", "-o", str(tmp_path / "x.eopkg"),
                                     "--iterations", "5", "--validate-on", "aarch64", "--arm-sysroot",
                                     str(tmp_path / "none")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 4
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: no aarch64 sysroot in {tmp_path / 'none'} (ready, sysroot/usr/bin/python3.11 and site/ are "
        "expected there) (build it with scripts/arm-sysroot.sh (needs root or sudo once, for apt-get))")
    assert not (tmp_path / "x.eopkg").exists()
    done = subprocess.run(EDGEOPT + ["package", str(digits_model), "-p", "cpu", "--no-sign", "-o",
                                     str(tmp_path / "y.eopkg"), "--arm-sysroot", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--arm-sysroot is only used with --validate-on aarch64" in done.stderr
    done = subprocess.run(EDGEOPT + ["package", str(digits_model), "-p", "arm", "--no-sign", "-o",
                                     str(tmp_path / "z.eopkg"), "--validate-on", "aarch64", "--arm-cpu", "Pi;rm"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 4 and done.stderr.strip().splitlines()[-1] == (
        "error: 'Pi;rm' is not a QEMU CPU model name (list them with: qemu-aarch64-static -cpu help)")
