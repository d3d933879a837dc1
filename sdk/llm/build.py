"""`edgeopt package --task text-generation`: a language model -> weight-compressed, text-gated, signed package.

Steps (each a progress stage):

1. source: a GGUF file or a Hugging Face folder -> a checked Hugging Face folder (``source.py``);
2. export: optimum-intel writes the stateful OpenVINO IR (KV cache inside the model) in float32, and
   openvino-tokenizers the tokenizer and detokenizer as OpenVINO models, so the device needs neither torch nor
   transformers (OpenVINO GenAI reads this folder);
3. compress: NNCF weight compression (int4/int8, symmetric or asymmetric, group size, int4/int8 ratio; AWQ and
   scale estimation when calibration text is given);
4. gate: the compressed model against the float one on held-out text (``gate.py``); ``--accuracy-aware``
   lowers the int4 share (NNCF keeps the most sensitive layers in int8) until the budget holds;
5. golden prompts: greedy continuations through OpenVINO GenAI, the runtime the agent serves with, recorded for
   the agent's self-test, with the time to first token and per output token they took;
   the gate and the golden prompts run on this host's CPU: a package for the GPU or the NPU (its
   ``runtime_options`` the device's, see :func:`runtime_options`) says so in a ``host proxy:`` decision and in
   ``text.host_perf`` (:func:`proxy_note`), and settings its device cannot run are refused first
   (:func:`device_rules`);
6. pack and sign.
"""
from __future__ import annotations

import json
import logging
import dataclasses
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import AccuracyError, InputError, UnsupportedError, missing_extra
from .gate import LogitsRunner, TextBudget, TextFigures, chunk_ids, compare
from .source import quiet

log = logging.getLogger(__name__)

RUNTIME = "openvino-genai"
DATA = Path(__file__).resolve().parent / "data"
DEFAULT_PROMPTS = ("What is the capital of France?", "Name three primary colours.",
                   "Write one sentence about the sea.")
MAX_TEXT_BYTES = 16 * 1024 * 1024
RATIO_STEPS = (1.0, 0.8, 0.6, 0.4, 0.2, 0.0)  # --accuracy-aware: share of layers in int4, the rest int8


@dataclass
class LlmRequest:
    model: Path
    profile: str
    output: Path
    weights: str | None = None  # int4 | int8; None: the profile's [llm] weights
    group_size: int | None = None  # None: auto (largest of 128/64/32 dividing every layer)
    sym: bool | None = None  # None: the profile's [llm] symmetric
    ratio: float = 1.0
    calib_text: Path | None = None
    heldout_text: Path | None = None
    accuracy_aware: bool = False
    name: str | None = None
    version: str = "1.0.0"
    sign_key: Path | None = None
    unsigned: bool = False
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    golden_tokens: int = 24
    chunk_tokens: int = 256
    max_chunks: int = 8


@dataclass
class LlmResult:
    output: Path
    manifest: object
    figures: TextFigures
    signed: bool = False

    def summary(self) -> dict:
        m = self.manifest
        return {"output": str(self.output), "name": m.name, "version": m.version, "profile": m.profile_name,
                "runtime": m.runtime, "runtime_version": m.runtime_version, "precision": m.precision,
                "task": "text-generation", "text": m.text.model_dump(mode="json") if m.text else None,
                "decisions": list(m.decisions), "signed": self.signed, "size_bytes": self.output.stat().st_size,
                "device": m.device, "runtime_options": dict(m.runtime_options),
                "host_proxy": bool(m.text and m.text.host_perf.get("host_proxy")),
                "proxy_note": (m.text.host_perf.get("proxy_note") if m.text else None)}


def runtime_options(llm) -> dict:
    """What the package is served with on its device, from the profile's [llm] keys. CPU: the KV cache type and f32
    compute, the precision the gate judged (the CPU plugin would otherwise run bf16 on avx512_bf16/AMX CPUs, which
    the gate never saw). GPU: its native f16 and the KV cache type. NPU: the static pipeline's prompt and response
    lengths (OpenVINO GenAI on NPU guide); no precision keys, which its plugin sets itself."""
    out: dict = {}
    if llm.kv_cache_precision != "device":
        out["KV_CACHE_PRECISION"] = llm.kv_cache_precision
    if llm.inference_precision != "device":
        out["INFERENCE_PRECISION_HINT"] = llm.inference_precision
    if llm.max_prompt_len is not None:
        out["MAX_PROMPT_LEN"] = llm.max_prompt_len
    if llm.min_response_len is not None:
        out["MIN_RESPONSE_LEN"] = llm.min_response_len
    return out


