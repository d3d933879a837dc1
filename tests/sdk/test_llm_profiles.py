"""Language models (issue 14) for the igpu and npu profiles, and a Hugging Face folder as input.

This host has no Intel GPU or NPU: the packages are built for GPU / NPU (their runtime_options are the device's),
while the text gate and golden prompts run on this host's CPU, and the package, the CLI and the --json summary say
so (host proxy). Settings the NPU's LLM pipeline cannot run are refused in one line before anything is built.

The real builds (SmolLM2-135M, int8, through the CLI) run in parallel, once per module: igpu and npu from the GGUF,
and cpu from a Hugging Face folder (config.json + model.safetensors + tokenizer) that the SDK's own GGUF converter
writes in the set-up.
"""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeopt.sdk.errors import UnsupportedError
from edgeopt.sdk.llm.build import auto_group_size, device_rules, host_options, proxy_note, runtime_options
from edgeopt.sdk.profile import LlmSpec, load_profile

EDGEOPT = [sys.executable, "-m", "edgeopt.sdk.cli"]
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "head_dim": 64}


# --------------------------------------------------------------------------- the profiles' rules (no model)

def test_each_profile_carries_its_devices_serving_options():
    """What the package is served with on the real device, from the shipped profiles' [llm] sections."""
    assert runtime_options(load_profile("cpu").llm) == {"KV_CACHE_PRECISION": "u8", "INFERENCE_PRECISION_HINT": "f32"}
    assert runtime_options(load_profile("igpu").llm) == {"KV_CACHE_PRECISION": "u8",
                                                         "INFERENCE_PRECISION_HINT": "f16"}
    # The NPU: its static pipeline's lengths, and no precision keys (its plugin sets them itself)
    assert runtime_options(load_profile("npu").llm) == {"MAX_PROMPT_LEN": 1024, "MIN_RESPONSE_LEN": 128}
    # ... while the host that judges them always computes in f32
    for name in ("cpu", "igpu", "npu"):
        assert host_options(load_profile(name).llm)["INFERENCE_PRECISION_HINT"] == "f32"


def test_only_a_non_cpu_profile_gets_a_proxy_statement():
    llm = load_profile("npu").llm
    note = proxy_note(llm, "intel-npu", runtime_options(llm), host_options(llm))
    assert note.startswith("host proxy: the text gate and golden prompts ran on this host's CPU")
    assert "the NPU path was not run" in note and "MAX_PROMPT_LEN" in note
    assert proxy_note(load_profile("cpu").llm, "cpu", {}, {}) is None


@pytest.mark.parametrize("weights, sym, group, ratio, aware, needle", [
    ("int4", False, None, 1.0, False, "asymmetric int4 weights: the NPU (intel-npu) runs symmetric weights only"),
    ("int8", False, None, 1.0, False, "asymmetric int8 weights"),
    ("int4", True, 64, 1.0, False, "--group-size 64: the NPU (intel-npu) runs int4 in groups of 128 or -1"),
    ("int4", True, None, 0.8, False, "--ratio 0.8: the NPU (intel-npu) needs every layer in int4"),
    ("int4", True, None, 1.0, True, "--accuracy-aware lowers the int4 share"),
])
def test_the_npu_refuses_what_its_llm_pipeline_cannot_run(weights, sym, group, ratio, aware, needle):
    with pytest.raises(UnsupportedError) as exc:
        device_rules(load_profile("npu").llm, "intel-npu", weights, sym, group, ratio, aware)
    line = exc.value.one_line()
    assert needle in line and "\n" not in line


def test_the_npu_runs_symmetric_int4_per_channel_or_group_128_and_flags_int8():
    llm = load_profile("npu").llm
    assert device_rules(llm, "intel-npu", "int4", True, -1, 1.0, False) == []
    assert device_rules(llm, "intel-npu", "int4", True, 128, 1.0, False) == []
    notes = device_rules(llm, "intel-npu", "int8", True, None, 1.0, False)
    assert len(notes) == 1 and "lists 4-bit formats only" in notes[0]
    # auto group size picks from the NPU's sizes: SmolLM2's 576-wide layers take no group of 128, so per channel
    assert auto_group_size(SMOLLM2, llm.group_sizes) == -1 and auto_group_size(SMOLLM2) == 64
    assert auto_group_size({"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32},
                           llm.group_sizes) == 128
    # the GPU runs what the CPU runs
    assert device_rules(load_profile("igpu").llm, "intel-gpu", "int4", False, 32, 0.6, True) == []


@pytest.mark.parametrize("keys, needle", [
    ({"device": "GPU", "max_prompt_len": 512}, "NPU properties"),
    ({"device": "GPU", "kv_cache_precision": "bf16"}, "the GPU plugin takes u8, u4 or f16"),
    ({"device": "NPU", "allow_asymmetric": False}, "needs symmetric = true"),
    ({"device": "NPU", "symmetric": True, "group_sizes": [128, -1], "group_size": 64}, "not one of group_sizes"),
])
def test_a_profile_llm_section_the_device_cannot_run_is_refused(keys, needle):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=needle):
        LlmSpec(**keys)


