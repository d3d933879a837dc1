"""On-device per-layer profile: the `profile` command, `edgeopt agent profile`, the artifact's bounds."""
from __future__ import annotations

import base64
import gzip
import json
import os
import threading

import pytest

from edgeopt.sdk.cli import cli, run_cli
from edgeopt.sdk.errors import InputError

from test_mqtt_commands import FakeInstaller, Sink, _handler, cmd, control_config  # noqa: F401


def _run(capsys, *argv):
    code = run_cli(cli, [str(a) for a in argv], prog_name="edgeopt")
    out = capsys.readouterr()
    return code, out.out, out.err


class FakeProfiler:
    def __init__(self):
        self.calls = []

    def __call__(self, model, *, runs, deadline_s, command_id):
        self.calls.append((model, runs, deadline_s, command_id))
        return {"model": model, "version": "1.0.0", "layer_sum_ms": 1.5, "runs": runs}


@pytest.mark.parametrize("args, message", [
    ({}, "bad profile arguments: model: Field required"),
    ({"model": "digits", "runs": 0}, "bad profile arguments: runs: Input should be greater than or equal to 1"),
    ({"model": "digits", "runs": 201}, "bad profile arguments: runs: Input should be less than or equal to 200"),
    ({"model": "digits", "deadline_s": 3600}, "bad profile arguments: deadline_s: Input should be less than or equal"),
    ({"model": "digits", "shell": "rm -rf /"}, "bad profile arguments: shell: Extra inputs are not permitted"),
])
def test_profile_command_with_bad_arguments_is_rejected(control_config, cmd, args, message):  # noqa: F811
    sink, profiler = Sink(), FakeProfiler()
    handler = _handler(control_config(), sink, FakeInstaller())
    handler.profiler = profiler
    try:
        handler.handle(cmd("pr1", "profile", args))
        (result,) = sink.results()
        assert result.status == "rejected" and message in result.message and profiler.calls == []
    finally:
        handler.stop()
        handler.verifier.close()


def test_profile_command_is_accepted_then_succeeds(control_config, cmd):  # noqa: F811
    sink, profiler = Sink(), FakeProfiler()
    handler = _handler(control_config(), sink, FakeInstaller())
    handler.profiler = profiler
    try:
        handler.handle(cmd("pr2", "profile", {"model": "digits", "runs": 12}))
        accepted, done = sink.wait_results(2)
        assert accepted.status == "accepted" and "profiling digits (at most 12 runs, 20 s)" == accepted.message
        assert done.status == "succeeded" and done.details["layer_sum_ms"] == 1.5
        assert profiler.calls == [("digits", 12, 20.0, "pr2")]
        handler.profiler = None
        handler.handle(cmd("pr3", "profile", {"model": "digits"}))
        assert sink.results()[-1].status == "rejected" and sink.results()[-1].message == "this agent cannot profile"
    finally:
        handler.stop()
        handler.verifier.close()


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_profile_installed_runs_bounded_and_lowered(installer, make_package, runtime):
    from edgeopt.agent.profile import ARTIFACT_BYTES, artifact, decode_trace, profile_installed

    installed = installer.install_file(make_package("1.0.0", runtime=runtime))
    doc, raw = profile_installed(installed, installer.config, runs=5, deadline_s=30)
    assert doc["runs"] == 5 and doc["runtime"] == runtime and doc["layers"]
    # In a child process at nice 19 (or more, when the test runs niced already): never the agent's own threads.
    assert doc["bounds"] == {"runs": 5, "deadline_s": 30, "threads": 1, "nice": max(19, os.nice(0) + 19),
                             "pause_ratio": 1.0, "profiled_runs": 5, "process": "child"}
    conv = "Conv" if runtime == "onnxruntime" else "Convolution"
    assert any(r["op_type"] == conv and r["precision"] == "fp32" for r in doc["layers"])
    details = artifact(doc, raw, host_profile=doc)  # its own profile as the reference: nothing changed
    assert len(json.dumps(details)) <= ARTIFACT_BYTES and details["trace_runs"] == "all"
    assert details["comparison"]["precision_changed"] == [] and details["comparison"]["silent_precision"] == []
    trace = json.loads(decode_trace(details))
    # One track per run that timed every layer: OpenVINO leaves a sub-microsecond layer out of a run now and
    # then under load (seen: 4 of 5 runs), and a run missing a layer is not drawn.
    traced = trace["otherData"]["runs"]
    assert 3 <= traced <= 5
    assert len([e for e in trace["traceEvents"] if e.get("tid") == 2]) == traced * len(doc["layers"])
    with pytest.raises(InputError, match="runs must be between 1 and 200, found 0"):
        profile_installed(installed, installer.config, runs=0)


