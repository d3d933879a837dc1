"""vad: a voice-activity model (one speech probability per step of a stream) judged by its decisions.

A stream's users see two things: whether each frame (step) is speech, and the speech segments found. Each
is compared with fp32's on the same held-out sequences, every step fed the state the model itself returned:
per-frame agreement of the decision ``p >= vad_threshold``, and the F1 of the segments (a segment matches a
fp32 one at IoU >= 0.5). Segments follow Silero's hysteresis: speech starts at ``p >= threshold`` and ends
when ``p < threshold - 0.15`` for a few frames.
"""
from __future__ import annotations

import numpy as np

from .base import TaskEvaluator, TaskResult, at_least

NEG_MARGIN = 0.15  # Silero's get_speech_timestamps: neg_threshold = threshold - 0.15
MIN_SILENCE_FRAMES = 3  # ~100 ms at 32 ms frames
MIN_SPEECH_FRAMES = 4  # ~128 ms


def speech_output(reference: list[dict], state_outputs: list[str]) -> str | None:
    """The one output (besides state outputs) holding one probability in [0, 1] per batch row."""
    names = [n for n in reference[0] if n not in state_outputs]
    if len(names) != 1:
        return None
    name = names[0]
    values = [np.asarray(r[name]) for r in reference[:64]]
    if any(v.size == 0 or v.size > max(1, v.shape[0] if v.ndim else 1) for v in values):
        return None
    lo, hi = min(float(v.min()) for v in values), max(float(v.max()) for v in values)
    return name if lo >= -1e-6 and hi <= 1 + 1e-6 else None


def frame_probs(outputs: list[dict], name: str) -> np.ndarray:
    """[steps, batch] speech probabilities."""
    return np.stack([np.asarray(o[name], np.float64).reshape(-1) for o in outputs])


def segments(probs: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Speech segments [start, end) of one stream's probabilities (hysteresis, minimum lengths)."""
    out, start, quiet = [], None, 0
    for i, p in enumerate(probs):
        if start is None:
            if p >= threshold:
                start, quiet = i, 0
            continue
        quiet = quiet + 1 if p < threshold - NEG_MARGIN else 0
        if quiet >= MIN_SILENCE_FRAMES:
            end = i - quiet + 1
            if end - start >= MIN_SPEECH_FRAMES:
                out.append((start, end))
            start = None
    if start is not None and len(probs) - start >= MIN_SPEECH_FRAMES:
        out.append((start, len(probs)))
    return out


def segment_f1(ref: list[tuple[int, int]], opt: list[tuple[int, int]]) -> float:
    if not ref and not opt:
        return 1.0
    used, hits = set(), 0
    for a in ref:
        for j, b in enumerate(opt):
            if j in used:
                continue
            inter = max(0, min(a[1], b[1]) - max(a[0], b[0]))
            union = max(a[1], b[1]) - min(a[0], b[0])
            if union and inter / union >= 0.5:
                used.add(j)
                hits += 1
                break
    return 2.0 * hits / (len(ref) + len(opt))


class VadEvaluator(TaskEvaluator):
    task = "vad"

    def evaluate(self, reference: list[dict], optimized: list[dict], labels=None) -> TaskResult:
        from ...errors import InputError

        name = speech_output(reference, self.info.state_outputs)
        if name is None:
            raise InputError("--task vad needs one output (besides state outputs) with one speech probability in "
                             f"[0, 1] per row; the outputs are {list(reference[0])}")
        thr = self.budget.vad_threshold
        ref, opt = frame_probs(reference, name), frame_probs(optimized, name)
        agreement = float(np.mean((ref >= thr) == (opt >= thr))) if ref.size else 1.0
        starts = [s for s in (self.options.starts or [0]) if s < len(reference)] or [0]
        ends = starts[1:] + [len(reference)]
        f1s, found = [], 0
        for lo, hi in zip(starts, ends):
            for col in range(ref.shape[1]):
                a, b = segments(ref[lo:hi, col], thr), segments(opt[lo:hi, col], thr)
                found += len(a)
                f1s.append(segment_f1(a, b))
        f1 = float(np.mean(f1s)) if f1s else 1.0
        checks = [at_least(f"frame decision agreement ({name} >= {thr:g})", agreement,
                           self.budget.min_frame_agreement),
                  at_least("speech segment F1", f1, self.budget.min_segment_f1)]
        checks.sort(key=lambda c: (c.passed, c.optimized))
        return TaskResult(checks=checks, figures={"frames": float(ref.size), "fp32_segments": float(found),
                                                  "max_prob_error": float(np.max(np.abs(ref - opt))) if ref.size
                                                  else 0.0},
                          notes=[f"{ref.size} frames in {len(starts)} sequence(s), {found} fp32 speech segment(s)"])