# --------------------------------------------------------------------------- real builds through the CLI

def _start(*args, log: Path) -> subprocess.Popen:
    with open(log, "w") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(EDGEOPT + ["package", *map(str, args)], stdout=subprocess.PIPE, stderr=fh, text=True)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 900) -> tuple[str, str]:
    out, _ = proc.communicate(timeout=timeout)
    proc.stdout.close()
    err = log.read_text()
    assert proc.returncode == 0, err[-3000:]
    return out, err


@pytest.fixture(scope="module")
def builds(smollm2_gguf, keypair, tmp_path_factory):
    """An igpu package of a Hugging Face folder and an npu package of the GGUF, built at once (int8, signed):
    {name: (package path, stdout, stderr)}; the folder input rides on the igpu build (the input's format and the
    profile are independent steps), which keeps CI within its time."""
    root = tmp_path_factory.mktemp("llm-profiles")
    t0 = time.monotonic()
    key = ["--sign-key", keypair[0]]
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_start(smollm2_gguf, "-p", "npu", "--weights", "int8", "--name", "slm-npu", *key,
                            "-o", root / "npu.eopkg", "--json", log=root / "npu.err"))
        # The Hugging Face folder: what the SDK's GGUF reader writes for its own export (transformers'
        # save_pretrained of the dequantized weights, the tokenizer rebuilt from the GGUF), in a process of its own.
        prep = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                               "from edgeopt.sdk.llm.source import resolve; "
                               "print(resolve(Path(sys.argv[1]), Path(sys.argv[2])).hf_dir)",
                               str(smollm2_gguf), str(root / "convert")], capture_output=True, text=True,
                              timeout=600)
        assert prep.returncode == 0, prep.stderr[-3000:]
        hf = root / "SmolLM2-135M-hf"
        shutil.move(prep.stdout.strip().splitlines()[-1], hf)
        procs.append(_start(hf, "--task", "text-generation", "-p", "igpu", "--weights", "int8", "--name", "slm-igpu",
                            *key, "-o", root / "igpu.eopkg", log=root / "igpu.err"))  # the human output
        done = {name: (root / f"{name}.eopkg", *_finish(proc, root / f"{name}.err"))
                for name, proc in zip(("npu", "igpu"), procs)}
    finally:
        for proc in procs:  # a failed build must not leave the others running
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    done["hf_folder"] = hf
    print(f"two language-model builds in {time.monotonic() - t0:.0f} s; igpu: {done['igpu'][1].strip()}")
    return done


def _manifest(path: Path, keypair):
    from edgeopt.sdk.package import PackageReader, load_public_key

    with PackageReader(path) as reader:
        assert reader.verify([load_public_key(keypair[1])])
        return reader.manifest


