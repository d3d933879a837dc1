"""`--metric module:function`: the user's own metric decides the gate; every way it can be wrong is one line,
a non-zero exit and no package (checked on the fp32 model before any quantization)."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest

from edgeopt.sdk.errors import ExitCode

METRICS = textwrap.dedent('''
    import numpy as np

    def agreement(fp32, optimized, labels):
        a = np.concatenate([o["logits"].argmax(1) for o in fp32])
        b = np.concatenate([o["logits"].argmax(1) for o in optimized])
        return float((a == b).mean())

    def accuracy(fp32, optimized, labels):
        b = np.concatenate([o["logits"].argmax(1) for o in optimized])
        return float((b == labels[: len(b)]).mean())

    def bit_exact(fp32, optimized, labels):
        worst = max(float(np.abs(a["logits"] - b["logits"]).max()) for a, b in zip(fp32, optimized))
        return 1.0 if worst < 1e-4 else 0.0

    def explodes(fp32, optimized, labels):
        raise ValueError("no such output 'boxes'")

    def says_nothing(fp32, optimized, labels):
        return None

    def not_a_number(fp32, optimized, labels):
        return float("nan")

    NOT_CALLABLE = 3
''')


@pytest.fixture
def metrics_module(tmp_path, monkeypatch):
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "my_metrics.py").write_text(METRICS)
    (folder / "broken_metrics.py").write_text("import numpy_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(folder))
    yield "my_metrics"
    for name in ("my_metrics", "broken_metrics"):
        sys.modules.pop(name, None)


def _run(cli, digits_model, digits_calib, digits_heldout, out, *extra):
    return cli("package", digits_model, "-p", "cpu", "--runtime", "onnxruntime", "--calib", digits_calib,
               "--heldout", digits_heldout, "--no-sign", "-o", out, "--iterations", "5", "--json", *extra)


def test_user_metric_decides_and_is_recorded(cli, digits_model, digits_calib, digits_heldout, metrics_module, tmp_path):
    out = tmp_path / "m.eopkg"
    code, stdout, err = _run(cli, digits_model, digits_calib, digits_heldout, out, "--metric",
                             "my_metrics:accuracy", "--max-metric-drop", "0.01")
    assert code == 0, err
    v = json.loads(stdout)["validation"]
    assert v["task"] == "custom" and v["metric"]["name"] == "my_metrics:accuracy"
    assert v["metric"]["rule"] == "max_drop" and v["metric"]["bound"] == 0.01 and v["passed"]
    assert 0.95 < v["metric"]["fp32"] <= 1.0
    # the auto task's figures are still reported, without a budget
    assert any(c["name"] == "top-1 agreement" and c["rule"] == "" for c in v["checks"])


def test_user_metric_that_int8_misses_gives_a_float_package(cli, digits_model, digits_calib, digits_heldout,
                                                             metrics_module, tmp_path):
    out = tmp_path / "m.eopkg"
    code, stdout, err = _run(cli, digits_model, digits_calib, digits_heldout, out, "--metric",
                             "my_metrics:bit_exact", "--max-metric-drop", "0.5")
    assert code == 0, err
    s = json.loads(stdout)
    assert s["precision"] == "fp32"
    assert any(d.startswith("float fallback: no int8 configuration held the accuracy budget") and
               "my_metrics:bit_exact dropped 1" in d for d in s["decisions"])


@pytest.mark.parametrize("spec, message", [
    ("my_metrics", "--metric 'my_metrics' must be MODULE:FUNCTION"),
    ("no_such_module_xyz:fn", "--metric no_such_module_xyz:fn: cannot import module 'no_such_module_xyz' "
                              "(ModuleNotFoundError"),
    ("broken_metrics:fn", "--metric broken_metrics:fn: cannot import module 'broken_metrics' (ModuleNotFoundError: "
                          "No module named 'numpy_that_does_not_exist')"),
    ("my_metrics:missing", "--metric my_metrics:missing: module 'my_metrics' has no callable 'missing'"),
    ("my_metrics:NOT_CALLABLE", "--metric my_metrics:NOT_CALLABLE: module 'my_metrics' has no callable"),
    ("my_metrics:explodes", "metric my_metrics:explodes raised ValueError: no such output 'boxes'"),
    ("my_metrics:says_nothing", "metric my_metrics:says_nothing returned NoneType 'None', not a finite number"),
    ("my_metrics:not_a_number", "metric my_metrics:not_a_number returned float 'nan', not a finite number"),
])
def test_bad_metric_is_one_line_no_package(cli, digits_model, digits_calib, digits_heldout, metrics_module, tmp_path,
                                           spec, message):
    out = tmp_path / "m.eopkg"
    code, _, err = _run(cli, digits_model, digits_calib, digits_heldout, out, "--metric", spec)
    assert code == ExitCode.INPUT and not out.exists()
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith("error: " + message), err
    assert "quantiz" not in err.lower() or "QDQ" not in err  # stopped before any quantization


def test_max_metric_drop_needs_a_metric(cli, digits_model, tmp_path):
    code, _, err = cli("package", digits_model, "--no-sign", "-o", tmp_path / "x.eopkg", "--max-metric-drop", "1")
    assert code == ExitCode.USAGE and "--max-metric-drop is the budget of --metric" in err


def test_labels_only_for_detectors(cli, digits_model, digits_calib, digits_heldout, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text("{}")
    code, _, err = _run(cli, digits_model, digits_calib, digits_heldout, tmp_path / "x.eopkg", "--labels", labels)
    assert code == ExitCode.INPUT
    assert "--labels (COCO JSON) is for detectors; this model is judged as task classify" in err