def host_options(llm) -> dict:
    """What the golden prompts (and ``edgeopt bench``) run with on this host's CPU: f32 compute, as the gate, and
    the profile's KV cache type where the CPU has it (f16 where the profile leaves it to the device)."""
    kv = llm.kv_cache_precision if llm.kv_cache_precision in ("u8", "u4", "f16", "f32", "bf16") else "f16"
    return {"KV_CACHE_PRECISION": kv, "INFERENCE_PRECISION_HINT": "f32"}


def device_rules(llm, device_kind: str, weights: str, sym: bool, group_size: int | None, ratio: float,
                 accuracy_aware: bool) -> list[str]:
    """Refuse what the profile's device cannot run (UnsupportedError, one line, before anything is built); return
    notes for what it runs outside its vendor's recipe."""
    where = f"the {llm.device} ({device_kind})"
    if not sym and not llm.allow_asymmetric:
        raise UnsupportedError(f"asymmetric {weights} weights: {where} runs symmetric weights only (OpenVINO GenAI "
                               f"on NPU: export with --sym); drop --asym")
    if weights == "int4" and not llm.mixed_int4:
        if ratio != 1.0:
            raise UnsupportedError(f"--ratio {ratio:g}: {where} needs every layer in int4 (ratio 1.0); use --ratio 1 "
                                   f"or --weights int8")
        if accuracy_aware:
            raise UnsupportedError(f"--accuracy-aware lowers the int4 share, and {where} needs every layer in int4 "
                                   f"(ratio 1.0); use --weights int8, or --calib-text for AWQ")
    if weights == "int4" and group_size is not None and llm.group_sizes is not None \
            and group_size not in llm.group_sizes:
        raise UnsupportedError(f"--group-size {group_size}: {where} runs int4 in groups of "
                               f"{' or '.join(str(g) for g in llm.group_sizes)} (-1: per channel)")
    notes = []
    if weights == "int8" and llm.device == "NPU":
        notes.append("int8 symmetric per-channel weights for the NPU: Intel's NPU LLM guide (OpenVINO GenAI 2026.3) "
                     "lists 4-bit formats only (int4/nf4, symmetric, per channel or group 128); not run on an NPU "
                     "here")
    return notes


def proxy_note(llm, device_kind: str, options: dict, host: dict) -> str | None:
    """The plain statement a package for another device carries: what ran on this host, and what did not."""
    if llm.device == "CPU":
        return None
    return (f"host proxy: the text gate and golden prompts ran on this host's CPU (OpenVINO CPU, "
            f"{', '.join(f'{k}={v}' for k, v in host.items())}) in place of the {llm.device} ({device_kind}); the "
            f"package is built for {llm.device} with {options or 'no extra properties'}, and the {llm.device} path "
            f"was not run")


def _require():
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
        import openvino_genai  # noqa: F401
        import openvino_tokenizers  # noqa: F401
        from optimum.exporters.openvino import main_export  # noqa: F401
    except ImportError as exc:
        raise missing_extra(exc.name or "optimum-intel", "llm") from None


def read_text(path: Path | None, what: str) -> str:
    if path is None:
        return (DATA / "heldout.txt").read_text("utf-8")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path}: no such file")
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise InputError(f"{what} {path}: {path.stat().st_size} bytes, over the {MAX_TEXT_BYTES} byte bound")
    try:
        return path.read_text("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {path}: not UTF-8 text (byte {exc.start})") from None


