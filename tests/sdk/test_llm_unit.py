"""Language models (issue 14), the parts that need no model: the text gate's arithmetic, input checks, CLI flags."""
from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from edgeopt.sdk.llm.build import auto_group_size, read_text
from edgeopt.sdk.llm.gate import TextBudget, chunk_ids, compare, layer_name
from edgeopt.sdk.llm.source import looks_like_llm, resolve

BUDGET = TextBudget(min_token_agreement=0.85, max_kl=0.1, max_ppl_increase_pct=10.0)
V = 50


def _model(seed: int, noise: float = 0.0, collapse: bool = False):
    """A fake LM: logits [T, V] from a fixed table indexed by the token, plus optional noise or a collapse."""
    table = np.random.default_rng(seed).standard_normal((V, V)).astype(np.float32) * 4
    rng = np.random.default_rng(99)

    def run(ids):
        out = table[ids].copy()
        if noise:
            out += rng.standard_normal(out.shape).astype(np.float32) * noise
        if collapse:
            out[:] = 0.0
            out[:, 0] = 10.0  # always the same token: what a broken scale does to a layer's output
        return out
    return run


def _chunks(n=4, t=64):
    rng = np.random.default_rng(1)
    return [rng.integers(0, V, t).astype(np.int64) for _ in range(n)]


def test_identical_models_agree_fully_with_zero_kl():
    f = compare(_model(0), _model(0), _chunks(), BUDGET)
    assert f.passed and f.token_agreement == 1.0 and abs(f.mean_kl) < 1e-9
    assert f.ppl_original == pytest.approx(f.ppl_compressed) and abs(f.ppl_increase_pct) < 1e-9
    assert f.positions == 4 * 63


def test_a_collapsed_model_fails_every_budget():
    f = compare(_model(0), _model(0, collapse=True), _chunks(), BUDGET)
    assert not f.passed and len(f.failures) == 3
    assert f.token_agreement < 0.2 and f.mean_kl > 1 and f.ppl_increase_pct > 100


def test_small_noise_passes_and_large_noise_fails():
    assert compare(_model(0), _model(0, noise=0.05), _chunks(), BUDGET).passed
    bad = compare(_model(0), _model(0, noise=3.0), _chunks(), BUDGET)
    assert not bad.passed and any("KL" in x for x in bad.failures)


def test_perplexity_is_the_exponent_of_the_mean_nll():
    ids = [np.array([1, 2, 3], np.int64)]
    logits = np.zeros((3, V), np.float32)  # uniform: perplexity = V
    f = compare(lambda _: logits, lambda _: logits, ids * 8, TextBudget(0, 1, 1))
    assert f.ppl_original == pytest.approx(V, rel=1e-6)


def test_chunks_lead_with_bos_and_drop_a_short_tail():
    ids = list(range(100, 400))
    ch = chunk_ids(ids, 128, 8, bos=1)
    assert [len(c) for c in ch] == [128, 128, 47] and all(c[0] == 1 for c in ch)
    assert chunk_ids(ids[:10], 128, 8, None) == []
    assert len(chunk_ids(ids, 32, 3, None)) == 3


