"""Speech-like audio made in the test (no downloads): voiced syllables between stretches of quiet noise.

A syllable is a glottal pulse train (pitch 90-230 Hz with a glide) shaped by three vowel formants in the
frequency domain, under a smooth envelope, plus a little aspiration noise; speech bursts of 2-6 syllables
alternate with 0.3-1.2 s of low noise. Real voice-activity models (Silero VAD) call these bursts speech.
``truth`` marks the samples inside a burst.
"""
from __future__ import annotations

import numpy as np

RATE = 16000
CHUNK = 512  # 32 ms at 16 kHz: Silero VAD's frame
CONTEXT = 64  # Silero VAD v5 takes each frame with the last 64 samples of the frame before (576 in all)
VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410),
          (660, 1720, 2410), (440, 1020, 2240))
BANDWIDTHS = (90.0, 110.0, 170.0)


def _rosenberg(period: int, open_q: float = 0.6) -> np.ndarray:
    """One glottal flow pulse (Rosenberg): opening, closing, closed phase."""
    tp, tn = max(2, int(period * open_q * 0.7)), max(1, int(period * open_q * 0.3))
    rise = 0.5 * (1 - np.cos(np.pi * np.arange(tp) / tp))
    fall = np.cos(0.5 * np.pi * np.arange(tn) / tn)
    return np.concatenate([rise, fall, np.zeros(max(0, period - tp - tn))])


def _resonate(x: np.ndarray, freqs: np.ndarray, bws: tuple[float, ...], block: int = 80) -> np.ndarray:
    """A cascade of two-pole resonators whose frequencies move every ``block`` samples (a formant synthesizer)."""
    from scipy.signal import lfilter

    y = x.copy()
    for k, bw in enumerate(bws):
        out = np.empty_like(y)
        zi = np.zeros(2)
        r = np.exp(-np.pi * bw / RATE)
        for b0 in range(0, len(y), block):
            f = freqs[min(b0, len(freqs) - 1), k]
            a = [1.0, -2 * r * np.cos(2 * np.pi * f / RATE), r * r]
            gain = 1 - r  # keeps each resonator's peak near unity
            out[b0:b0 + block], zi = lfilter([gain], a, y[b0:b0 + block], zi=zi)
        y = out
    return y


def _syllable(rng: np.random.Generator, n: int, f0: float) -> np.ndarray:
    """Consonant onset (a noise burst or fricative) then a vowel gliding to another vowel."""
    cons = int(rng.uniform(0.03, 0.07) * RATE)
    vowel = n - cons
    # Glottal source with jitter and shimmer, pitch falling through the syllable.
    src, pos = np.zeros(vowel + 400), 0
    while pos < vowel:
        frac = pos / vowel
        period = int(RATE / (f0 * (1.05 - 0.15 * frac) * (1 + 0.01 * rng.standard_normal())))
        src[pos:pos + period] += _rosenberg(period) * (1 + 0.05 * rng.standard_normal())
        pos += period
    src = np.diff(src[:vowel + 1])  # lip radiation
    src += 0.003 * rng.standard_normal(vowel)  # breath
    a, b = VOWELS[rng.integers(len(VOWELS))], VOWELS[rng.integers(len(VOWELS))]
    t = np.linspace(0, 1, vowel)[:, None] ** 1.5
    tract = np.asarray(a) * (1 - t) + np.asarray(b) * t
    tract = np.concatenate([tract, np.tile([[3500, 4500, 0]], (vowel, 1))[:, :2]], axis=1)
    voiced = _resonate(src, tract, BANDWIDTHS + (250.0, 300.0))
    voiced *= np.sin(np.linspace(0, np.pi, vowel)) ** 0.4
    noise = rng.standard_normal(cons)
    centre = rng.uniform(2500, 6000)
    fric = _resonate(noise, np.full((cons, 1), centre), (800.0,)) * np.hanning(cons)
    fric *= rng.uniform(0.1, 0.4) * np.max(np.abs(voiced)) / (np.max(np.abs(fric)) + 1e-9)
    out = np.concatenate([fric, voiced])
    return out / (np.max(np.abs(out)) + 1e-9)


def speech_like(seconds: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(audio float32 in [-1, 1] at 16 kHz, truth bool per sample), starting and ending with quiet."""
    rng = np.random.default_rng(seed)
    total = int(seconds * RATE)
    audio = np.zeros(total, np.float64)
    truth = np.zeros(total, bool)
    pos = int(rng.uniform(0.3, 0.8) * RATE)
    while pos < total - RATE // 2:
        start = pos
        f0 = rng.uniform(100, 220)
        for i in range(int(rng.integers(3, 9))):
            n = int(rng.uniform(0.15, 0.3) * RATE)
            if pos + n >= total:
                break
            audio[pos:pos + n] += rng.uniform(0.2, 0.5) * _syllable(rng, n, f0 * (1 - 0.02 * i))
            pos += n + int(rng.uniform(0.0, 0.03) * RATE)
        truth[start:pos] = True
        pos += int(rng.uniform(0.3, 1.2) * RATE)
    audio += 10 ** (-50 / 20) * rng.standard_normal(total)  # quiet room noise
    return np.clip(audio, -1, 1).astype(np.float32), truth


def chunks(audio: np.ndarray) -> np.ndarray:
    """[steps, 512] frames (the tail that does not fill a frame is dropped)."""
    steps = len(audio) // CHUNK
    return audio[: steps * CHUNK].reshape(steps, CHUNK)


def frames(audio: np.ndarray) -> np.ndarray:
    """[steps, 576] model inputs: each 512-sample chunk after the last 64 samples of the one before (zeros
    before the first), as Silero VAD's own wrapper feeds the model."""
    c = chunks(audio)
    ctx = np.concatenate([np.zeros((1, CONTEXT), c.dtype), c[:-1, -CONTEXT:]])
    return np.concatenate([ctx, c], axis=1)


def vad_sequences(n: int, seconds: float, seed: int) -> dict[str, np.ndarray]:
    """An .npz dict of ``n`` streams for Silero VAD: ``<seq>/<step>/input`` [1, 576] and ``<seq>/<step>/sr``
    (int64 scalar 16000); the state is left out (it starts at zeros and is carried)."""
    arrays = {}
    for s in range(n):
        audio, _ = speech_like(seconds, seed + s)
        for t, frame in enumerate(frames(audio)):
            arrays[f"{s}/{t}/input"] = frame[None, :]
            arrays[f"{s}/{t}/sr"] = np.array(RATE, np.int64)
    return arrays
