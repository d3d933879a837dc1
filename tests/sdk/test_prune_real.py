"""Pruning a real trained model (issue 11): the digits ResNet trained here (tests/assets/digits_resnet), recovered
by distillation without labels, and `edgeopt package --prune` judged against the UNPRUNED fp32 model."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is installed by the test set-up (scripts/setup.sh)")

pytestmark = pytest.mark.slow

STEPS = 60  # enough to show recovery on 2 busy cores; the benchmark runs 300


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Two intra-op threads on a 2-core machine shared with other processes spin against each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def test_distillation_recovers_accuracy_without_labels(digits_resnet):
    from edgeopt.sdk.prune import prune_model

    module = digits_resnet["module"]
    model = module.build()
    model.load_state_dict(torch.load(digits_resnet["weights"], weights_only=True))
    model.eval()
    held = np.load(digits_resnet["heldout"])
    x, y = held["images"], held["labels"]
    calib = np.load(digits_resnet["calib"])["images"]  # the training split, no labels
    example = (torch.from_numpy(x[:1]),)
    data = [(calib[i:i + 1],) for i in range(len(calib))]
    fp32 = _accuracy(model, x, y)
    assert fp32 == pytest.approx(digits_resnet["accuracy"], abs=1e-6) and fp32 > 0.95
    bare = prune_model(model, example, ratio=0.5, round_to=8, recover=None)
    rec = prune_model(model, example, ratio=0.5, round_to=8, steps=STEPS, data=data, lr=2e-3)
    before, after = _accuracy(bare.model, x, y), _accuracy(rec.model, x, y)
    info = rec.info
    assert info.params_after < 0.3 * info.params_before and info.flops_after < 0.3 * info.flops_before
    assert info.recovery_loss_last < info.recovery_loss_first
    assert after > before + 0.05, (before, after)
    assert after > fp32 - 0.05, (fp32, after)


def test_package_prune_is_gated_against_the_unpruned_fp32_model(cli, digits_resnet, keypair, tmp_path):
    """A short recovery (10 steps) leaves the pruned model clearly worse than the original, so the gate's fp32
    figure tells which model it judged against: it must be the unpruned model's accuracy, not the pruned one's.
    The budget is widened in a copy of the cpu profile so the package is written and its manifest can be read
    (the 1-point target after full recovery is benchmarks/prune_bench.py's)."""
    from edgeopt.sdk.package import PackageReader
    from pathlib import Path

    profile = tmp_path / "cpu-wide.toml"
    text = (Path(__file__).resolve().parents[2] / "hardware_profiles" / "cpu.toml").read_text().replace('name = "cpu"', 'name = "cpu-wide"')
    profile.write_text(text.replace("max_metric_drop = 1.0", "max_metric_drop = 100.0"))
    out = tmp_path / "digits-pruned.eopkg"
    code, stdout, stderr = cli(
        "package", digits_resnet["factory"], "--weights", digits_resnet["weights"], "--profile", profile,
        "--input-shape", digits_resnet["input_shape_arg"], "--prune", "0.5", "--recover", "10",
        "--calib", digits_resnet["calib"], "--heldout", digits_resnet["heldout"], "--heldout-samples", "450",
        "--runtime", "onnxruntime", "--precision", "int8", "--sign-key", keypair[0], "-o", out,
        "--iterations", "10", "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    pruning = doc["pruning"]
    assert pruning["ratio"] == 0.5 and pruning["importance"] == "l2" and pruning["recovery"] == "distill"
    assert pruning["recovery_steps"] == 10 and pruning["round_to"] == 8 and pruning["recovery_samples"] == 1347
    assert pruning["params_after"] < pruning["params_before"] and pruning["flops_after"] < pruning["flops_before"]
    check = next(c for c in doc["validation"]["checks"] if c["name"] == "accuracy")
    # the fp32 side of the gate is the UNPRUNED model (its accuracy on the 450 held-out images, one image
    # = 0.22 points of ONNX Runtime vs torch leeway), and the pruned model is clearly below it
    assert check["fp32"] == pytest.approx(100 * digits_resnet["accuracy"], abs=0.23)
    assert check["fp32"] - check["optimized"] > 1.0, check
    assert any("unpruned" in d for d in doc["decisions"])
    with PackageReader(out) as pkg:
        manifest = pkg.manifest
    assert manifest.format_version == "1.1"
    assert manifest.pruning is not None and manifest.pruning.channels_after < manifest.pruning.channels_before
    assert manifest.pruning.recovery_loss_last is not None
    code, stdout, _ = cli("inspect", out)
    assert code == 0 and "pruning: 50% (l2), channels 682 -> 346" in stdout and "recovery distill, 10 steps" in stdout