def test_auto_group_size_divides_every_layer():
    smol = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "head_dim": 64}
    assert auto_group_size(smol) == 64  # 128 does not divide 576
    assert auto_group_size({"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32}) == 128
    assert auto_group_size({"hidden_size": 100, "intermediate_size": 400, "num_attention_heads": 4}) == -1


def test_layer_names_are_shortened():
    assert layer_name("__module.model.layers.28.mlp.up_proj/aten::linear/MatMul") == "model.layers.28.mlp.up_proj"


# ----------------------------------------------------------------------------------------- hostile inputs

def test_what_counts_as_a_language_model(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert looks_like_llm(tmp_path / "m.gguf")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert looks_like_llm(folder)
    (folder / "config.json").write_text("{not json")
    assert not looks_like_llm(folder)
    assert not looks_like_llm(tmp_path / "model.onnx")


def test_a_file_that_is_not_gguf_is_refused_in_one_line(tmp_path):
    from edgeopt.sdk.errors import InputError

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"\x08\x01ONNX" + bytes(100))
    with pytest.raises(InputError, match="not a GGUF file"):
        resolve(bad, tmp_path / "w")


@pytest.mark.parametrize("body", [
    b"GGUF" + struct.pack("<I", 3),  # header cut after the version
    b"GGUF" + struct.pack("<IQQ", 3, 2**62, 2**62),  # absurd tensor and key counts
    b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**40) + b"key",  # a key longer than the file
])
def test_a_truncated_or_hostile_gguf_header_is_refused_in_one_line(tmp_path, body):
    from edgeopt.sdk.errors import InputError

    bad = tmp_path / "model.gguf"
    bad.write_bytes(body)
    with pytest.raises(InputError) as exc:
        resolve(bad, tmp_path / "w")
    line = exc.value.one_line()
    assert "GGUF" in line and "\n" not in line and len(line) < 400


def test_a_folder_with_pickled_weights_is_refused(tmp_path):
    from edgeopt.sdk.errors import InputError

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(InputError, match="pickled"):
        resolve(tmp_path, tmp_path / "w")


def test_a_folder_without_a_causal_lm_or_with_a_huge_config_is_refused(tmp_path):
    from edgeopt.sdk.errors import InputError

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(InputError, match="ForCausalLM"):
        resolve(tmp_path, tmp_path / "w")
    (tmp_path / "config.json").write_bytes(b" " * (2 << 20))
    with pytest.raises(InputError, match="larger than any model config"):
        resolve(tmp_path, tmp_path / "w")


def test_text_files_are_bounded_and_must_be_utf8(tmp_path):
    from edgeopt.sdk.errors import InputError

    assert "bridge" in read_text(None, "--heldout-text")  # the text edgeopt ships
    bad = tmp_path / "t.txt"
    bad.write_bytes(b"ok \xff\xfe")
    with pytest.raises(InputError, match="not UTF-8"):
        read_text(bad, "--calib-text")
    with pytest.raises(InputError, match="no such file"):
        read_text(tmp_path / "missing.txt", "--calib-text")


# ---------------------------------------------------------------------------------------------- the CLI

def test_vision_flags_are_refused_with_text_generation(cli, tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    code, _, err = cli("package", tmp_path / "m.gguf", "--task", "text-generation", "--calib", "x.npz", "--no-sign",
                       "-o", tmp_path / "o.eopkg")
    assert code == 2 and "--calib is not used with --task text-generation" in err


def test_text_flags_are_refused_for_a_vision_model(cli, digits_model, tmp_path):
    code, _, err = cli("package", digits_model, "--calib-text", "notes.txt", "--no-sign", "-o", tmp_path / "o.eopkg")
    assert code == 2 and "--calib-text is for --task text-generation" in err


def test_a_profile_without_llm_support_is_refused(cli, tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    code, _, err = cli("package", tmp_path / "m.gguf", "-p", "arm", "--no-sign", "-o", tmp_path / "o.eopkg")
    assert code == 4 and "has no [llm] section" in err and not (tmp_path / "o.eopkg").exists()


def test_compare_refuses_text_generation(cli, digits_model):
    code, _, err = cli("compare", digits_model, "--task", "text-generation")
    assert code == 2 and "edgeopt package" in err


def test_budget_fields_are_in_every_llm_profile():
    from edgeopt.sdk.profile import load_profile

    for name in ("cpu", "igpu", "npu"):
        p = load_profile(name)
        assert p.llm is not None and p.accuracy.max_kl > 0 and 0 < p.accuracy.min_token_agreement <= 1
        assert math.isfinite(p.accuracy.max_ppl_increase_pct)
    assert load_profile("arm").llm is None and load_profile("gpu").llm is None
