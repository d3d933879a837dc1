"""Serving metrics: per-model counters and latency histograms, read two ways.

* :meth:`Metrics.telemetry` returns the interval figures for the MQTT telemetry payload (and resets the
  interval), using the contract's :class:`~edgeopt.sdk.telemetry.Histogram` (DDSketch layout, 1% relative
  accuracy) so the dashboard can merge devices and compute fleet percentiles within that accuracy.
* :meth:`Metrics.prometheus` renders cumulative figures as Prometheus text for ``GET /metrics``. Its latency
  histogram keeps the fixed ``le`` bounds it always had (:data:`PROMETHEUS_BUCKETS_MS`), so existing scrape
  queries keep their series; a Prometheus classic histogram is only as precise as those bounds.

Recording is a few integer additions under one lock per model, cheap next to an inference.
"""
from __future__ import annotations

import bisect
import os
import threading
import time
from typing import Callable

from ..sdk.telemetry import LEGACY_BUCKETS_MS, Histogram, ModelStats, SystemStats, TextStats

PROMETHEUS_BUCKETS_MS = LEGACY_BUCKETS_MS


class TextMetrics:
    """A text-generation model's figures (:class:`~edgeopt.sdk.telemetry.TextStats`): time to first token and
    time per output token in the latency layout, token counts, KV cache use. Fed by the text engine's thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ttft, self.tpot = Histogram(), Histogram()
        self.prompt_tokens = self.generated_tokens = self.cancelled = 0
        self.kv_peak = 0.0
        self.engine = None  # the TextEngine: running, waiting and KV use at snapshot time
        self.total_prompt = self.total_generated = self.total_cancelled = self.total_requests = 0
        self.total_ttft_ms = self.total_tpot_ms = 0.0
        self.total_ttft_n = self.total_tpot_n = 0

    def admitted(self, prompt_tokens: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.total_prompt += prompt_tokens

    def first_token(self, ms: float) -> None:
        with self.lock:
            self.ttft.observe(ms)
            self.total_ttft_ms += ms
            self.total_ttft_n += 1

    def tokens(self, n: int) -> None:
        with self.lock:
            self.generated_tokens += n
            self.total_generated += n

    def finished(self, tpot_ms: float | None, cancelled: bool = False) -> None:
        with self.lock:
            self.total_requests += 1
            if tpot_ms is not None:
                self.tpot.observe(tpot_ms)
                self.total_tpot_ms += tpot_ms
                self.total_tpot_n += 1
            if cancelled:
                self.cancelled += 1
                self.total_cancelled += 1

    def kv(self, usage: float) -> None:
        if usage > self.kv_peak:  # one writer (the engine thread); a torn read only shows a step late
            self.kv_peak = usage

    def snapshot(self, elapsed_s: float) -> TextStats:
        eng = self.engine
        usage = float(eng.kv_usage) if eng is not None else None
        with self.lock:
            ttft, self.ttft = self.ttft, Histogram()
            tpot, self.tpot = self.tpot, Histogram()
            prompt, gen, cancelled = self.prompt_tokens, self.generated_tokens, self.cancelled
            self.prompt_tokens = self.generated_tokens = self.cancelled = 0
            peak, self.kv_peak = max(self.kv_peak, usage or 0.0), usage or 0.0
        t50, t95 = ttft.quantiles((0.50, 0.95))
        p50, p95 = tpot.quantiles((0.50, 0.95))
        return TextStats(ttft=ttft.to_model(), tpot=tpot.to_model(), ttft_p50_ms=t50, ttft_p95_ms=t95,
                         tpot_p50_ms=p50, tpot_p95_ms=p95, prompt_tokens=prompt, generated_tokens=gen,
                         tokens_per_s=gen / max(elapsed_s, 1e-6), kv_cache_usage=usage,
                         kv_cache_peak=min(1.0, peak) if eng is not None else None,
                         running=int(eng.running) if eng is not None else 0,
                         waiting=int(eng.queue_depth) if eng is not None else 0, cancelled=cancelled,
                         preemptions=None)  # OpenVINO GenAI 2026.4 does not report them


class ModelMetrics:
    """Counters for one model name (across its versions; ``version`` is the serving one)."""

    def __init__(self, name: str, version: str | None = None):
        self.name = name
        self.version = version
        self.lock = threading.Lock()
        self.queue_depth: Callable[[], int] = lambda: 0
        self.sequences = None  # the model's SequenceBatcher when it is stateful (live, evicted, expired)
        self.text: TextMetrics | None = None  # a text-generation model's token figures
        # Interval figures (reset by each telemetry snapshot) and totals (for Prometheus).
        self.hist = Histogram()
        self.requests = self.errors = self.samples = 0
        self.batch_sizes: dict[int, int] = {}
        self.total_prom = [0] * (len(PROMETHEUS_BUCKETS_MS) + 1)  # cumulative, for /metrics
        self.total_sum_ms = 0.0
        self.total_requests = self.total_errors = self.total_busy = self.total_samples = 0
        self.total_batches: dict[int, int] = {}
        self.interval_start = time.monotonic()

    def observe(self, latency_ms: float, samples: int = 1) -> None:
        """One request answered successfully."""
        with self.lock:
            self.hist.observe(latency_ms)
            self.total_prom[bisect.bisect_left(PROMETHEUS_BUCKETS_MS, latency_ms)] += 1
            self.total_sum_ms += latency_ms
            self.requests += 1
            self.total_requests += 1
            self.samples += samples
            self.total_samples += samples

    def error(self, busy: bool = False) -> None:
        """One request failed (bad input, runtime error) or was refused because the queue was full."""
        with self.lock:
            self.errors += 1
            self.total_errors += 1
            if busy:
                self.total_busy += 1

    def batch(self, size: int) -> None:
        """The batcher ran one batch of ``size`` samples."""
        with self.lock:
            self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1
            self.total_batches[size] = self.total_batches.get(size, 0) + 1

    def snapshot(self) -> ModelStats:
        """Interval statistics since the previous snapshot; resets the interval."""
        now = time.monotonic()
        with self.lock:
            hist, self.hist = self.hist, Histogram()
            requests, errors, samples = self.requests, self.errors, self.samples
            self.requests = self.errors = self.samples = 0
            sizes, self.batch_sizes = self.batch_sizes, {}
            elapsed = max(now - self.interval_start, 1e-6)
            self.interval_start = now
        return ModelStats(
            model=self.name, version=self.version, requests=requests, errors=errors,
            throughput_ips=samples / elapsed, latency=hist.to_model(),
            **dict(zip(("p50_ms", "p95_ms", "p99_ms"), hist.quantiles((0.50, 0.95, 0.99)))),
            queue_depth=max(0, int(self.queue_depth())),
            batch_sizes={str(k): v for k, v in sorted(sizes.items())},
            live_sequences=self.sequences.live if self.sequences is not None else None,
            text=self.text.snapshot(elapsed) if self.text is not None else None,
        )


class Metrics:
    """All models' metrics plus process figures."""

    def __init__(self):
        self._models: dict[str, ModelMetrics] = {}
        self._lock = threading.Lock()
        self.extra_gauges: dict[str, Callable[[], float]] = {}
        self._process = None

    def model(self, name: str) -> ModelMetrics:
        with self._lock:
            m = self._models.get(name)
            if m is None:
                m = self._models[name] = ModelMetrics(name)
            return m

    def models(self) -> list[ModelMetrics]:
        with self._lock:
            return list(self._models.values())

    def telemetry(self) -> list[ModelStats]:
        return [m.snapshot() for m in self.models()]

    def system(self) -> SystemStats:
        """Process CPU % (since the previous call, of one core), RSS, host memory and load."""
        try:
            import psutil
        except ImportError:  # psutil is in the agent extra; without it report what the stdlib knows
            return SystemStats(load_1m=os.getloadavg()[0])
        if self._process is None:
            self._process = psutil.Process()
            self._process.cpu_percent(None)  # the first call only starts the measurement
        vm = psutil.virtual_memory()
        temp = None
        try:
            sensors = psutil.sensors_temperatures() if hasattr(psutil, "sensors_temperatures") else {}
            readings = [t.current for entries in sensors.values() for t in entries if t.current]
            temp = max(readings) if readings else None
        except (OSError, AttributeError):
            temp = None
        return SystemStats(cpu_percent=self._process.cpu_percent(None), rss_bytes=self._process.memory_info().rss,
                           mem_total_bytes=vm.total, mem_available_bytes=vm.available, temperature_c=temp,
                           load_1m=os.getloadavg()[0])

    def prometheus(self) -> str:
        """Prometheus text exposition (version 0.0.4) of the cumulative figures."""
        lines: list[str] = []
        models = self.models()
        # (name, type, help, value per model): one block of lines each, in this order.
        per_model = [
            ("edgeopt_requests_total", "counter", "Inference requests answered successfully.",
             lambda m: m.total_requests),
            ("edgeopt_request_errors_total", "counter", "Inference requests that failed or were refused (busy).",
             lambda m: m.total_errors),
            ("edgeopt_requests_busy_total", "counter", "Requests refused with 503 because the queue was full.",
             lambda m: m.total_busy),
            ("edgeopt_inferences_total", "counter", "Samples inferred (sum of batch dimensions).",
             lambda m: m.total_samples),
            ("edgeopt_queue_depth", "gauge", "Requests waiting in the model's batcher queue.",
             lambda m: int(m.queue_depth())),
        ]
        for name, kind, text, value in per_model:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            lines += [f'{name}{{model="{_esc(m.name)}"}} {value(m)}' for m in models]
        _families(lines, [(m.name, m.sequences) for m in models if m.sequences is not None], (
            ("edgeopt_sequences_live", "gauge", "Live sequences (streams with state) of a stateful model.",
             lambda q: q.live),
            ("edgeopt_sequences_evicted_total", "counter", "Sequences evicted at max_sequences.", lambda q: q.evicted),
            ("edgeopt_sequences_expired_total", "counter", "Sequences ended after the idle timeout.",
             lambda q: q.expired)))
        lines += ["# HELP edgeopt_batches_total Batches run, by batch size.", "# TYPE edgeopt_batches_total counter"]
        for m in models:
            with m.lock:
                batches = sorted(m.total_batches.items())
            for size, count in batches:
                lines.append(f'edgeopt_batches_total{{model="{_esc(m.name)}",size="{size}"}} {count}')
        lines += ["# HELP edgeopt_request_latency_ms Request latency inside the agent, in milliseconds.",
                  "# TYPE edgeopt_request_latency_ms histogram"]
        for m in models:
            with m.lock:
                counts, total = list(m.total_prom), m.total_sum_ms
            count = sum(counts)
            label = _esc(m.name)
            running = 0
            for bound, c in zip(PROMETHEUS_BUCKETS_MS, counts):
                running += c
                lines.append(f'edgeopt_request_latency_ms_bucket{{model="{label}",le="{bound:g}"}} {running}')
            lines.append(f'edgeopt_request_latency_ms_bucket{{model="{label}",le="+Inf"}} {count}')
            lines.append(f'edgeopt_request_latency_ms_sum{{model="{label}"}} {total:.6f}')
            lines.append(f'edgeopt_request_latency_ms_count{{model="{label}"}} {count}')
        _families(lines, [(m.name, m.text) for m in models if m.text is not None], (
                ("edgeopt_text_prompt_tokens_total", "counter", "Prompt tokens admitted.", lambda t: t.total_prompt),
                ("edgeopt_text_generated_tokens_total", "counter", "Tokens generated.", lambda t: t.total_generated),
                ("edgeopt_text_requests_total", "counter", "Text requests ended (any reason).",
                 lambda t: t.total_requests),
                ("edgeopt_text_cancelled_total", "counter", "Text requests cancelled (client gone).",
                 lambda t: t.total_cancelled),
                ("edgeopt_text_ttft_ms_sum", "counter", "Sum of times to first token (ms).", lambda t: t.total_ttft_ms),
                ("edgeopt_text_ttft_ms_count", "counter", "Requests with a first token.", lambda t: t.total_ttft_n),
                ("edgeopt_text_tpot_ms_sum", "counter", "Sum of per-request times per output token (ms).",
                 lambda t: t.total_tpot_ms),
                ("edgeopt_text_tpot_ms_count", "counter", "Requests with a time per output token.",
                 lambda t: t.total_tpot_n),
                ("edgeopt_text_kv_cache_usage", "gauge", "Share of the KV cache in use.",
                 lambda t: t.engine.kv_usage if t.engine is not None else 0),
                ("edgeopt_text_requests_running", "gauge", "Requests generating now.",
                 lambda t: t.engine.running if t.engine is not None else 0)))
        lines += ["# HELP edgeopt_model_info The version each model serves.", "# TYPE edgeopt_model_info gauge"]
        for m in models:
            lines.append(f'edgeopt_model_info{{model="{_esc(m.name)}",version="{_esc(m.version or "")}"}} 1')
        for name, fn in sorted(self.extra_gauges.items()):
            lines += [f"# TYPE {name} gauge", f"{name} {float(fn()):g}"]
        return "\n".join(lines) + "\n"


def _families(lines: list[str], items: list[tuple[str, object]], specs) -> None:
    """One metric family per spec ``(name, type, help, value(item))`` with a sample per ``(model name, item)``;
    nothing when there are no items."""
    if not items:
        return
    for name, kind, text, value in specs:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{model="{_esc(model)}"}} {_number(value(item))}' for model, item in items]


def _number(v: float) -> str:
    """A sample value as Prometheus reads it, every digit kept (``:g`` would print 1234567 as 1.23457e+06)."""
    return str(v) if isinstance(v, int) else repr(float(v))


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
