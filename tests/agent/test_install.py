"""Install, refuse, switch and roll back real packages of the digits CNN with the real runtimes."""
from __future__ import annotations

import numpy as np
import pytest

from edgeopt.agent.loader import load_installed, load_serving
from edgeopt.agent.store import Store
from edgeopt.sdk.errors import AccuracyError, InputError, PackageError, SecurityError, UnsupportedError


def _serves(installer, name="digits"):
    """The current version loads from disk and answers like the digits model (10 logits per image)."""
    model = installer.store.current(name)
    loaded = load_installed(model, installer.config)
    out = loaded.infer({"images": np.zeros((2, 1, 8, 8), np.float32)})
    assert out["logits"].shape == (2, 10)
    loaded.close()
    return model.version


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_install_then_current_serves(installer, events, make_package, runtime):
    model = installer.install_file(make_package("1.0.0", runtime=runtime), command_id="c1", deployment_id="d1")
    assert (model.name, model.version, model.previous_version) == ("digits", "1.0.0", None)
    assert _serves(installer) == "1.0.0"
    assert events.kinds() == [("self_test", True), ("switch", True), ("install", True)]
    assert all(e["command_id"] == "c1" and e["deployment_id"] == "d1" for e in events)
    assert events.last("self_test")["details"]["samples"] == 4
    # on_switch got the model already loaded: it answers without another load
    switched_model, loaded = installer.switched[-1]
    assert switched_model.version == "1.0.0"
    assert loaded.infer({"images": np.zeros((1, 1, 8, 8), np.float32)})["logits"].shape == (1, 10)
    assert installer.store.read_journal() is None
    assert list(installer.store.staging_dir.iterdir()) == []


def test_upgrade_keeps_previous_and_rollback_returns(installer, events, make_package):
    installer.install_file(make_package("1.0.0"))
    new = installer.install_file(make_package("1.1.0"))
    assert (new.version, new.previous_version) == ("1.1.0", "1.0.0")
    assert installer.store.versions("digits") == ["1.0.0", "1.1.0"]
    events.clear()
    back = installer.rollback("digits", command_id="r1")
    assert back.version == "1.0.0"
    assert installer.store.current("digits").version == "1.0.0"
    assert _serves(installer) == "1.0.0"
    assert events.kinds() == [("self_test", True), ("switch", True), ("rollback", True)]
    assert events.last("rollback")["from_version"] == "1.1.0"
    # nothing older to go to now
    with pytest.raises(InputError, match="no previous version to roll back to"):
        installer.rollback("digits")
    assert events.last("rollback")["ok"] is False
    # the newer version is still on disk: an explicit rollback --version can return to it
    assert installer.rollback("digits", "1.1.0").version == "1.1.0"


def test_rollback_unknown_model_and_version(installer, make_package):
    with pytest.raises(InputError, match="model 'nope' is not installed; nothing to roll back"):
        installer.rollback("nope")
    installer.install_file(make_package("1.0.0"))
    with pytest.raises(InputError, match=r"digits 0.5.0 is not installed here \(installed: 1.0.0\)"):
        installer.rollback("digits", "0.5.0")


def test_rollback_refuses_files_changed_on_disk(installer, make_package):
    installer.install_file(make_package("1.0.0"))
    installer.install_file(make_package("1.1.0"))
    onnx = installer.store.package_dir("digits", "1.0.0") / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 1
    onnx.write_bytes(bytes(data))
    with pytest.raises(SecurityError, match="model.onnx changed on disk since it was installed"):
        installer.rollback("digits")
    assert installer.store.current("digits").version == "1.1.0"


def _refused(installer, events, pkg, exc_type, match, still="1.0.0"):
    with pytest.raises(exc_type, match=match):
        installer.install_file(pkg)
    ev = events.last("refused")
    assert ev["ok"] is False and exc_type.__name__ == ev["details"]["error"]
    if still is None:
        assert installer.store.current("digits") is None
    else:
        assert installer.store.current("digits").version == still
        assert _serves(installer) == still
    assert list(installer.store.staging_dir.iterdir()) == []
    assert installer.store.read_journal() is None
    return ev


def test_tampered_artifact_refused(installer, events, make_package):
    installer.install_file(make_package("1.0.0"))
    ev = _refused(installer, events, make_package("2.0.0", tamper="artifact"), SecurityError,
                  "model.onnx does not match its sha256 in the manifest")
    assert ev["version"] == "2.0.0" and ev["from_version"] == "1.0.0"
    assert installer.store.versions("digits") == ["1.0.0"]


def test_edited_manifest_refused(installer, events, make_package):
    installer.install_file(make_package("1.0.0"))
    _refused(installer, events, make_package("2.0.0", tamper="manifest"), SecurityError,
             "signature does not match any trusted key")


def test_wrong_key_refused(installer, events, make_package):
    installer.install_file(make_package("1.0.0"))
    _refused(installer, events, make_package("2.0.0", key="other"), SecurityError,
             r"signature does not match any trusted key \(signed by key [0-9a-f]{16}")


def test_unsigned_refused_unless_allowed(installer, events, make_package, agent_config):
    installer.install_file(make_package("1.0.0"))
    _refused(installer, events, make_package("2.0.0", key=None), SecurityError,
             r"is not signed \(no manifest.sig\); refused")
    from edgeopt.agent.installer import Installer

    lax = Installer(installer.store, agent_config(allow_unsigned=True), on_event=events,
                    capabilities=installer.capabilities)
    assert lax.install_file(make_package("2.0.0", key=None)).version == "2.0.0"


