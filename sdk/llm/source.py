"""Language-model inputs: a GGUF file or a Hugging Face folder, turned into a checked Hugging Face folder.

GGUF (llama.cpp's format): the weights are dequantized by transformers' GGUF loader (it calls the ``gguf``
package's dequantizers and undoes llama.cpp's q/k row permutation); the tokenizer is rebuilt here from the
file's own metadata, because transformers 5.5 maps a ``gpt2``-type (byte-level BPE) GGUF vocabulary to a
SentencePiece-style tokenizer that encodes every space as the unknown token (measured on SmolLM2-135M: "The
capital of France" became ``The <unk> capital <unk> of <unk> France``).

A Hugging Face folder must hold config.json naming a ``*ForCausalLM`` architecture, a tokenizer and weights in
safetensors. Pickled ``pytorch_model.bin`` weights are refused: unpickling a file is running its code.
Every input is bounded: file sizes, the GGUF header's counts, config.json's size.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, UnsupportedError

log = logging.getLogger(__name__)

MAX_CONFIG_BYTES = 1 << 20
MAX_MODEL_BYTES = 64 * 1024**3
# Architectures optimum-intel exports as stateful decoder-only models and OpenVINO GenAI serves; others are
# refused up front instead of failing deep inside the export.
ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "granite",
                 "olmo", "stablelm", "falcon", "gpt2", "gpt_neox", "gptj", "bloom", "opt"}


@dataclass
class LlmSource:
    hf_dir: Path
    format: str  # gguf | hf
    filename: str
    architecture: str
    size_bytes: int
    sha256: str
    notes: list[str]


def looks_like_llm(model: Path) -> bool:
    """A .gguf file, or a folder whose config.json names a causal-LM architecture."""
    model = Path(model)
    if model.suffix.lower() == ".gguf":
        return True
    cfg = model / "config.json"
    if model.is_dir() and cfg.is_file() and cfg.stat().st_size <= MAX_CONFIG_BYTES:
        try:
            archs = json.loads(cfg.read_text("utf-8")).get("architectures") or []
        except (ValueError, UnicodeDecodeError, AttributeError):
            return False
        return any(str(a).endswith("ForCausalLM") for a in archs)
    return False


def resolve(model: Path, work: Path) -> LlmSource:
    model = Path(model)
    if not model.exists():
        raise InputError(f"{model}: no such file or folder")
    if model.is_dir():
        return _hf_folder(model)
    if model.suffix.lower() != ".gguf":
        raise InputError(f"{model.name}: a language model is a .gguf file or a Hugging Face folder "
                         f"(config.json, *.safetensors, tokenizer)")
    return _from_gguf(model, work)


def _read_config(folder: Path) -> dict:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise InputError(f"{folder}: no config.json (a Hugging Face model folder has config.json, "
                         f"*.safetensors and a tokenizer)")
    if cfg.stat().st_size > MAX_CONFIG_BYTES:
        raise InputError(f"{cfg}: {cfg.stat().st_size} bytes, larger than any model config ({MAX_CONFIG_BYTES})")
    try:
        doc = json.loads(cfg.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{cfg}: not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{cfg}: not a JSON object")
    return doc


def _hf_folder(folder: Path) -> LlmSource:
    cfg = _read_config(folder)
    archs = cfg.get("architectures") or []
    if not any(str(a).endswith("ForCausalLM") for a in archs):
        raise InputError(f"{folder}: config.json names no *ForCausalLM architecture ({archs or 'none'}); "
                         f"--task text-generation needs a decoder-only language model")
    model_type = str(cfg.get("model_type", "?"))
    if model_type not in ARCHITECTURES:
        raise UnsupportedError(f"{folder}: model_type {model_type!r} is not one edgeopt exports "
                               f"({', '.join(sorted(ARCHITECTURES))})")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        raise InputError(f"{folder}: no *.safetensors weights" + (
            f" ({', '.join(pickled[:3])} is pickled: unpickling runs the file's code, so edgeopt refuses it; "
            f"convert it with safetensors' convert script on a trusted machine)" if pickled else ""))
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise InputError(f"{folder}: no tokenizer (tokenizer.json or tokenizer.model)")
    size = sum(p.stat().st_size for p in weights)
    if size > MAX_MODEL_BYTES:
        raise InputError(f"{folder}: {size / 1e9:.1f} GB of weights, over the {MAX_MODEL_BYTES / 1e9:.0f} GB bound")
    from ..package import sha256_file

    digest = sha256_file(weights[0]) if len(weights) == 1 else _digest_all(weights)
    return LlmSource(hf_dir=folder, format="hf", filename=folder.name, architecture=model_type, size_bytes=size,
                     sha256=digest,
                     notes=[f"Hugging Face folder: {model_type}, {len(weights)} safetensors file(s), "
                            f"{size / 1e6:.0f} MB"])


def _gguf_field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _from_gguf(path: Path, work: Path) -> LlmSource:
    size = path.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise InputError(f"{path.name}: {size / 1e9:.1f} GB, over the {MAX_MODEL_BYTES / 1e9:.0f} GB bound")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise InputError(f"{path.name}: not a GGUF file (it starts with {magic!r}, a GGUF file with b'GGUF')")
    try:
        import gguf
    except ImportError:
        from ..errors import missing_extra

        raise missing_extra("gguf", "llm") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001  the reader raises ValueError, IndexError, struct and numpy errors
        raise InputError(f"{path.name}: not a readable GGUF file ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:160] if str(exc) else 'truncated or corrupt'})") from None
    arch = str(_gguf_field(reader, "general.architecture") or "?")
    if arch not in ARCHITECTURES:
        raise UnsupportedError(f"{path.name}: architecture {arch!r} is not one edgeopt exports "
                               f"({', '.join(sorted(ARCHITECTURES))})")
    hf_dir = work / "hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    notes = [f"GGUF: {arch}, {len(reader.tensors)} tensors, "
             f"{sorted({t.tensor_type.name for t in reader.tensors})}; dequantized to float32 by transformers"]
    tok_model = _gguf_field(reader, "tokenizer.ggml.model")
    tokenizer = _gguf_tokenizer(reader, path) if tok_model == "gpt2" else None
    del reader
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet("transformers"):
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         local_files_only=True)
    except Exception as exc:  # noqa: BLE001  transformers raises many types for a file it cannot map
        raise InputError(f"{path.name}: transformers could not load its weights ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else '?'})") from None
    if not model.config.architectures:
        model.config.architectures = [type(model).__name__]
    with quiet("transformers"):
        model.save_pretrained(str(hf_dir), safe_serialization=True)
    del model
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        notes.append(f"tokenizer: transformers' GGUF converter ({tok_model})")
    else:
        notes.append("tokenizer: byte-level BPE rebuilt from the GGUF vocabulary and merges")
    tokenizer.save_pretrained(str(hf_dir))
    from ..package import sha256_file

    return LlmSource(hf_dir=hf_dir, format="gguf", filename=path.name, architecture=arch, size_bytes=size,
                     sha256=sha256_file(path), notes=notes)


def _digest_all(files) -> str:
    """sha256 over the sha256 of each weight file, in name order (a folder has no single file to hash)."""
    import hashlib

    from ..package import sha256_file

    return hashlib.sha256("".join(sha256_file(p) for p in files).encode()).hexdigest()


def _gguf_tokenizer(reader, path: Path):
    """A byte-level BPE tokenizer (GPT-2 style) from the GGUF's tokens, merges, token types and special ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    merges = _gguf_field(reader, "tokenizer.ggml.merges")
    types = _gguf_field(reader, "tokenizer.ggml.token_type") or []
    if not tokens or not merges:
        raise InputError(f"{path.name}: its gpt2 tokenizer has no tokens or merges")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        a, sep, b = str(m).partition(" ")
        if not sep:
            raise InputError(f"{path.name}: tokenizer merge {str(m)[:40]!r} is not two tokens")
        pairs.append((a, b))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))
    pre = _gguf_field(reader, "tokenizer.ggml.pre")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # llama.cpp's 'smollm' pre-tokenizer splits digits one by one before the GPT-2 split (as SmolLM's own
    # tokenizer.json does); the others edgeopt has seen use the GPT-2 split alone.
    tk.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                        if pre == "smollm" else byte_level)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if int(ty) == 3])  # 3: control tokens

    def tok(key):
        i = _gguf_field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=tok("bos"), eos_token=tok("eos"),
                                   unk_token=tok("unknown"), pad_token=tok("padding"))
    template = _gguf_field(reader, "tokenizer.chat_template")
    if template:
        fast.chat_template = str(template)
    return fast


def _quiet_transformers() -> None:
    """transformers' and optimum's warnings and progress bars go through logging (visible with -v)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub: inputs are local
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass
    logging.captureWarnings(True)


MAX_QUIET_LOG = 64 * 1024


@contextlib.contextmanager
def quiet(tool: str):
    """What the export and compression libraries print (NNCF's tables, transformers' warnings, progress bars)
    goes to this module's logger at DEBUG (``-v``), never onto the terminal or into --json's stdout."""
    import warnings

    buf = io.StringIO()
    try:
        import nncf

        nncf.set_log_level(logging.WARNING)
    except ImportError:
        pass
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            text = buf.getvalue()
            if text.strip():
                log.debug("%s: %s%s", tool, text[:MAX_QUIET_LOG],
                          f" ... ({len(text) - MAX_QUIET_LOG} more characters)" if len(text) > MAX_QUIET_LOG else "")
