"""PyTorch AOTInductor packages (runtime ``torch-aoti``, issue 13's second runtime for the gpu profile), built and
served on the CPU here: the real CLI compiles the trained digits ResNet from its PyTorch factory, the accuracy gate
judges it against the ONNX export's fp32 outputs, the agent installs it (verify, self-test, switch) and serves it
at the package's fixed batch sizes. Refusals: another PyTorch release line, another device, a missing batch file,
an ONNX input, a GPU candidate on a host with no GPU.

The CUDA path (graphs, pinned staging) needs an NVIDIA GPU: benchmarks/gpu_profile.py runs it there
(BENCHMARKS.md)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # scripts/setup.sh installs the CPU build for the tests: never skipped in CI

from edgeopt.agent.runtimes import get_runtime  # noqa: E402
from edgeopt.agent.runtimes.torch_aoti import TorchAotiModel, release_line  # noqa: E402
from edgeopt.sdk.errors import InputError, UnsupportedError  # noqa: E402
from edgeopt.sdk.profile import load_profile, load_profile_file  # noqa: E402

EDGEOPT = str(Path(sys.executable).with_name("edgeopt"))
PROFILE = """schema_version = 1
name = "cpu-aoti"
description = "CPU through PyTorch AOTInductor (tests)"
batch_size = 1
[target]
device = "cpu"
arch = ["x86_64", "aarch64"]
[[runtimes]]
runtime = "torch-aoti"
device = "cpu"
batch_sizes = [4, 1]
max_autotune = false
[precision]
mode = "fp32"
[shapes]
policy = "dynamic-allowed"
"""


@pytest.fixture(scope="module")
def aoti_package(tmp_path_factory, digits_resnet, agent_keys):
    """The digits ResNet packaged for torch-aoti on the CPU by the real CLI (batch sizes 1 and 4), once."""
    d = tmp_path_factory.mktemp("aoti")
    profile = d / "cpu-aoti.toml"
    profile.write_text(PROFILE)
    pkg = d / "digits-aoti.eopkg"
    built = subprocess.run(
        [EDGEOPT, "package", digits_resnet["factory"], "--weights", str(digits_resnet["weights"]), "--profile",
         str(profile), "--input-shape", digits_resnet["input_shape_arg"], "--heldout", str(digits_resnet["heldout"]),
         "--heldout-samples", "200", "--sign-key", str(agent_keys.trusted_private), "--name", "digits",
         "--version", "1.0.0", "--iterations", "5", "-o", str(pkg), "--json"],
        capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr
    return {"package": pkg, "doc": json.loads(built.stdout), "dir": d}


def _extract(pkg: Path, dest: Path) -> Path:
    from edgeopt.sdk.package import PackageReader

    with PackageReader(pkg) as reader:
        reader.extract_to(dest)
    return dest


def _eager(digits_resnet, x: np.ndarray) -> np.ndarray:
    model = digits_resnet["module"].build()
    model.load_state_dict(torch.load(digits_resnet["weights"], weights_only=True))
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


@pytest.mark.slow
def test_package_is_gated_installed_self_tested_and_served(aoti_package, digits_resnet, agent_config_file):
    doc = aoti_package["doc"]
    assert doc["runtime"] == "torch-aoti" and doc["precision"] == "fp32" and doc["validation"]["passed"]
    from edgeopt.sdk.package import PackageReader

    with PackageReader(aoti_package["package"]) as reader:
        names = set(reader.names)
    assert {"model-b1.pt2", "model-b4.pt2", "aoti-io.json"} <= names
    done = subprocess.run([EDGEOPT, "agent", "install", str(aoti_package["package"]), "--config",
                           str(agent_config_file), "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    events = json.loads(done.stdout)["events"]
    assert [e for e in events if e["event"] == "self_test"][0]["ok"]

    from edgeopt.agent.config import load_config
    from edgeopt.agent.loader import load_serving
    from edgeopt.agent.registry import ModelRegistry
    from edgeopt.agent.store import Store

    config = load_config(agent_config_file)
    installed, loaded = load_serving(Store(config.state_dir), config)["digits"]
    assert isinstance(loaded, TorchAotiModel) and loaded.batch_sizes == (1, 4)
    assert ModelRegistry(config).max_batch_for(loaded, installed.manifest) == 4
    data = np.load(digits_resnet["heldout"])
    x = data["images"][:11]  # 4 + 4 + 3 padded to 4
    out = loaded.infer({"images": x})
    (name,) = out
    assert out[name].shape == (11, 10) and out[name].dtype == np.float32
    np.testing.assert_allclose(out[name], _eager(digits_resnet, x), rtol=1e-4, atol=1e-4)
    assert (out[name].argmax(1) == data["labels"][:11]).mean() >= 0.9


@pytest.mark.slow
def test_padding_rows_do_not_leak_and_results_are_not_views(aoti_package, digits_resnet, tmp_path):
    folder = _extract(aoti_package["package"], tmp_path / "x")
    loaded = get_runtime("torch-aoti").load(folder / "model-b4.pt2", device="cpu")
    x = np.load(digits_resnet["heldout"])["images"][:4]
    (name,) = [o.name for o in loaded.outputs]
    loaded.infer({"images": x * 100})  # stale rows in the size-4 buffer
    first = loaded.infer({"images": x[:2]})[name]
    kept = first.copy()
    assert float(loaded._slots[4]["in"][0][2:].abs().sum()) == 0.0  # the padding rows were zeroed
    np.testing.assert_allclose(first, _eager(digits_resnet, x[:2]), rtol=1e-4, atol=1e-4)
    loaded.infer({"images": x[2:]})
    np.testing.assert_array_equal(first, kept)
    with pytest.raises(InputError, match="images"):
        loaded.infer({"images": x[:, :, :8]})
    with pytest.raises(InputError, match="missing"):
        loaded.infer({"other": x})


@pytest.mark.slow
def test_agent_refuses_another_release_line_device_or_a_missing_file(aoti_package, tmp_path):
    rt = get_runtime("torch-aoti")
    folder = _extract(aoti_package["package"], tmp_path / "x")
    io_path = folder / "aoti-io.json"
    io = json.loads(io_path.read_text())
    assert io["torch"] == torch.__version__ and io["device"] == "cpu" and io["batch_files"] == {
        "1": "model-b1.pt2", "4": "model-b4.pt2"}
    other = dict(io, torch="1.13.1")
    io_path.write_text(json.dumps(other))
    with pytest.raises(UnsupportedError, match=r"PyTorch 1\.13\.1.*" + release_line(torch.__version__).replace(".", r"\.")):
        rt.load(folder / "model-b4.pt2", device="cpu")
    io_path.write_text(json.dumps(dict(io, device="cuda")))
    with pytest.raises(UnsupportedError, match="compiled for cuda"):
        rt.load(folder / "model-b4.pt2", device="cpu")
    io_path.write_text(json.dumps(io))
    (folder / "model-b1.pt2").unlink()
    with pytest.raises(UnsupportedError, match="batch 1 file"):
        rt.load(folder / "model-b4.pt2", device="cpu")
    (folder / "model-b4.pt2").write_bytes(b"not a pt2 archive")
    shutil.copyfile(folder / "model-b4.pt2", folder / "model-b1.pt2")
    with pytest.raises(UnsupportedError, match="cannot load model-b1.pt2"):
        rt.load(folder / "model-b4.pt2", device="cpu")
    io_path.write_text("{not json")
    with pytest.raises(UnsupportedError, match="aoti-io.json"):
        rt.load(folder / "model-b4.pt2", device="cpu")


def test_an_onnx_input_or_a_host_without_the_gpu_skips_the_candidate_with_the_reason(tmp_path):
    from edgeopt.sdk.backends import get_backend
    from edgeopt.sdk.pipeline.types import PackageRequest, TorchSource

    backend = get_backend("torch-aoti")
    gpu = load_profile("gpu")
    block = next(rt for rt in gpu.runtimes if rt.runtime == "torch-aoti")
    onnx_req = PackageRequest(model=tmp_path / "m.onnx", profile="gpu")
    with pytest.raises(UnsupportedError, match="compiles the PyTorch model itself"):
        backend.check_request(onnx_req, block)
    torch_req = PackageRequest(model=tmp_path / "m.onnx", profile="gpu", torch_source=TorchSource(factory="m:build"))
    if torch.cuda.is_available():
        backend.check_request(torch_req, block)
    else:
        with pytest.raises(UnsupportedError, match="no CUDA device"):
            backend.check_request(torch_req, block)
    cpu_block = load_profile_file(_write(tmp_path, PROFILE)).runtimes[0]
    backend.check_request(torch_req, cpu_block)  # the CPU compiles for itself


def test_profile_rules(tmp_path):
    text = PROFILE.replace('device = "cpu"\nbatch_sizes', 'device = "cuda"\nbatch_sizes')
    with pytest.raises(Exception, match="torch-aoti device 'cuda' does not match target device 'cpu'"):
        load_profile_file(_write(tmp_path, text))
    with pytest.raises(Exception, match="batch sizes must be between 1 and 4096"):
        load_profile_file(_write(tmp_path, PROFILE.replace("[4, 1]", "[0, 4]")))
    assert load_profile_file(_write(tmp_path, PROFILE)).runtimes[0].batch_sizes == (1, 4)
    block = next(rt for rt in load_profile("gpu").runtimes if rt.runtime == "torch-aoti")
    assert block.device == "cuda" and block.cuda_graph and block.fp16_inputs and block.batch_sizes == (1, 8, 32)


def test_without_torch_the_runtime_names_what_to_install(tmp_path):
    """A device without PyTorch: the registry's error names the extra, and the probe reports it unavailable."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import importlib.util; importlib.util.find_spec = (lambda f: (lambda n, *a: None if n == 'torch' "
            "else f(n, *a)))(importlib.util.find_spec)\n"
            "from edgeopt.agent.runtimes import get_runtime, available_runtimes\n"
            "from edgeopt.sdk.errors import MissingDependencyError\n"
            "try:\n    get_runtime('torch-aoti')\nexcept MissingDependencyError as e:\n    print('ERR', e.one_line())\n"
            "print('AVAIL', available_runtimes()['torch-aoti']['available'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR runtime 'torch-aoti' is not installed" in out.stdout and "edgeopt[agent-torch]" in out.stdout
    assert "AVAIL False" in out.stdout


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cpu-aoti.toml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_both_runtimes_are_measured_and_the_faster_within_budget_is_kept(tmp_path, digits_resnet):
    """A profile with ONNX Runtime and torch-aoti: `edgeopt package MODULE:FACTORY` builds, judges and benchmarks
    both against the same fp32 reference and keeps the faster that passes (what `edgeopt compare` picks from)."""
    text = PROFILE.replace("[[runtimes]]", '[[runtimes]]\nruntime = "onnxruntime"\n\n[[runtimes]]', 1)
    profile = _write(tmp_path, text)
    out = tmp_path / "both.eopkg"
    built = subprocess.run(
        [EDGEOPT, "package", digits_resnet["factory"], "--weights", str(digits_resnet["weights"]), "--profile",
         str(profile), "--input-shape", digits_resnet["input_shape_arg"], "--heldout", str(digits_resnet["heldout"]),
         "--heldout-samples", "100", "--no-sign", "--iterations", "20", "-o", str(out), "--json"],
        capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr
    doc = json.loads(built.stdout)
    rows = {c["runtime"]: c for c in doc["candidates"]}
    assert set(rows) == {"onnxruntime", "torch-aoti"}
    assert all(r["ok"] and r["passed"] and r["fp32_p50_ms"] for r in rows.values())
    fastest = min(rows.values(), key=lambda r: r["p50_ms"])
    assert doc["runtime"] == fastest["runtime"]


def test_compare_plans_only_the_precisions_torch_aoti_builds():
    from edgeopt.sdk.compare import enumerate_candidates

    planned = enumerate_candidates(load_profile("gpu"), calibration=True)
    aoti = [p.candidate.precision for p in planned if p.candidate.runtime == "torch-aoti"]
    ort = [p.candidate.precision for p in planned if p.candidate.runtime == "onnxruntime"]
    assert aoti == ["fp32", "fp16"]
    assert "int8" in ort and "int8-weight-only" in ort


@pytest.mark.parametrize("device,graphs,single", [("cuda", True, True), ("cuda", False, False),
                                                  ("cpu", True, False), ("cpu", False, False)])
def test_runners_captured_into_cuda_graphs_are_loaded_single_threaded(tmp_path, monkeypatch, device, graphs,
                                                                      single):
    """AOTInductor's container waits on an event per run, which a capturing stream refuses ("operation not
    permitted when stream is capturing", H200): a runner the agent captures is loaded with
    run_single_threaded=True (TorchAotiModel's lock serializes runs); any other keeps PyTorch's default."""
    from edgeopt.agent.runtimes import torch_aoti

    (tmp_path / "model-b1.pt2").write_bytes(b"x")
    (tmp_path / "aoti-io.json").write_text(json.dumps({
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 3]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 3]}],
        "batch_files": {"1": "model-b1.pt2"}, "torch": torch.__version__, "device": device, "arch": None}))
    calls, built = [], []
    monkeypatch.setattr(torch._inductor, "aoti_load_package",
                        lambda path, run_single_threaded=False: calls.append(run_single_threaded) or object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch_aoti, "TorchAotiModel", lambda *a: built.append(a) or a)
    get_runtime("torch-aoti").load(tmp_path / "model-b1.pt2", device=device, options={"cuda_graph": graphs})
    assert calls == [single]
    assert built[0][-1] is (graphs and device == "cuda")  # the model captures exactly when loaded single-threaded


