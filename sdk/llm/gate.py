"""The accuracy gate for text generation: a compressed language model against its uncompressed original.

Both models read the same held-out text, teacher-forced (each position sees the true text before it), in chunks
of ``chunk_tokens``. At every position the gate compares the two next-token distributions:

* **top-1 agreement**: the share of positions where both models would pick the same next token (what greedy
  decoding sees);
* **KL divergence** KL(original || compressed), in nats, averaged over positions (how far the whole distribution
  moved, which sampling sees);
* **perplexity** of each model on the text's real next tokens, and the compressed model's increase in percent.

The runs use OpenVINO alone (the exported stateful IR: input_ids, attention_mask, position_ids, beam_idx ->
logits), never torch, so what is judged is what the device runs. Memory is bounded: :func:`compare` holds one
chunk's logits at a time ([chunk_tokens, vocab] float32, 48 MB for 256 x 49152) and running sums; the package build
keeps the float model's logits of every chunk (at most max_chunks of them) so each compression attempt is judged
without running the float model again.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class TextBudget:
    min_token_agreement: float
    max_kl: float
    max_ppl_increase_pct: float


@dataclass
class TextFigures:
    positions: int
    chunks: int
    token_agreement: float
    mean_kl: float
    p95_kl: float
    ppl_original: float
    ppl_compressed: float
    ppl_increase_pct: float
    passed: bool = True
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (f"top-1 agreement {self.token_agreement:.4f}, KL {self.mean_kl:.4f} nats (p95 {self.p95_kl:.4f}), "
                f"perplexity {self.ppl_original:.2f} -> {self.ppl_compressed:.2f} ({self.ppl_increase_pct:+.1f}%), "
                f"{self.positions} positions")


def chunk_ids(ids: list[int], chunk_tokens: int, max_chunks: int, bos: int | None) -> list[np.ndarray]:
    """The token stream cut into chunks of ``chunk_tokens`` (the last partial one kept if it has 16+ tokens),
    each led by the BOS token where the model has one."""
    step = chunk_tokens - (1 if bos is not None else 0)
    out = []
    for start in range(0, len(ids), step):
        piece = ids[start:start + step]
        if len(piece) < 16:
            break
        if bos is not None:
            piece = [bos] + piece
        out.append(np.asarray(piece, dtype=np.int64))
        if len(out) >= max_chunks:
            break
    return out


class LogitsRunner:
    """Teacher-forced logits of an exported stateful OpenVINO LLM, one chunk per call."""

    def __init__(self, model_xml, threads: int | None = None):
        import openvino as ov

        core = ov.Core()
        cfg = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            cfg["INFERENCE_NUM_THREADS"] = int(threads)
        # Judge in f32: the CPU plugin would run bf16 on avx512_bf16/AMX hosts and move the reference itself.
        cfg["INFERENCE_PRECISION_HINT"] = "f32"
        model = core.read_model(str(model_xml))
        self.inputs = {p.get_any_name() for p in model.inputs}
        self.compiled = core.compile_model(model, "CPU", cfg)
        self.request = self.compiled.create_infer_request()

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        n = len(ids)
        feeds = {"input_ids": ids[None, :], "attention_mask": np.ones((1, n), np.int64)}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(n, dtype=np.int64)[None, :]
        if "beam_idx" in self.inputs:
            feeds["beam_idx"] = np.zeros(1, np.int32)
        self.request.reset_state()
        self.request.infer(feeds)
        return np.array(self.request.get_tensor("logits").data[0], dtype=np.float32, copy=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def compare(original, compressed, chunks: list[np.ndarray], budget: TextBudget) -> TextFigures:
    """Run both models (callables ids -> logits [T, V]) over ``chunks`` and judge the compressed one.
    ``original`` may also be the original's logits already computed, one array per chunk (the build runs the
    float model once and judges every compression attempt against them)."""
    agree = positions = 0
    nll_o = nll_c = 0.0
    kls: list[np.ndarray] = []
    for i, ids in enumerate(chunks):
        ref = original(ids) if callable(original) else original[i]
        lo, lc = _log_softmax(ref[:-1]), _log_softmax(compressed(ids)[:-1])
        target = ids[1:]
        agree += int((lo.argmax(-1) == lc.argmax(-1)).sum())
        positions += len(target)
        rows = np.arange(len(target))
        nll_o -= float(lo[rows, target].sum())
        nll_c -= float(lc[rows, target].sum())
        kls.append((np.exp(lo) * (lo - lc)).sum(-1))
    if positions == 0:
        raise ValueError("the held-out text is too short: no chunk of 16 tokens or more")
    kl = np.concatenate(kls)
    ppl_o, ppl_c = math.exp(nll_o / positions), math.exp(nll_c / positions)
    fig = TextFigures(positions=positions, chunks=len(chunks), token_agreement=agree / positions,
                      mean_kl=float(kl.mean()), p95_kl=float(np.percentile(kl, 95)), ppl_original=ppl_o,
                      ppl_compressed=ppl_c, ppl_increase_pct=(ppl_c / ppl_o - 1) * 100)
    if fig.token_agreement < budget.min_token_agreement:
        fig.failures.append(f"top-1 agreement {fig.token_agreement:.4f} < {budget.min_token_agreement}")
    if fig.mean_kl > budget.max_kl:
        fig.failures.append(f"KL {fig.mean_kl:.4f} > {budget.max_kl}")
    if fig.ppl_increase_pct > budget.max_ppl_increase_pct:
        fig.failures.append(f"perplexity +{fig.ppl_increase_pct:.1f}% > +{budget.max_ppl_increase_pct}%")
    fig.passed = not fig.failures
    return fig


def layer_name(friendly: str) -> str:
    """'__module.model.layers.28.mlp.up_proj/aten::linear/MatMul' -> 'model.layers.28.mlp.up_proj'."""
    head = friendly.split("/", 1)[0]
    return head[len("__module."):] if head.startswith("__module.") else head


def int4_weight_errors(model_xml, group_size: int, symmetric: bool, top: int = 5) -> list[tuple[str, float]]:
    """The ``top`` linear layers whose weights int4 moves most: relative Frobenius error ||W - Q(W)|| / ||W||
    of group-wise rounding as NNCF does it (asymmetric: 16 levels between each group's min and max, integer
    zero point; symmetric: 16 levels around 0). A data-free proxy for which layers to keep in int8, named in
    the gate's refusal; it is labelled as such."""
    import openvino as ov

    model = ov.Core().read_model(str(model_xml))
    out: list[tuple[str, float]] = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        src = op.input_value(1).get_node()
        if src.get_type_name() != "Constant":
            continue
        name = layer_name(op.get_friendly_name())
        if name.endswith("lm_head"):  # NNCF keeps the output projection (tied to the embedding) in int8
            continue
        w = src.get_data().astype(np.float32)
        if w.ndim != 2 or w.size < 4096:
            continue
        attrs = op.get_attributes()
        w = w if attrs.get("transpose_b", False) else w.T  # rows = output channels, columns = input channels
        g = w.shape[1] if group_size in (-1, None) or w.shape[1] % group_size else group_size
        blocks = w.reshape(w.shape[0], -1, g)
        if symmetric:
            scale = np.abs(blocks).max(-1, keepdims=True) / 7.0
            scale[scale == 0] = 1.0
            q = np.clip(np.round(blocks / scale), -8, 7) * scale
        else:
            lo, hi = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
            scale = (hi - lo) / 15.0
            scale[scale == 0] = 1.0
            zp = np.round(-lo / scale)
            q = (np.clip(np.round(blocks / scale) + zp, 0, 15) - zp) * scale
        err = float(np.linalg.norm(blocks - q) / max(np.linalg.norm(blocks), 1e-12))
        out.append((name, err))
    out.sort(key=lambda t: -t[1])
    return out[:top]
