"""Package time: where ONNX Runtime would place each node on the package's GPU provider (issue 13), and what is
said when this host has no such provider (the agent checks again at install: tests/agent/test_placement.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from edgeopt.sdk.pipeline.build import placement_line

EDGEOPT = str(Path(sys.executable).with_name("edgeopt"))


def test_placement_line_names_the_nodes_left_to_another_provider():
    assert placement_line({"conv": "CUDAExecutionProvider", "relu": "CUDAExecutionProvider"},
                          "CUDAExecutionProvider") is None
    line = placement_line({"conv": "CUDAExecutionProvider", "det": "CPUExecutionProvider"}, "CUDAExecutionProvider")
    assert line == "placement: 1 of 2 nodes would not run on CUDAExecutionProvider (det)"
    many = {f"n{i:02d}": "CPUExecutionProvider" for i in range(11)}
    assert placement_line(many, "CUDAExecutionProvider").endswith("(n00, n01, n02, n03, n04, n05, n06, n07 and 3 more)")


def _det_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                           helper.make_node("Det", ["r"], ["d"], name="det_cpu_only")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 3])],
                          [helper.make_tensor_value_info("d", TensorProto.FLOAT, ["n"])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, str(path))
    return path


def test_a_gpu_package_built_without_a_gpu_says_placement_is_checked_at_install(tmp_path):
    base = Path(__file__).resolve().parents[2] / "hardware_profiles" / "gpu.toml"
    text = base.read_text().replace('name = "gpu"', 'name = "gpu-fp32"').replace('mode = "fp16"', 'mode = "fp32"')
    text = "\n".join(line for line in text.splitlines()
                     if not line.startswith(("batch_sizes", "cuda_graph", "fp16_inputs")))
    profile = tmp_path / "gpu-fp32.toml"
    profile.write_text(text + "\n")
    np.savez(tmp_path / "held.npz", x=np.random.default_rng(0).standard_normal((8, 3, 3)).astype(np.float32))
    out = subprocess.run([EDGEOPT, "package", str(_det_model(tmp_path / "det.onnx")), "--profile", str(profile),
                          "--heldout", str(tmp_path / "held.npz"), "--no-sign", "-o", str(tmp_path / "p.eopkg"),
                          "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    notes = [d for d in json.loads(out.stdout)["decisions"] if d.startswith("placement")]
    assert notes == ["placement not checked here: CUDAExecutionProvider is not on this host; the agent checks it at "
                     "install (profile placement = strict)"]
