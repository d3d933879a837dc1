"""`edgeopt bench slm.eopkg --prompt-tokens 512 --new-tokens 128 --streams 1,8`: a language-model package served
by OpenVINO GenAI's continuous-batching pipeline (paged KV cache), as the agent serves it.

For each stream count S, S requests of exactly ``prompt_tokens`` tokens (cut from text edgeopt ships, each at a
different offset so prefix caching cannot share them) are added at once, each generating exactly ``new_tokens``
(EOS ignored); the pipeline is stepped until all finish. Per request: time to first token (TTFT) and the times
between its output tokens; per run: aggregate output tokens/s and the KV cache's peak use. Each stream count is
run ``rounds`` times after one warm-up, and medians are reported; the scaling ratio against one stream is
measured in the same run, never against a stored figure.
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import InputError


def _prompts(tokenizer, count: int, length: int) -> list[np.ndarray]:
    from .build import read_text

    ids = tokenizer.encode(read_text(None, "text")).input_ids.data[0].tolist()
    while len(ids) < length + count * 7:
        ids = ids + ids
    return [np.asarray(ids[i * 7:i * 7 + length], dtype=np.int64)[None, :] for i in range(count)]


def _run(pipe, prompts, new_tokens: int) -> dict:
    import openvino as ov
    import openvino_genai as genai

    cfg = genai.GenerationConfig()
    cfg.max_new_tokens = cfg.min_new_tokens = new_tokens
    cfg.ignore_eos, cfg.do_sample = True, False
    start = time.perf_counter()
    handles = [pipe.add_request(i, ov.Tensor(p), cfg) for i, p in enumerate(prompts)]
    first: dict[int, float] = {}
    stamps: dict[int, list[float]] = {i: [] for i in range(len(prompts))}
    counts = [0] * len(prompts)
    peak_cache = 0.0
    while pipe.has_non_finished_requests():
        pipe.step()
        now = time.perf_counter()
        peak_cache = max(peak_cache, float(pipe.get_metrics().cache_usage))
        for i, h in enumerate(handles):
            if h.can_read():
                got = sum(len(o.generated_ids) for o in h.read().values())
                if got:
                    first.setdefault(i, now - start)
                    stamps[i].append(now)
                    counts[i] += got
    wall = time.perf_counter() - start
    gaps = [b - a for s in stamps.values() for a, b in zip(s, s[1:])]
    # Steady state: from the moment the last request had its first token (every stream decoding) to the end.
    all_in = start + max(first.values()) if first else start
    steady = sum(1 for s in stamps.values() for t in s if t > all_in)
    last = max((s[-1] for s in stamps.values() if s), default=all_in)
    return {"wall_s": wall, "tokens": sum(counts), "tokens_per_s": sum(counts) / wall,
            "decode_tokens_per_s": steady / (last - all_in) if last > all_in else float("nan"),
            "ttft_ms": statistics.median(first.values()) * 1e3 if first else float("nan"),
            "tpot_ms": statistics.median(gaps) * 1e3 if gaps else float("nan"),
            "tpot_p95_ms": float(np.percentile(gaps, 95)) * 1e3 if gaps else float("nan"),
            "kv_cache_peak_pct": peak_cache}


def bench_llm(path: Path, streams: tuple[int, ...], prompt_tokens: int, new_tokens: int, rounds: int = 3,
              public_keys: list | None = None, threads: int | None = None) -> dict:
    from ..pipeline import benchmark
    from ..pipeline.hostbench import verified_extract

    if prompt_tokens < 1 or new_tokens < 1 or not streams or min(streams) < 1:
        raise InputError("--prompt-tokens, --new-tokens and every --streams value must be 1 or more")
    tmp = Path(tempfile.mkdtemp(prefix="edgeopt-llm-bench-"))
    try:
        m, root, signer = verified_extract(path, tmp / "pkg", public_keys)
        if m.text is None:
            raise InputError(f"{path}: not a language-model package (its task is not text-generation)")
        ctx = m.text.context_length
        if ctx and prompt_tokens + new_tokens > ctx:
            raise InputError(f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} exceed the model's "
                             f"context of {ctx} tokens")
        import openvino_genai as genai

        llm = m.profile.get("llm") or {}
        sched = genai.SchedulerConfig()
        sched.cache_size = max(1, int(round(float(llm.get("kv_cache_gb", 1.0)))))
        sched.max_num_seqs = max(max(streams), 1)
        sched.enable_prefix_caching = False  # every prompt differs; the figure is the model's, not the cache's
        sched.dynamic_split_fuse = True
        if m.device == "CPU":
            props = dict(m.runtime_options or {}) or {"KV_CACHE_PRECISION": m.text.kv_cache_precision}
        else:
            # A GPU/NPU package's runtime_options are its device's (f16, MAX_PROMPT_LEN...), which the CPU plugin
            # refuses or runs otherwise: run what its golden prompts ran on the build host.
            props = dict(m.text.host_perf.get("host_options") or {"INFERENCE_PRECISION_HINT": "f32"})
        if threads:
            props["INFERENCE_NUM_THREADS"] = int(threads)
        pipe = genai.ContinuousBatchingPipeline(str(root), sched, "CPU", props)
        prompts = _prompts(pipe.get_tokenizer(), max(streams), prompt_tokens)
        _run(pipe, prompts[:1], min(new_tokens, 8))  # warm-up: compile, first allocations
        rows = []
        for s in streams:
            runs = [_run(pipe, prompts[:s], new_tokens) for _ in range(rounds)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rows.append({"streams": s, **{k: round(v, 3) for k, v in med.items()}, "rounds": rounds})
        one = rows[0] if rows and rows[0]["streams"] == 1 else None
        for r in rows:
            r["x_one_stream"] = round(r["tokens_per_s"] / one["tokens_per_s"], 2) if one else None
            r["decode_x_one_stream"] = (round(r["decode_tokens_per_s"] / one["decode_tokens_per_s"], 2)
                                        if one and one["decode_tokens_per_s"] > 0 else None)
        proxy = m.device != "CPU"
        return {"name": m.name, "version": m.version, "runtime": m.runtime, "runtime_version": genai.__version__,
                "precision": m.precision, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                "rows": rows, "machine": benchmark.machine(), "signer_key_id": signer,
                "where": (f"measured on the host CPU as a proxy for {m.device}" if proxy else "measured on CPU of "
                          "this host") + "; continuous batching (paged KV cache), OpenVINO GenAI"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