def _golden(m) -> dict:
    return {g["prompt"]: g["expected"] for g in m.text.golden}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_igpu_package_targets_the_gpu_and_says_it_was_judged_on_the_cpu(builds, keypair):
    path, out, err = builds["igpu"]
    m = _manifest(path, keypair)
    assert m.profile_name == "igpu" and m.device == "GPU" and m.runtime == "openvino-genai"
    # served on the GPU in its native f16 with the profile's KV cache type
    assert m.runtime_options == {"KV_CACHE_PRECISION": "u8", "INFERENCE_PRECISION_HINT": "f16"}
    perf = m.text.host_perf
    assert perf["host_proxy"] is True and perf["run_device"] == "CPU" and perf["target_device"] == "GPU"
    assert perf["host_options"] == {"KV_CACHE_PRECISION": "u8", "INFERENCE_PRECISION_HINT": "f32"}
    proxy = [d for d in m.decisions if d.startswith("host proxy:")]
    assert len(proxy) == 1 and "the GPU path was not run" in proxy[0] and "INFERENCE_PRECISION_HINT=f32" in proxy[0]
    assert perf["proxy_note"] == proxy[0]
    # the gate ran (on the host) and passed; the golden answers are real
    f = m.text.figures
    assert f["passed"] and f["positions"] > 500 and f["token_agreement"] >= 0.85
    assert "Paris" in _golden(m)["What is the capital of France?"]
    # the CLI says it in plain words, on stdout and in the progress on stderr
    assert out.startswith("wrote ") and "measured on the host CPU as a proxy for GPU: host proxy:" in out
    assert "the GPU path was not run" in err.replace("\n", " ")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_npu_package_carries_the_npu_pipeline_settings_and_the_proxy_statement(builds, keypair):
    path, out, _ = builds["npu"]
    summary = json.loads(out)
    assert summary["profile"] == "npu" and summary["device"] == "NPU"
    assert summary["host_proxy"] is True and "the NPU path was not run" in summary["proxy_note"]
    m = _manifest(path, keypair)
    # the static pipeline's lengths, no precision key the NPU plugin does not take
    assert m.runtime_options == {"MAX_PROMPT_LEN": 1024, "MIN_RESPONSE_LEN": 128}
    t = m.text
    assert t.weights == "int8" and t.symmetric is True  # the profile's default: the NPU runs symmetric weights
    assert t.context_length == 1024 + 128  # what the device holds, not the model's 8192
    assert t.host_perf["host_proxy"] is True and t.host_perf["target_device"] == "NPU"
    assert any("lists 4-bit formats only" in d for d in m.decisions)  # int8 flagged as off Intel's NPU recipe
    assert any(d.startswith("context 1152 tokens on the NPU") for d in m.decisions)
    assert t.host_perf["host_options"] == {"KV_CACHE_PRECISION": "f16", "INFERENCE_PRECISION_HINT": "f32"}
    f = t.figures
    assert f["passed"] and f["positions"] > 500 and f["token_agreement"] >= 0.85 and f["mean_kl"] < 0.05
    # Recorded for the device's self-test, whatever they say: symmetric int8 passes the gate (measured: agreement
    # 0.940, KL 0.007, +1.6%) yet answers the France prompt "L'Étoile, la Mar..." where asymmetric int8 says
    # Paris (it parts at the first token; docs/llm.md). The gate judges distributions, not one answer.
    assert len(t.golden) == 3 and all(len(g["expected"]) > 10 for g in t.golden)


@pytest.mark.slow
@pytest.mark.parametrize("args, needle", [
    (["--weights", "int4", "--asym"], "asymmetric int4 weights: the NPU (intel-npu) runs symmetric weights only"),
    (["--weights", "int4", "--group-size", "64"], "--group-size 64: the NPU (intel-npu) runs int4 in groups of"),
])
def test_the_cli_refuses_an_npu_setting_in_one_line_and_writes_nothing(smollm2_gguf, tmp_path, args, needle):
    out = tmp_path / "slm-npu.eopkg"
    done = subprocess.run(EDGEOPT + ["package", str(smollm2_gguf), "-p", "npu", *args, "--no-sign", "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 4, done.stderr[-2000:]  # ExitCode.UNSUPPORTED
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
    assert done.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_hugging_face_folder_is_packaged_through_the_cli(builds, keypair):
    """The igpu build above took a Hugging Face folder (config.json, model.safetensors, tokenizer files)."""
    hf = builds["hf_folder"]
    names = {p.name for p in hf.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names and not any(n.endswith(".gguf")
                                                                                        for n in names)
    m = _manifest(builds["igpu"][0], keypair)
    assert m.source_model.format == "hf" and m.source_model.filename == hf.name
    assert any(d.startswith("Hugging Face folder: llama, 1 safetensors file(s)") for d in m.decisions)
    f = m.text.figures
    # the same weights as the GGUF: int8 barely moves them (the GGUF build measured 0.948 / 0.007 / +1.3%)
    assert f["passed"] and f["token_agreement"] >= 0.85 and f["mean_kl"] < 0.05 and 5 < f["ppl_original"] < 200
    assert "Paris" in _golden(m)["What is the capital of France?"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_same_folder_with_pickled_weights_is_refused_by_the_cli(builds, tmp_path):
    """The unit test (test_llm_unit.py) refuses a stub folder at resolve(); this one is the real folder with its
    safetensors swapped for a pickle, found as a language model by --task auto, through the CLI."""
    folder = tmp_path / "pickled"
    shutil.copytree(builds["hf_folder"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": [0.0] * 8}))
    out = tmp_path / "out.eopkg"
    done = subprocess.run(EDGEOPT + ["package", str(folder), "-p", "cpu", "--weights", "int8", "--no-sign",
                                     "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr[-2000:]  # ExitCode.INPUT
    errors = [ln for ln in done.stderr.strip().splitlines() if ln.startswith("error: ")]
    assert errors == [done.stderr.strip().splitlines()[-1]]  # one error line, the last (after the stage's mark)
    assert "no *.safetensors weights (pytorch_model.bin is pickled" in errors[0]
    assert not out.exists() and list(tmp_path.iterdir()) == [folder]
