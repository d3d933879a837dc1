"""keygen, profiles list, profile validate/show, inspect and verify through the real CLI."""
import json

import pytest

from edgeopt.sdk.cli import cli, run_cli
from edgeopt.sdk.errors import ExitCode
from edgeopt.sdk.package import Manifest, SourceModel, TensorSpec, load_private_key, write_package
from edgeopt.sdk.profile import builtin_profile_paths, load_profile


def _run(capsys, *args):
    code = run_cli(cli, [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_keygen_json_and_refuses_overwrite(capsys, tmp_path):
    code, out, _ = _run(capsys, "keygen", "--out", tmp_path / "k", "--json")
    doc = json.loads(out)
    assert code == 0 and len(doc["key_id"]) == 16 and (tmp_path / "k" / "edgeopt.key").stat().st_mode & 0o777 == 0o600
    code, _, err = _run(capsys, "keygen", "--out", tmp_path / "k")
    assert code == ExitCode.INPUT
    assert err.strip() == f"error: {tmp_path / 'k' / 'edgeopt.key'} already exists (pass --force to replace it, or choose another --out)"


def test_profiles_list(capsys):
    code, out, _ = _run(capsys, "profiles", "list", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and {"cpu", "igpu", "npu", "gpu", "arm"} <= set(rows)
    assert rows["npu"]["shapes"] == "static-required" and rows["gpu"]["runtimes"] == ["onnxruntime", "torch-aoti:cuda"]
    code, out, _ = _run(capsys, "profiles", "list")
    assert code == 0 and "intel-npu" in out and "static-required" in out


def test_profile_validate_good_and_broken(capsys, tmp_path):
    good = builtin_profile_paths()["cpu"]
    code, out, _ = _run(capsys, "profile", "validate", good)
    assert code == 0 and out.strip() == f"{good}: valid profile 'cpu' (cpu, int8)"
    bad = tmp_path / "mine.toml"
    bad.write_text(good.read_text().replace("batch_size = 1", 'batch_size = "two"\ncolour = "red"'))
    code, out, err = _run(capsys, "profile", "validate", bad)
    assert code == ExitCode.INPUT and out == "" and len(err.strip().splitlines()) == 1
    assert f"{bad}: batch_size: Input should be a valid integer" in err
    assert "(write the value without quotes if it is a number or a boolean) (found 'two')" in err
    assert "colour: unknown key (remove it or check its spelling) (found 'red')" in err


def test_profile_missing_key_says_what_to_add(capsys, tmp_path):
    bad = tmp_path / "mine.toml"
    text = builtin_profile_paths()["gpu"].read_text()
    bad.write_text(text[: text.index("[[runtimes]]")] + text[text.index("[precision]"):])
    code, _, err = _run(capsys, "profile", "validate", bad)
    assert code == ExitCode.INPUT
    assert "runtimes: required key is missing (add it: see `edgeopt profile show cpu` for a complete profile)" in err


@pytest.fixture()
def package(tmp_path, keypair):
    m = Manifest(name="toy", version="2.1.0", profile=load_profile("npu").to_dict(), runtime="openvino",
                 runtime_version="x", device="NPU", precision="int8", model_file="model.xml",
                 inputs=[TensorSpec(name="images", dtype="float32", shape=[1, 3, 8, 8], layout="NCHW")],
                 outputs=[TensorSpec(name="logits", dtype="float32", shape=[1, 10])],
                 source_model=SourceModel(filename="toy.onnx", format="onnx", sha256="0" * 64))
    out = tmp_path / "toy.eopkg"
    write_package(out, m, {"model.xml": b"<xml/>", "model.bin": b"\0" * 16},
                  private_key=load_private_key(keypair[0]))
    return out


def test_inspect_human_and_json(capsys, package):
    code, out, _ = _run(capsys, "inspect", package)
    assert code == 0 and "toy 2.1.0" in out and "npu" in out and "signed" in out and "model.bin" in out
    code, out, _ = _run(capsys, "inspect", package, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["version"] == "2.1.0" and set(doc["files"]) == {"model.xml", "model.bin"}
    assert oct(package.stat().st_mode & 0o777) == oct(0o644 & ~_umask())


def _umask():
    import os

    m = os.umask(0)
    os.umask(m)
    return m


def test_inspect_not_a_package(capsys, tmp_path):
    junk = tmp_path / "x.eopkg"
    junk.write_text("hello")
    code, _, err = _run(capsys, "inspect", junk)
    assert code == ExitCode.INPUT
    assert err.strip() == (f"error: {junk}: not a valid .eopkg archive (not a tar archive) "
                           "(the file may be truncated or not a package)")


def test_verify_ok_and_other_key(capsys, package, keypair, tmp_path):
    code, out, _ = _run(capsys, "verify", package, "--public-key", keypair[1])
    assert code == 0 and "OK" in out and "2 files match their sha256" in out
    _run(capsys, "keygen", "--out", tmp_path / "other")
    code, _, err = _run(capsys, "verify", package, "--public-key", tmp_path / "other" / "edgeopt.pub")
    assert code == ExitCode.SECURITY and "signature does not match any trusted key" in err


def test_torch_missing_names_the_extra(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from edgeopt.sdk.pipeline import export_torch\n"
        "try:\n"
        "    export_torch(object(), (), 'x.onnx')\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e.one_line())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == ("MissingDependencyError torch is not installed "
                                  "(install it with: pip install 'edgeopt[torch]')"), out.stderr
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("torch") for d in extras["torch"])  # the extra the message names exists
    assert not any("torch" in d for d in extras["all"] + extras["agent"] + extras["sdk"])  # never a runtime dep
