"""Structured pruning (issue 11): the API and `edgeopt prune` on tiny untrained modules (fast), and errors.

Real trained models (the digits ResNet, recovery, `edgeopt package --prune`) are in test_prune_real.py.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is installed by the test set-up (scripts/setup.sh)")

import prune_models  # noqa: E402  (tests/sdk is on sys.path: conftest.py)

from edgeopt.sdk.errors import InputError, MissingDependencyError, UnsupportedError  # noqa: E402
from edgeopt.sdk.prune import prune, prune_model  # noqa: E402

X = (torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)),)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Two intra-op threads on a 2-core machine shared with other processes spin against each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(n=40):
    gen = torch.Generator().manual_seed(2)
    return [(torch.rand(1, 3, 16, 16, generator=gen),) for _ in range(n)]


def test_residual_adds_keep_tied_channels_equal_and_outputs_unchanged_in_shape():
    model = prune_models.residual()
    result = prune_model(model, X, ratio=0.5, recover=None)
    small, info = result.model, result.info
    assert small(*X).shape == model(*X).shape == (1, 5)
    # stem, a2 (added to stem's output) and a1's input are one group: they lose the same channels
    assert small.stem.out_channels == small.a2.out_channels == small.a1.in_channels == 12
    assert small.down.out_channels == small.b2.out_channels == small.fc.in_features == 24
    assert small.fc.out_features == 5 and "fc" in info.ignored_layers  # the output layer is kept whole
    assert model.stem.out_channels == 24  # the argument is not changed
    assert info.params_after < info.params_before * 0.3
    assert info.flops_after < info.flops_before * 0.3
    assert info.layer_channels["b2"] == [48, 24]


def test_round_to_rounds_channel_counts():
    info = prune_model(prune_models.residual(), X, ratio=0.3, round_to=8, recover=None).info
    kept = [after for name, (before, after) in info.layer_channels.items() if name != "fc"]
    assert kept and all(c % 8 == 0 for c in kept), info.layer_channels
    exact = prune_model(prune_models.residual(), X, ratio=0.3, recover=None).info
    assert any(after % 8 for name, (_, after) in exact.layer_channels.items() if name != "fc")


def test_ignored_and_per_layer_ratios():
    model = prune_models.residual()
    small = prune(model, X, ratio=0.5, ignored_layers=[model.b1], per_layer={"a1": 0.25}, recover=None)
    assert small.b1.out_channels == 48
    assert small.a1.out_channels == 18
    assert small.edgeopt_pruning.ignored_layers == ["b1", "fc"]


def test_global_pruning_removes_the_ratio_overall():
    info = prune_model(prune_models.residual(), X, ratio=0.4, global_pruning=True, recover=None).info
    assert info.global_pruning
    assert info.channels_after < info.channels_before


@pytest.mark.parametrize("importance", ["l1", "taylor", "hessian"])
def test_criteria(importance):
    result = prune_model(prune_models.residual(), X, ratio=0.5, importance=importance, data=_data(), recover=None)
    assert result.info.importance == importance
    assert result.model(*X).shape == (1, 5)


def test_criteria_rank_differently():
    """taylor reads gradients on the data, l2 only weights: they must not keep the same channels."""
    import copy

    model = prune_models.residual()
    kept = {}
    for imp in ("l2", "taylor"):
        small = prune_model(copy.deepcopy(model), X, ratio=0.5, importance=imp, data=_data(), recover=None).model
        kept[imp] = small.a1.weight.detach().clone()
    assert kept["l2"].shape == kept["taylor"].shape
    assert not torch.equal(kept["l2"], kept["taylor"])


def test_distillation_lowers_the_loss_and_moves_the_student_towards_the_teacher():
    model = prune_models.residual()
    data = _data(64)
    before = prune_model(model, X, ratio=0.5, recover=None).model
    after = prune_model(model, X, ratio=0.5, recover="distill", steps=30, data=data, lr=3e-3, batch_size=16)
    assert after.info.recovery == "distill" and after.info.recovery_steps == 30 and after.info.recovery_samples == 64
    assert after.info.recovery_loss_last < after.info.recovery_loss_first
    xs = torch.cat([d[0] for d in data])
    with torch.no_grad():
        gap_before = (before(xs) - model(xs)).pow(2).mean()
        gap_after = (after.model(xs) - model(xs)).pow(2).mean()
    assert gap_after < gap_before


def test_distill_loss_sees_regression_heads_logits_and_probabilities():
    """A box head [N, 4] is 2-D like a classifier's logits: a shift of all four offsets must cost (softmax KL
    alone is blind to it: MTCNN's box error did not recover); a softmax output is compared as probabilities."""
    from edgeopt.sdk.prune.recover import distill_loss

    g = torch.Generator().manual_seed(0)
    box = torch.randn(16, 4, generator=g)
    assert float(distill_loss(torch, (box,), (box,))) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(torch, (box + 0.5,), (box,))) > 0.1  # the same softmax, a different box
    logits = torch.randn(16, 10, generator=g)
    swapped = logits[:, [1, 0, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert float(distill_loss(torch, (swapped,), (logits,))) > 0.1
    probs = torch.softmax(logits, dim=1)
    assert float(distill_loss(torch, (probs,), (probs,))) == pytest.approx(0.0, abs=1e-5)
    flipped = torch.softmax(swapped, dim=1)
    # probabilities: the KL of the softened distributions, on their logs (not a softmax of probabilities,
    # which flattens every row towards uniform and barely moves)
    on_logs = float(distill_loss(torch, (flipped,), (probs,)))
    on_logits = float(distill_loss(torch, (swapped,), (logits,)))
    assert on_logs > 0.05 and on_logs < on_logits  # the MSE term is left out for probabilities
    flat = torch.nn.functional.kl_div(torch.log_softmax(flipped / 4, dim=1), torch.softmax(probs / 4, dim=1),
                                      reduction="batchmean") * 16
    assert on_logs > 10 * float(flat)


def test_user_train_function_is_called_with_the_teacher_and_the_data():
    seen = {}

    def train(model, *, teacher, data, steps):
        seen.update(teacher_width=teacher.stem.out_channels, width=model.stem.out_channels, n=len(data), steps=steps)
        return [3.0, 2.0, 1.0]

    info = prune_model(prune_models.residual(), X, ratio=0.5, recover=train, steps=7, data=_data(5)).info
    assert seen == {"teacher_width": 24, "width": 12, "n": 5, "steps": 7}
    assert info.recovery == "user" and info.recovery_loss_first == 2.0 and info.recovery_loss_last == 2.0


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1])
def test_ratio_outside_0_1_is_refused(ratio):
    with pytest.raises(InputError, match=r"outside \(0, 1\)"):
        prune_model(prune_models.residual(), X, ratio=ratio, recover=None)


