"""Per-sample and sequence data, state pairs, random data at the model's minimum sizes (issue 16).

Tiny generated models (tests/sdk/tiny_models.py) keep these fast; the real voice-activity model is in
test_vad_real.py."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

import tiny_models
from edgeopt.sdk.errors import InputError
from edgeopt.sdk.package import TensorSpec
from edgeopt.sdk.pipeline import PackageRequest, prepare
from edgeopt.sdk.pipeline.data import load_npz
from edgeopt.sdk.pipeline.shapes import InputSpec
from edgeopt.sdk.stateful import StatePair, detect_pairs, resolve_pairs

ACC_SPECS = [InputSpec("x", "float32", ("N", 4)), InputSpec("state", "float32", (2, "N", 4)),
             InputSpec("sr", "int64", ())]


def _t(name, shape, dtype="float32"):
    return TensorSpec(name=name, dtype=dtype, shape=list(shape))


def test_state_pairs_detected_by_name_and_shape():
    ins = [_t("input", ["b", "t"]), _t("state", [2, "b", 128]), _t("sr", [], "int64"), _t("h", [1, 1, 64]),
           _t("c", [1, 1, 64]), _t("past_key_values.0.key", ["b", 4, "p", 8]), _t("cache", [3, 3])]
    outs = [_t("output", ["b", 1]), _t("stateN", ["d0", "d1", "d2"]), _t("hn", [1, 1, 64]), _t("cn", [1, 1, 64]),
            _t("present.0.key", ["b", 4, "q", 8]), _t("cacheN", [3, 3], "float16")]
    pairs = detect_pairs(ins, outs)
    assert [(p.input, p.output, p.batch_axis) for p in pairs] == [
        ("state", "stateN", 1), ("h", "hn", None), ("c", "cn", None), ("past_key_values.0.key", "present.0.key", 0)]
    # a dtype that differs is no pair (cache float32 vs cacheN float16)
    assert "cache" not in {p.input for p in pairs}


def test_declared_state_is_checked_against_the_model():
    ins, outs = [_t("a", [1, 4]), _t("x", [2])], [_t("b", [1, 4]), _t("y", [3])]
    assert resolve_pairs({"a": "b"}, ins, outs) == [StatePair(input="a", output="b", batch_axis=None)]
    with pytest.raises(InputError, match=r"--state q:b: the model has no input 'q' \(inputs: a, x\)"):
        resolve_pairs({"q": "b"}, ins, outs)
    with pytest.raises(InputError, match="input x is float32 \\[2\\] but output y is float32 \\[3\\]"):
        resolve_pairs({"x": "y"}, ins, outs)


def test_per_sample_file_takes_any_batch_axis_scalars_and_ints(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for i in range(5):
        n = 1 + i % 3  # samples need not share a batch size
        arrays[f"{i}/x"] = rng.standard_normal((n, 4)).astype(np.float32)
        arrays[f"{i}/state"] = rng.standard_normal((2, n, 4)).astype(np.float32)  # batch on axis 1
        arrays[f"{i}/sr"] = np.array(16000, np.int32)  # an int scalar (cast to the input's int64)
    np.savez(tmp_path / "d.npz", **arrays)
    data = load_npz(tmp_path / "d.npz", ACC_SPECS, "calibration")
    assert len(data) == 5 and data.starts is None
    assert data.samples[2]["state"].shape == (2, 3, 4) and data.samples[2]["sr"].dtype == np.int64
    assert data.samples[2]["sr"].shape == ()


def test_stacked_layout_still_works_and_points_to_per_sample(tmp_path):
    np.savez(tmp_path / "s.npz", x=np.zeros((6, 4), np.float32), state=np.zeros((6, 2, 4), np.float32),
             sr=np.zeros(6, np.int64))
    with pytest.raises(InputError) as info:
        load_npz(tmp_path / "s.npz", ACC_SPECS, "calibration")
    assert "samples go along axis 0" in str(info.value) and "'<i>/<input>'" in info.value.one_line()


def test_key_errors_name_the_first_keys_and_the_count(tmp_path):
    arrays = {f"{i}/{name}": np.zeros(1, np.float32) for i in range(480) for name in ("audio", "h", "c")}
    np.savez(tmp_path / "many.npz", **arrays)
    with pytest.raises(InputError) as info:
        load_npz(tmp_path / "many.npz", ACC_SPECS, "calibration")
    line = info.value.one_line()
    assert "sample 0 has inputs ['audio', 'c', 'h']" in line and len(line) < 400, line
    np.savez(tmp_path / "flat.npz", **{f"k{i}": np.zeros(1) for i in range(1440)})
    with pytest.raises(InputError) as info:
        load_npz(tmp_path / "flat.npz", ACC_SPECS, "calibration")
    line = info.value.one_line()
    assert "(1,440 keys)" in line and "'k0'" in line and "'k1000'" not in line and len(line) < 500, line
    np.savez(tmp_path / "mixed.npz", **{"0/x": np.zeros(1), "x": np.zeros(1)})
    with pytest.raises(InputError, match=r"mixes key layouts: \['0/x', 'x'\]"):
        load_npz(tmp_path / "mixed.npz", ACC_SPECS, "calibration")


def _sequences(path, n_seq=3, steps=5, with_state=False, skip=None):
    rng = np.random.default_rng(1)
    arrays = {}
    for s in range(n_seq):
        for t in range(steps):
            if (s, t) == skip:
                continue
            arrays[f"{s}/{t}/x"] = rng.standard_normal((1, 4)).astype(np.float32)
            arrays[f"{s}/{t}/sr"] = np.array(16000, np.int64)
            if with_state and t == 0:
                arrays[f"{s}/{t}/state"] = np.full((2, 1, 4), 0.5, np.float32)
    np.savez(path, **arrays)
    return path, arrays


def test_sequences_start_at_zeros_and_carry_the_models_own_state(tmp_path):
    model = tiny_models.stateful_model(tmp_path / "acc.onnx")
    path, arrays = _sequences(tmp_path / "seq.npz", n_seq=3, steps=5)
    req = PackageRequest(model=model, profile="cpu", heldout=path, precision="fp32", runtime="onnxruntime")
    with prepare(req) as prep:
        assert [(p.input, p.output, p.batch_axis) for p in prep.state_pairs] == [("state", "stateN", 1)]
        assert prep.heldout.starts == [0, 5, 10]
        assert any("state: input state is fed output stateN" in d for d in prep.decisions)
        # y of step t = (x_t + 2 * sum of x before t) * 16: each step saw every earlier step of its own sequence
        for s in range(3):
            total = np.zeros((1, 4), np.float32)
            for t in range(5):
                x = arrays[f"{s}/{t}/x"]
                np.testing.assert_allclose(prep.reference_outputs[s * 5 + t]["y"], (x + 2 * total) * 16, rtol=1e-5)
                total += x
        # the steps hold the state fp32 carried into them (calibration, golden samples and benchmark use it)
        np.testing.assert_allclose(prep.heldout.samples[7]["state"][0], arrays["1/0/x"] + arrays["1/1/x"], rtol=1e-6)
        assert prep.evaluator.task == "generic"


def test_sequence_file_errors(tmp_path):
    path, _ = _sequences(tmp_path / "gap.npz", skip=(1, 2))
    with pytest.raises(InputError, match=r"sequence 1 has steps \[0, 1, 3, 4\] \(4 steps\), missing step\(s\) \[2\]"):
        load_npz(path, ACC_SPECS, "calibration", state_inputs={"state": 1})
    with pytest.raises(InputError, match="the model has no state input paired with a state output"):
        load_npz(path, ACC_SPECS, "calibration")
    bad = InputSpec("state", "float32", (2, "N", "K"))
    path, _ = _sequences(tmp_path / "ok.npz")
    with pytest.raises(InputError, match="dynamic dim 2 that is not its batch axis"):
        load_npz(path, [ACC_SPECS[0], bad, ACC_SPECS[2]], "calibration", state_inputs={"state": 1})


def test_declared_state_through_the_cli(cli, tmp_path):
    model = tiny_models.stateful_model(tmp_path / "acc.onnx")
    path, _ = _sequences(tmp_path / "seq.npz", n_seq=6, with_state=True)
    code, out, err = cli("package", model, "--profile", "cpu", "--calib", path, "--state", "state:stateN",
                         "--runtime", "onnxruntime", "--no-sign", "--iterations", "5", "-o", tmp_path / "a.eopkg",
                         "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert any("input state is fed output stateN of the previous step (batch on axis 1) (--state)" in d
               for d in doc["decisions"])
    code, _, err = cli("package", model, "--profile", "cpu", "--calib", path, "--state", "state:nope", "--no-sign",
                       "-o", tmp_path / "b.eopkg")
    assert code != 0 and "--state state:nope: the model has no output 'nope' (outputs: y, stateN)" in err
    assert not (tmp_path / "b.eopkg").exists()
    code, _, err = cli("package", model, "--profile", "cpu", "--calib", path, "--state", "nocolon", "--no-sign",
                       "-o", tmp_path / "c.eopkg")
    assert code != 0 and "--state 'nocolon' is not INPUT:OUTPUT" in err


def test_random_data_grows_past_the_models_minimum_size(tmp_path):
    model = tiny_models.min_length_model(tmp_path / "pad.onnx")
    with pytest.raises(Exception):  # what random data of length 1 did before: the model refuses it
        ort.InferenceSession(str(model)).run(None, {"x": np.zeros((1, 1), np.float32)})
    req = PackageRequest(model=model, profile="cpu", calib="random", runtime="onnxruntime", precision="fp32")
    with prepare(req) as prep:
        assert prep.heldout.samples[0]["x"].shape == (1, 16)
        assert any("dynamic dims set to 16, the smallest size the fp32 model runs (tried 1, 16)" in d
                   for d in prep.decisions)


def test_random_data_is_refused_with_the_models_reason(tmp_path, capfd):
    from edgeopt.sdk.cli import cli, run_cli

    model = tiny_models.min_length_model(tmp_path / "odd.onnx", multiple_of=5000)
    code = run_cli(cli, ["package", str(model), "--profile", "cpu", "--calib", "random", "--runtime", "onnxruntime",
                         "--no-sign", "-o", str(tmp_path / "o.eopkg")], prog_name="edgeopt")
    captured = capfd.readouterr()
    err = captured.err
    assert code != 0
    last = [line for line in err.splitlines() if line.startswith("error:")][0]
    assert "random calibration inputs do not run in the fp32 model (x [1,?]; dynamic dims set to 1, 16" in last
    assert "Reshape" in last  # the model's own reason
    # ONNX Runtime's own log lines (it refused five sizes) never reach the terminal raw
    assert "[E:onnxruntime" not in captured.err + captured.out and "\x1b[1;31m" not in captured.err