def test_loading_puts_the_cxx_runtime_in_the_global_scope_first():
    """A CUDA .pt2's wrapper carries its own copies of libstdc++'s locale symbols; unless libstdc++ is global
    when it is loaded, std::regex inside it crashes every fresh process (H200, PyTorch 2.11: section "Session 9"
    of BENCHMARKS.md). In a fresh interpreter: after `import torch` libstdc++ is not global, after the runtime's
    load path it is (what the crash needs fixed; the CUDA load itself is measured on the GPU)."""
    code = r"""
import ctypes, json, sys, tempfile
from pathlib import Path
import torch
from edgeopt.agent.runtimes import get_runtime
from edgeopt.sdk.errors import UnsupportedError
def is_global():
    return hasattr(ctypes.CDLL(None), "_ZNSt6locale7classicEv")
before = is_global()
d = Path(tempfile.mkdtemp())
(d / "model-b1.pt2").write_bytes(b"not a zip")
(d / "aoti-io.json").write_text(json.dumps({
    "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 3]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 3]}],
    "batch_files": {"1": "model-b1.pt2"}, "torch": torch.__version__, "device": "cpu", "arch": None}))
try:
    get_runtime("torch-aoti").load(d / "model-b1.pt2", device="cpu", options={})
except UnsupportedError as exc:
    refused = str(exc)
print(json.dumps([before, is_global(), refused]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after, refused = json.loads(out.stdout.strip().splitlines()[-1])
    assert (before, after) == (False, True)
    assert refused.startswith("torch-aoti: cannot load model-b1.pt2")  # the corrupt file is still one line