def test_downgrade_and_same_version_refused(installer, events, make_package):
    installer.install_file(make_package("1.1.0"))
    _refused(installer, events, make_package("1.0.0"), InputError,
             r"digits 1.0.0 is lower than the installed 1.1.0; refused", still="1.1.0")
    _refused(installer, events, make_package("1.1.0"), InputError,
             r"digits 1.1.0 is the installed version; refused", still="1.1.0")
    # an explicit rollback may install a lower version from a file
    assert installer.install_file(make_package("1.0.0"), rollback=True).version == "1.0.0"
    assert events.last("rollback")["ok"] is True


def test_broken_golden_fails_self_test_and_keeps_old(installer, events, make_package):
    installer.install_file(make_package("1.0.0"))
    with pytest.raises(AccuracyError, match=r"self-test failed on golden sample 0, output 'logits': max abs error 1"):
        installer.install_file(make_package("2.0.0", broken_golden=True))
    ev = events.last("self_test")
    assert ev["ok"] is False and "1.0.0 still serving" in ev["message"]
    assert installer.store.versions("digits") == ["1.0.0"]
    assert _serves(installer) == "1.0.0"
    assert installer.switched[-1][0].version == "1.0.0"


def test_missing_device_refused_with_host_proxy_named(installer, events, make_package):
    pkg = make_package("2.0.0", runtime="openvino", profile="npu", device="NPU", host_proxy=True)
    ev = _refused(installer, events, pkg, UnsupportedError,
                  r"targets intel-npu device NPU, which openvino does not have here \(available: CPU\); its "
                  r"benchmark was measured on the build host's CPU as a stand-in for NPU \(host_proxy\)", still=None)
    assert ev["details"]["stage"] == "verify"
    assert list(installer.store.packages_dir.iterdir()) == []


def test_host_proxy_package_compiled_for_cpu_installs(installer, make_package):
    # An accelerator profile whose package was compiled for the CPU runs on a CPU-only host.
    pkg = make_package("1.0.0", runtime="openvino", profile="npu", device="CPU", host_proxy=True)
    assert installer.install_file(pkg).version == "1.0.0"


def test_on_switch_failure_restores_previous(installer, events, make_package):
    installer.install_file(make_package("1.0.0"))

    def boom(model, loaded):
        raise RuntimeError("server refused the swap")

    installer.on_switch = boom
    with pytest.raises(Exception, match="switch failed: RuntimeError: server refused the swap"):
        installer.install_file(make_package("2.0.0"))
    assert installer.store.current("digits").version == "1.0.0"
    assert installer.store.versions("digits") == ["1.0.0"]
    assert "1.0.0 still serving" in events.last("install")["message"]


def test_not_a_package_refused(installer, events, tmp_path):
    junk = tmp_path / "junk.eopkg"
    junk.write_bytes(b"not a tar at all")
    with pytest.raises(PackageError, match="not a valid .eopkg archive"):
        installer.install_file(junk)
    assert events.last("refused")["details"]["stage"] == "open"


def test_prune_keeps_three_versions(installer, make_package):
    for v in ("1.0.0", "1.1.0", "1.2.0", "1.3.0"):
        installer.install_file(make_package(v))
    assert installer.store.versions("digits") == ["1.1.0", "1.2.0", "1.3.0"]
    assert installer.store.current("digits").previous_version == "1.2.0"


def test_load_serving_after_restart(installer, make_package, events):
    installer.install_file(make_package("1.0.0", runtime="openvino"))
    cache = installer.store.cache_dir / "openvino"
    blobs = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert blobs, "OpenVINO wrote no compiled blob into the state dir's cache"
    store = Store(installer.config.state_dir)  # a new process would open the store afresh
    serving = load_serving(store, installer.config)
    model, loaded = serving["digits"]
    assert model.version == "1.0.0"
    assert loaded.infer({"images": np.zeros((1, 1, 8, 8), np.float32)})["logits"].shape == (1, 10)
    # the restart loaded the cached blob: no new blob, the old one untouched
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == blobs


def test_reads_the_sdk_golden_layout(tmp_path):
    """The SDK writes golden.npz; the agent reads it without importing the SDK pipeline."""
    from edgeopt.agent.loader import read_golden
    from edgeopt.sdk.pipeline.golden import make_golden

    ins = [{"images": np.full((1, 1, 8, 8), i, np.float32)} for i in range(3)]
    outs = [{"logits": np.arange(10, dtype=np.float32)[None] * i} for i in range(3)]
    data, spec = make_golden(ins, outs, max_abs_error=0.0, min_cosine=0.99)
    (tmp_path / spec.file).write_bytes(data)
    got_in, got_out = read_golden(tmp_path / spec.file)
    assert len(got_in) == 3 and all(np.array_equal(a["images"], b["images"]) for a, b in zip(got_in, ins))
    assert all(np.array_equal(a["logits"], b["logits"]) for a, b in zip(got_out, outs))


def test_malformed_golden_file_is_refused(tmp_path):
    from edgeopt.agent.loader import read_golden

    np.savez(tmp_path / "g.npz", weird=np.zeros(1))
    with pytest.raises(PackageError, match=r"golden samples g.npz: unexpected key 'weird'"):
        read_golden(tmp_path / "g.npz")
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(PackageError, match="golden samples bad.npz are unreadable"):
        read_golden(tmp_path / "bad.npz")