def test_unknown_layer_names_are_refused_with_a_suggestion():
    with pytest.raises(InputError) as err:
        prune_model(prune_models.residual(), X, ratio=0.5, ignored_layers=["a11"], recover=None)
    assert "layer 'a11' does not exist in Tiny (did you mean a1" in err.value.one_line()
    with pytest.raises(InputError, match="per-layer ratio: layer 'nope' does not exist"):
        prune_model(prune_models.residual(), X, ratio=0.5, per_layer={"nope": 0.2}, recover=None)


def test_distillation_without_data_is_refused():
    with pytest.raises(InputError, match="needs calibration images"):
        prune_model(prune_models.residual(), X, ratio=0.5, recover="distill", steps=10)
    with pytest.raises(InputError, match="importance 'taylor' needs calibration data"):
        prune_model(prune_models.residual(), X, ratio=0.5, importance="taylor", recover=None)


def test_a_model_that_cannot_run_on_the_example_inputs():
    with pytest.raises(UnsupportedError, match="torch cannot run Tiny on the example inputs"):
        prune_model(prune_models.residual(), (torch.rand(1, 4, 16, 16),), ratio=0.5, recover=None)


def test_missing_torch_pruning_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(MissingDependencyError) as err:
        prune_model(prune_models.residual(), X, ratio=0.5, recover=None)
    assert "pip install 'edgeopt[prune]'" in err.value.one_line()


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def factory(tmp_path):
    path = prune_models.python_factory(tmp_path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, images=np.random.default_rng(0).random((24, 3, 16, 16), dtype=np.float32))
    return {"file": path, "weights": tmp_path / "w.pt", "calib": calib}


def _args(f, out, *extra):
    return ["prune", f"{f['file']}:build", "--weights", f["weights"], "--input-shape", "images:1,3,16,16",
            "-o", out, *extra]


def test_cli_prunes_recovers_and_writes_onnx(cli, factory, tmp_path):
    import json

    import onnxruntime as ort

    out = tmp_path / "small.onnx"
    code, stdout, stderr = cli(*_args(factory, out, "--ratio", "0.5", "--calib", factory["calib"], "--recover", "5",
                                      "--batch-size", "8", "--json"))
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["pruning"]["recovery"] == "distill" and doc["pruning"]["recovery_steps"] == 5
    assert doc["pruning"]["round_to"] == 8  # the cpu profile's pruning.round_to
    assert all(after % 8 == 0 for name, (_, after) in doc["pruning"]["layer_channels"].items() if name != "fc")
    assert len(doc["losses"]) == 5
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == "images"
    assert sess.run(None, {"images": np.zeros((3, 3, 16, 16), np.float32)})[0].shape == (3, 5)
    code, stdout, _ = cli(*_args(factory, tmp_path / "b.onnx", "--ratio", "0.5", "--no-recover", "--round-to", "1"))
    assert code == 0 and "recovery: none" in stdout and "FLOPs" in stdout


