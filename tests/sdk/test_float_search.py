"""The accuracy-aware float-layer searches on ONNX Runtime, run for real on a tiny model in a few seconds.

Two budgets the plain int8 model must miss:

- a near-exact cosine (1 - 1e-6): no set of bypassed activation quantizers holds it (the weights stay int8),
  so the search over whole layers ranked by their own error (``_float_search``) runs, doubles k up to every
  layer, bisects, and keeps all seven in float (only the float model is that exact: any int8 layer left
  costs about 1e-5 of cosine on this model);
- an input-scale fault: calibration samples with one huge pixel give the input quantizer a scale that rounds
  every held-out input to zero, so bypassing activations holds the budget, and (with the "many reverts"
  threshold lowered for a 7-node model) the re-quantizing search (``_requantize_search``) runs too, ranking
  first the layer that the best-ranked quantizer feeds.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from edgeopt.sdk.package import PackageReader
from edgeopt.sdk.pipeline import evaluation

from tiny_models import calib_npz, tiny_cnn

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {"conv1", "relu1", "conv2", "relu2", "gap", "flatten", "fc"}  # tiny_cnn's nodes


def _profile(tmp_path, min_cosine: float):
    """The shipped cpu profile with another generic cosine budget."""
    text = (ROOT / "hardware_profiles" / "cpu.toml").read_text()
    text = text.replace('name = "cpu"', 'name = "search"')
    text = re.sub(r"(?m)^min_cosine = [0-9.]+", f"min_cosine = {min_cosine!r}", text)
    path = tmp_path / "search.toml"
    path.write_text(text)
    return path


def _package(cli, tmp_path, model, calib, profile, keypair, *extra):
    out = tmp_path / "out.eopkg"
    code, stdout, err = cli("package", model, "-p", profile, "--runtime", "onnxruntime", "--precision", "int8",
                            "--accuracy-aware", "--task", "generic", "--calib", calib, *extra,
                            "--sign-key", keypair[0], "-o", out, "--iterations", "5", "--json")
    assert code == 0, err
    return json.loads(stdout), " ".join(err.split()), out


@pytest.fixture
def searches(monkeypatch):
    """Records the ranking each call of ``_float_search`` got."""
    calls: list[list[str]] = []
    real = evaluation._float_search

    def spy(prep, ranking, *args):
        calls.append([e.layer for e in ranking])
        return real(prep, ranking, *args)

    monkeypatch.setattr(evaluation, "_float_search", spy)
    return calls


def test_float_search_by_layer_error_doubles_bisects_and_records_its_layers(cli, tmp_path, keypair, searches):
    model = tiny_cnn(tmp_path / "tiny.onnx")
    calib = calib_npz(tmp_path / "calib.npz", n=40)
    s, err, out = _package(cli, tmp_path, model, calib, _profile(tmp_path, 0.999999), keypair)
    assert len(searches) == 1 and set(searches[0]) == LAYERS
    # k = 1, 2, 4, then every layer (7) holds; bisecting between 4 and 7 tries 5 and 6, which miss.
    tried = [int(k) for k in re.findall(r"(\d+) layer\(s\) in float: (?:PASS|FAIL)", err)]
    assert tried == [1, 2, 4, 7, 5, 6], err
    assert re.findall(r"(\d+) layer\(s\) in float: PASS", err) == ["7"]
    v = s["validation"]
    assert v["passed"] and set(v["float_layers"]) == LAYERS
    assert v["min_cosine"] >= 0.999999 and v["sensitive_layers"]  # the miss's sensitivity is kept in the report
    aa = next(c for c in s["candidates"] if c["accuracy_aware"])
    assert aa["float_layers"] == v["float_layers"] and aa["passed"]
    with PackageReader(out) as pkg:
        assert pkg.manifest.validation.float_layers == v["float_layers"]


def test_requantize_search_ranks_the_layer_the_best_quantizer_feeds_first(cli, tmp_path, keypair, searches,
                                                                           monkeypatch):
    monkeypatch.setattr(evaluation, "MANY_REVERTS", 0)  # a 7-node model never bypasses more than 8
    model = tiny_cnn(tmp_path / "tiny.onnx")
    rng = np.random.default_rng(1)
    x = rng.random((40, 1, 8, 8), dtype=np.float32)
    x[:, 0, 0, 0] = 500.0  # one huge pixel per calibration sample: the input scale swallows real inputs
    np.savez(tmp_path / "calib.npz", input=x)
    np.savez(tmp_path / "heldout.npz", input=rng.random((8, 1, 8, 8), dtype=np.float32))
    s, err, out = _package(cli, tmp_path, model, tmp_path / "calib.npz", _profile(tmp_path, 0.975), keypair,
                           "--heldout", tmp_path / "heldout.npz")
    assert "FAIL [generic]: cosine of 'logits' 0.0000" in err  # plain int8: the inputs all round to zero
    assert re.search(r"greedy, \d+ point\(s\) in float: PASS", err), err
    assert "whole layers in float (re-quantize)" in err
    # The input quantizer ranks best; conv1 is the weighted layer it feeds, so the search keeps it first.
    assert len(searches) == 1 and searches[0][0] == "conv1" and set(searches[0]) == LAYERS
    assert re.search(r"\d+ layer\(s\) in float: PASS", err), err
    kept = re.search(r"kept (\d+) float layer\(s\) \([0-9.]+ ms\) over (\d+)", err)
    assert kept, err  # the faster of the two configurations within the budget is kept
    v = s["validation"]
    assert v["passed"] and len(v["float_layers"]) == int(kept.group(1))
    with PackageReader(out) as pkg:
        assert pkg.manifest.validation.float_layers == v["float_layers"]