def auto_group_size(cfg: dict, allowed: tuple[int, ...] | None = None) -> int:
    """The largest of 128 / 64 / 32 (or of ``allowed``, the device's group sizes) that divides every linear layer's
    input width, else -1 (per channel)."""
    hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or 0)
    inter = int(cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden)
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 0)
    head_dim = int(cfg.get("head_dim") or (hidden // heads if heads else 0))
    widths = [w for w in (hidden, inter, heads * head_dim) if w]
    for g in sorted((g for g in (allowed or (128, 64, 32)) if g > 0), reverse=True):
        if widths and all(w % g == 0 for w in widths):
            return g
    return -1


def _export(hf_dir: Path, out: Path, progress) -> None:
    from .source import _quiet_transformers

    _quiet_transformers()
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from optimum.exporters.openvino import main_export
    from transformers import AutoTokenizer

    with quiet("optimum-intel"):
        main_export(str(hf_dir), output=str(out), task="text-generation-with-past", weight_format="fp32",
                    local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    t, d = convert_tokenizer(tok, with_detokenizer=True)
    ov.save_model(t, str(out / "openvino_tokenizer.xml"))
    ov.save_model(d, str(out / "openvino_detokenizer.xml"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (hf_dir / name).is_file() and not (out / name).exists():
            shutil.copyfile(hf_dir / name, out / name)


def _feeds(ids):
    import numpy as np

    n = len(ids)
    return {"input_ids": ids[None, :], "attention_mask": np.ones((1, n), np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None, :], "beam_idx": np.zeros(1, np.int32)}


def _compress(fp_xml: Path, out_xml: Path, req: LlmRequest, group: int, ratio: float, calib) -> list[str]:
    import nncf
    import openvino as ov

    M = nncf.CompressWeightsMode
    if req.weights == "int8":
        mode = M.INT8_SYM if req.sym else M.INT8_ASYM
        kw: dict = {}
    else:
        mode = M.INT4_SYM if req.sym else M.INT4_ASYM
        kw = {"group_size": group, "ratio": ratio}
        if calib:
            kw.update(dataset=nncf.Dataset([_feeds(c) for c in calib]), awq=True, scale_estimation=True,
                      subset_size=len(calib))
    model = ov.Core().read_model(str(fp_xml))
    try:
        with quiet("nncf"):
            compressed = nncf.compress_weights(model, mode=mode, **kw)
    except nncf.InvalidGroupSizeError as exc:
        raise InputError(f"group size {group} does not divide every layer's width "
                         f"({str(exc).splitlines()[0][:120]})", hint="choose one that divides the model's hidden "
                         "and intermediate sizes, or --group-size -1 (per channel)") from None
    ov.save_model(compressed, str(out_xml), compress_to_fp16=False)
    what = f"{mode.value}" + (f", group size {group}, int4 ratio {ratio:g}" if req.weights == "int4" else "")
    return [f"weights {what}" + (f", AWQ + scale estimation on {len(calib)} calibration chunks" if kw.get("awq")
                                 else ", data-free")]


def _golden(model_dir: Path, prompts, new_tokens: int, options: dict) -> tuple[list[dict], dict]:
    import openvino_genai as genai

    with quiet("openvino-genai"):
        pipe = genai.LLMPipeline(str(model_dir), "CPU", **options)
    cfg = genai.GenerationConfig()
    cfg.max_new_tokens, cfg.do_sample = new_tokens, False
    out, ttft, tpot, tps = [], [], [], []
    for p in prompts:
        res = pipe.generate([p], cfg)
        text = res.texts[0]
        pm = res.perf_metrics
        ttft.append(pm.get_ttft().mean)
        tpot.append(pm.get_tpot().mean)
        tps.append(pm.get_throughput().mean)
        out.append({"prompt": p, "max_new_tokens": new_tokens, "expected": text})
    med = statistics.median_high
    return out, {"ttft_ms": round(med(ttft), 2), "tpot_ms": round(med(tpot), 2),
                 "tokens_per_s": round(med(tps), 1), "prompts": len(prompts), "new_tokens": new_tokens}


def build_llm_package(req: LlmRequest, progress) -> LlmResult:
    _require()
    from ..package import (TEXT_FORMAT_VERSION, CalibrationInfo, Manifest, SourceModel, TensorSpec,
                           TextGenerationInfo, load_private_key, write_package)
    from ..profile import load_profile
    from . import source

    profile = load_profile(req.profile)
    llm = profile.llm
    if llm is None:
        raise UnsupportedError(f"profile {profile.name!r} has no [llm] section: text generation is packaged for "
                               f"the OpenVINO profiles (cpu; igpu and npu built on this host's CPU)")
    if req.weights is None:
        req = dataclasses.replace(req, weights=llm.weights)
    if req.weights not in ("int4", "int8"):
        raise InputError(f"--weights {req.weights!r}: text generation compresses weights to int4 or int8")
    if req.group_size is not None and req.group_size != -1 and req.group_size < 2:
        raise InputError(f"--group-size {req.group_size}: a group has 2 or more weights, or -1 (per channel)")
    if not 0.0 <= req.ratio <= 1.0:
        raise InputError(f"--ratio {req.ratio}: the share of int4 layers is between 0 and 1")
    if req.sym is None:
        req = dataclasses.replace(req, sym=llm.symmetric)
    kind = profile.target.device.value
    device_notes = device_rules(llm, kind, req.weights, req.sym, req.group_size, req.ratio, req.accuracy_aware)
    private_key = load_private_key(req.sign_key) if req.sign_key else None
    if private_key is None and not req.unsigned:
        raise InputError("--sign-key KEY is required (or --no-sign)")
    budget = TextBudget(profile.accuracy.min_token_agreement, profile.accuracy.max_kl,
                        profile.accuracy.max_ppl_increase_pct)
    heldout = read_text(req.heldout_text, "--heldout-text")
    calib_text = read_text(req.calib_text, "--calib-text") if req.calib_text else None
    options, host = runtime_options(llm), host_options(llm)
    note = proxy_note(llm, kind, options, host)
    decisions: list[str] = list(device_notes)
    for n in device_notes:
        progress.warn(n)
    with tempfile.TemporaryDirectory(prefix="edgeopt-llm-") as tmp:
        work = Path(tmp)
        with progress.stage("load the language model"):
            src = source.resolve(req.model, work)
            for n in src.notes:
                progress.note(n)
            decisions.extend(src.notes)
        cfg = json.loads((src.hf_dir / "config.json").read_text("utf-8"))
        fp_dir = work / "fp32"
        with progress.stage("export to OpenVINO (stateful, float32) and convert the tokenizer"):
            _export(src.hf_dir, fp_dir, progress)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(fp_dir), local_files_only=True)
        bos = tok.bos_token_id if getattr(tok, "add_bos_token", False) else None
        held_chunks = chunk_ids(tok(heldout, add_special_tokens=False).input_ids, req.chunk_tokens,
                                req.max_chunks, bos)
        if not held_chunks:
            raise InputError("the held-out text is too short: it needs 16 tokens or more")
        calib = None
        if calib_text is not None:
            calib = chunk_ids(tok(calib_text, add_special_tokens=False).input_ids, 128, 32, bos)
            if not calib:
                raise InputError("--calib-text is too short: it needs 16 tokens or more")
        group = req.group_size if req.group_size is not None else (
            llm.group_size if llm.group_size != "auto" else auto_group_size(cfg, llm.group_sizes))
        progress.note(f"held-out text: {sum(len(c) for c in held_chunks)} tokens in {len(held_chunks)} chunks"
                      + (f"; calibration text: {len(calib)} chunks" if calib else "; no calibration text "
                         "(data-free compression)"))
        ref = LogitsRunner(fp_dir / "openvino_model.xml")
        # Once, reused by every attempt: at most max_chunks x chunk_tokens x vocabulary float32 (400 MB for 8 x
        # 256 x 49152), against re-running the float model per attempt.
        ref_logits = [ref(c) for c in held_chunks]
        del ref
        out_dir = work / "package"
        shutil.copytree(fp_dir, out_dir, ignore=shutil.ignore_patterns("openvino_model.*"))
        ratios = [req.ratio] + ([r for r in RATIO_STEPS if r < req.ratio] if req.accuracy_aware
                                and req.weights == "int4" else [])
        figures = None
        for ratio in ratios:
            label = f"{req.weights}" + (f" (int4 ratio {ratio:g})" if req.weights == "int4" else "")
            with progress.stage(f"compress weights: {label}"):
                notes = _compress(fp_dir / "openvino_model.xml", out_dir / "openvino_model.xml", req, group,
                                  ratio, calib)
                for n in notes:
                    progress.note(n)
            with progress.stage(f"accuracy on held-out text: {label}"):
                q = LogitsRunner(out_dir / "openvino_model.xml")
                figures = compare(ref_logits, q, held_chunks, budget)
                del q
                progress.note(("PASS " if figures.passed else "FAIL ") + figures.line())
            if figures.passed:
                decisions.extend(notes)
                break
        assert figures is not None
        if not figures.passed:
            sensitive = ""
            if req.weights == "int4":
                from .gate import int4_weight_errors

                worst = int4_weight_errors(fp_dir / "openvino_model.xml", group, req.sym)
                sensitive = ("; most sensitive layers (relative int4 weight error, a data-free proxy): "
                             + ", ".join(f"{n} ({e:.3f})" for n, e in worst))
            raise AccuracyError(
                f"{req.weights} weights miss the text budget of profile {profile.name!r}: "
                f"{'; '.join(figures.failures)}{sensitive}; no package written",
                hint=("rerun with --accuracy-aware (keeps the most sensitive layers in int8)" if req.weights ==
                      "int4" and not req.accuracy_aware else "use --weights int8, give --calib-text for AWQ and "
                      "scale estimation, or loosen the profile's text budget"))
        if len(ratios) > 1 and ratio != ratios[0]:
            decisions.append(f"accuracy-aware: int4 ratio lowered from {ratios[0]:g} to {ratio:g} (NNCF keeps "
                             f"the most sensitive layers in int8)")
        with progress.stage("golden prompts through OpenVINO GenAI"):
            golden, perf = _golden(out_dir, req.prompts, req.golden_tokens, host)
            progress.note(f"host CPU: time to first token {perf['ttft_ms']} ms, {perf['tpot_ms']} ms per output "
                          f"token ({perf['tokens_per_s']} tokens/s), median of {len(golden)} prompts")
        perf.update(host_proxy=note is not None, run_device="CPU", target_device=llm.device, host_options=host,
                    proxy_note=note)
        if note is not None:
            progress.warn(note)
            decisions.append(note)
        context = int(cfg.get("max_position_embeddings") or 0)
        if llm.max_prompt_len is not None:
            # The NPU's static pipeline holds MAX_PROMPT_LEN + MIN_RESPONSE_LEN tokens, not the model's context.
            device_context = llm.max_prompt_len + (llm.min_response_len or 128)
            if not context or device_context < context:
                decisions.append(f"context {device_context} tokens on the {llm.device} (MAX_PROMPT_LEN "
                                 f"{llm.max_prompt_len} + MIN_RESPONSE_LEN {llm.min_response_len or 128}), of the "
                                 f"model's {context or 'unknown'}")
                context = device_context
        import openvino as ov
        import openvino_genai as genai

        info = TextGenerationInfo(
            architecture=src.architecture, context_length=context,
            weights=req.weights, group_size=group if req.weights == "int4" else None, symmetric=req.sym,
            int4_ratio=ratio if req.weights == "int4" else None, data_aware=calib is not None,
            kv_cache_precision=llm.kv_cache_precision, budget=vars(budget), figures=figures.to_dict(),
            golden=golden, host_perf=perf, chat_template=bool(getattr(tok, "chat_template", None)),
            eos_token_id=tok.eos_token_id)
        name = req.name or Path(src.filename).stem.split(".")[0]
        manifest = Manifest(
            format_version=TEXT_FORMAT_VERSION, name=_safe_name(name), version=req.version, profile=profile.model_dump(mode="json"),
            runtime=RUNTIME, runtime_version=genai.__version__.split("-")[0], device=llm.device,
            precision=f"{req.weights}-weight-only", model_file="openvino_model.xml",
            inputs=[TensorSpec(name="input_ids", dtype="int64", shape=[1, "tokens"])],
            outputs=[TensorSpec(name="logits", dtype="float32", shape=[1, "tokens", int(cfg.get("vocab_size", 0))])],
            source_model=SourceModel(filename=src.filename, format=src.format, sha256=src.sha256),
            calibration=CalibrationInfo(source="text" if calib else "none", samples=len(calib or []),
                                        meaningful=True),
            toolchain={"openvino": ov.__version__.split("-")[0], "openvino-genai": genai.__version__,
                       "nncf": _version("nncf"), "optimum-intel": _version("optimum-intel"),
                       "transformers": _version("transformers")},
            decisions=decisions, runtime_options=options, text=info)
        artifacts = {p.name: p for p in sorted(out_dir.iterdir()) if p.is_file()}
        with progress.stage("sign and write"):
            written = write_package(req.output, manifest, artifacts, private_key)
    return LlmResult(output=Path(req.output), manifest=written, figures=figures, signed=private_key is not None)


def _safe_name(name: str) -> str:
    import re

    s = re.sub(r"[^A-Za-z0-9._-]", "-", name).strip("-._") or "model"
    return s[:128]


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return ""