@pytest.mark.parametrize("extra, code, message", [
    (["--ratio", "1.2", "--no-recover"], 3, "pruning ratio 1.2 is outside (0, 1)"),
    (["--ratio", "0", "--no-recover"], 3, "pruning ratio 0.0 is outside (0, 1)"),
    (["--ratio", "0.5", "--no-recover", "--ignore", "stemm"], 3, "layer 'stemm' does not exist in Tiny"),
    (["--ratio", "0.5"], 3, "recovery by distillation needs calibration images and none were given"),
    (["--ratio", "0.5", "--no-recover", "--importance", "taylor"], 3, "importance 'taylor' needs calibration data"),
])
def test_cli_errors_are_one_line_and_write_nothing(cli, factory, tmp_path, extra, code, message):
    out = tmp_path / "small.onnx"
    got, stdout, stderr = cli(*_args(factory, out, *extra))
    assert got == code, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], stderr  # progress lines go to stderr too
    assert not out.exists() and not list(tmp_path.glob(".small.onnx*"))


def test_cli_model_torch_cannot_follow_or_export(cli, factory, tmp_path, keypair):
    out = tmp_path / "small.onnx"
    code, _, stderr = cli("prune", f"{factory['file']}:escapes", "--input-shape", "images:1,3,16,16", "--ratio", "0.5",
                          "--no-recover", "-o", out)
    assert code == 4, stderr
    assert "error: torch-pruning found no channels it can remove in Escapes" in stderr and not out.exists()
    pkg = tmp_path / "p.eopkg"
    code, _, stderr = cli("package", f"{factory['file']}:escapes", "--input-shape", "images:1,3,16,16",
                          "--precision", "fp32", "--sign-key", keypair[0], "-o", pkg)
    assert code == 4, stderr
    assert "error: torch cannot export Escapes to ONNX" in stderr and not pkg.exists()


@pytest.mark.parametrize("model, message", [
    ("{file}:not_a_module", "returned int, not a torch.nn.Module"),
    ("{file}:missing", "has no callable 'missing'"),
    ("no_such_module_xyz:build", "cannot import no_such_module_xyz"),
])
def test_cli_bad_factories(cli, factory, tmp_path, model, message):
    out = tmp_path / "small.onnx"
    code, _, stderr = cli("prune", model.format(file=factory["file"]), "--input-shape", "images:1,3,16,16",
                          "--ratio", "0.5", "--no-recover", "-o", out)
    assert code == 3 and message in stderr and not out.exists()