def test_a_failing_child_is_a_one_line_error(installer, make_package):
    from edgeopt.agent.profile import profile_installed
    from edgeopt.sdk.errors import EdgeoptError

    installed = installer.install_file(make_package("1.0.0"))
    (installed.path / installed.manifest.model_file).write_bytes(b"not a model any more")
    with pytest.raises(EdgeoptError, match=r"^profile of digits 1.0.0 failed: ONNX Runtime cannot load model.onnx"):
        profile_installed(installed, installer.config, runs=3)


def test_deadline_stops_the_profile_after_the_run_that_crosses_it(installer, make_package):
    from edgeopt.agent.profile import profile_installed

    installed = installer.install_file(make_package("1.0.0"))
    doc, _ = profile_installed(installed, installer.config, runs=200, deadline_s=0.001)
    assert doc["runs"] == 1  # at least one run, then the deadline


def test_artifact_stays_under_the_event_size_limit_for_a_huge_graph():
    from edgeopt.agent.profile import ARTIFACT_BYTES, artifact
    from edgeopt.sdk.layers import LayerRun, RawProfile, build_profile

    layers = [LayerRun(name=f"block{i}/conv/with/a/long/name/{i:06d}", op_type="Conv", precision="fp32",
                       times_us=[float(i % 97 + j) for j in range(50)], source_nodes=[f"/b{i}/Conv"])
              for i in range(3000)]
    raw = RawProfile(runtime="onnxruntime", runtime_version="x", device="CPU", layers=layers, runs=50,
                     run_ms=[1.0] * 50)
    doc = build_profile(raw)
    details = artifact(doc, raw, host_profile=None)
    assert len(json.dumps(details)) <= ARTIFACT_BYTES
    assert details.get("trace_runs") in ("median", None) and details["profile"]["layers"]


def test_hostile_trace_artifacts_are_refused_in_one_line():
    from edgeopt.agent.profile import decode_trace

    bomb = base64.b64encode(gzip.compress(b"\0" * (80 * 1024 * 1024))).decode()
    with pytest.raises(InputError, match="inflates to more than 67108864 bytes"):
        decode_trace({"trace_gz_b64": bomb})
    with pytest.raises(InputError, match="not valid gzip"):
        decode_trace({"trace_gz_b64": "not base64!!"})
    assert decode_trace({}) is None


def test_agent_profile_cli(capsys, agent_config_file, make_package, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    cfg = str(agent_config_file)
    assert _run(capsys, "agent", "install", make_package("1.0.0"), "--config", cfg)[0] == 0
    trace = tmp_path / "t.json"
    code, out, err = _run(capsys, "agent", "profile", "digits", "--config", cfg, "--runs", "5", "--json",
                          "--trace", trace)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["profile"]["runs"] == 5 and doc["comparison"] is None  # the test package has no host profile
    assert json.loads(trace.read_text())["traceEvents"]
    code, out, err = _run(capsys, "agent", "profile", "digits", "--config", cfg, "--runs", "5")
    assert code == 0 and "digits 1.0.0 on this device: top 15 of" in out
    assert "the package's manifest has no host profile to compare with" in out
    code, _, err = _run(capsys, "agent", "profile", "nope", "--config", cfg)
    assert code == 3 and err.strip() == ("error: model 'nope' is not installed here (see installed models "
                                         "with: edgeopt agent list)")


def test_litert_says_plainly_that_it_has_no_per_op_times():
    from edgeopt.agent.runtimes import get_runtime
    from edgeopt.sdk.errors import UnsupportedError

    model_cls = __import__("edgeopt.agent.runtimes.tflite", fromlist=["TFLiteModel"]).TFLiteModel
    get_runtime("tflite")  # importable here (the tflite extra is installed for the tests)
    with pytest.raises(UnsupportedError, match=r"^LiteRT \(TFLite\) exposes no per-op timing to Python: .*"
                                               r"benchmark_model tool \(--enable_op_profiling=true\)"):
        model_cls.__new__(model_cls).profile_layers({}, 5)