def test_cli_bad_weights(cli, factory, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a state dict")
    code, _, stderr = cli(*_args({**factory, "weights": bad}, tmp_path / "o.onnx", "--ratio", "0.5", "--no-recover"))
    assert code == 3 and "bad.pt is not a torch state_dict" in stderr
    torch.save({"stem.weight": torch.zeros(1)}, bad)
    code, _, stderr = cli(*_args({**factory, "weights": bad}, tmp_path / "o.onnx", "--ratio", "0.5", "--no-recover"))
    assert code == 3 and "does not fit Tiny" in stderr


def test_cli_onnx_input_says_what_is_needed(cli, tiny_model, tmp_path):
    code, _, stderr = cli("prune", tiny_model, "--ratio", "0.5", "--no-recover", "-o", tmp_path / "o.onnx")
    assert code == 4 and "pruning needs a PyTorch model given as MODULE:FACTORY" in stderr


def test_cli_torch_export_program_says_why_and_what_is_needed(cli, tmp_path):
    """A torch.export program has no nn.Conv2d / nn.Linear left for the pruner (aten calls on lifted weights)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    ep = torch.export.export(net, (torch.randn(1, 3, 16, 16),))
    assert not any(isinstance(m, torch.nn.Conv2d) for m in torch.export.unflatten(ep).modules())
    torch.export.save(ep, tmp_path / "net.pt2")
    code, _, stderr = cli("prune", tmp_path / "net.pt2", "--ratio", "0.5", "--no-recover", "-o", tmp_path / "o.onnx")
    assert code == 4 and "a torch.export program cannot be pruned" in stderr and "MODULE:FACTORY" in stderr
    assert not (tmp_path / "o.onnx").exists()


def test_cli_without_torch_pruning_names_the_extra(cli, factory, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    out = tmp_path / "o.onnx"
    code, _, stderr = cli(*_args(factory, out, "--ratio", "0.5", "--no-recover"))
    assert code == 5 and "pip install 'edgeopt[prune]'" in stderr and not out.exists()


def test_package_prune_needs_a_torch_model(cli, tiny_model, tmp_path):
    code, _, stderr = cli("package", tiny_model, "--prune", "0.5", "--no-sign", "-o", tmp_path / "p.eopkg")
    assert code == 4 and "--prune needs a PyTorch model given as MODULE:FACTORY" in stderr


def test_cli_scan_table_json_and_html(cli, factory, tmp_path):
    import json

    page = tmp_path / "scan.html"
    code, stdout, stderr = cli("prune", f"{factory['file']}:build", "--weights", factory["weights"], "--input-shape",
                               "images:1,3,16,16", "--scan", "--scan-ratios", "0.25,0.5", "--calib", factory["calib"],
                               "--html", page, "--json")
    assert code == 0, stderr
    rows = json.loads(stdout)["rows"]
    # four prunable groups in the tiny residual net (fc is an output layer), two ratios each
    assert len(rows) == 8 and {r["ratio"] for r in rows} == {0.25, 0.5}
    by_group = {r["group"]: r for r in rows if r["ratio"] == 0.5}
    # the group tied by the first residual add spans the stem and both convolutions of the block
    assert any({"stem", "a2"} <= set(r["layers"]) for r in by_group.values())
    assert all(0 < r["flops_ratio"] < 1 and r["kept"] % 8 == 0 and r["latency_ratio"] > 0 for r in rows)
    assert all(r["metric_name"] == "top-1 agreement" and 0 <= r["metric"] <= 1 for r in rows)
    text = page.read_text()
    assert "<svg" in text and "<table>" in text and "latency vs unpruned" in text
    code, stdout, _ = cli("prune", f"{factory['file']}:build", "--input-shape", "images:1,3,16,16", "--scan",
                          "--scan-ratios", "0.5", "--calib", factory["calib"])
    assert code == 0 and "sensitivity" in stdout


def test_cli_scan_without_calibration_data(cli, factory, tmp_path):
    page = tmp_path / "scan.html"
    code, _, stderr = cli("prune", f"{factory['file']}:build", "--input-shape", "images:1,3,16,16", "--scan",
                          "--html", page)
    assert code == 3 and "judges each pruned variant on calibration inputs" in stderr and not page.exists()


@pytest.mark.parametrize("holdout, first, count", [
    (None, 0, 24),                 # --heldout given: every calibration sample may train
    # int8: the pipeline reads the first 10 + 4 and holds out the last min(4, 14 // 5) = 2 (split_heldout)
    (("tail", 10, 4), 0, 12),
    (("head", 0, 5), 5, 19),       # no calibration: the pipeline judges on the first 5
])
def test_recovery_never_trains_on_the_samples_the_gate_judges(factory, holdout, first, count):
    from edgeopt.sdk.prune.source import TorchInput
    from edgeopt.sdk.prune.workflow import PruneJob, calibration_inputs

    job = PruneJob(factory="x:y", weights=None, inputs=[TorchInput("images", (1, 3, 16, 16))], ratio=0.5,
                   calib=factory["calib"], holdout=holdout)
    got = calibration_inputs(job)
    every = np.load(factory["calib"])["images"]
    assert len(got) == count
    assert np.array_equal(np.concatenate([g[0] for g in got]), every[first:first + count])


def test_cli_user_train_fn(cli, factory, tmp_path):
    import json

    (tmp_path / "mytrain.py").write_text(
        "def train(model, *, teacher, data, steps):\n"
        "    assert teacher.stem.out_channels == 24 and model.stem.out_channels < 24 and len(data) == 24\n"
        "    return [float(steps), 1.0]\n")
    out = tmp_path / "o.onnx"
    code, stdout, stderr = cli(*_args(factory, out, "--ratio", "0.5", "--calib", factory["calib"], "--recover", "3",
                                      "--train-fn", f"{tmp_path / 'mytrain.py'}:train", "--json"))
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["pruning"]["recovery"] == "user" and doc["losses"] == [3.0, 1.0] and out.exists()


def test_several_outputs_are_exported_with_stable_names(tmp_path):
    """A pruned model's outputs are paired with the unpruned model's by name: torch's own names ('54', '57')
    are node numbers that differ between the two graphs, so several outputs get output0, output1, ..."""
    import onnx
    import torch

    from edgeopt.sdk.prune.source import TorchInput, export_onnx

    class TwoHeads(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.body, self.a, self.b = torch.nn.Linear(4, width), torch.nn.Linear(width, 2), torch.nn.Linear(width, 3)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return self.a(h), self.b(h)

    names = []
    for width in (8, 5):
        path = export_onnx(TwoHeads(width).eval(), (torch.zeros(1, 4),), [TorchInput("x", (1, 4))],
                           tmp_path / f"w{width}.onnx")
        names.append([o.name for o in onnx.load(str(path)).graph.output])
    assert names == [["output0", "output1"], ["output0", "output1"]]
