"""The served models: name -> :class:`ModelEntry` (loaded runtime + batcher), and the hot swap.

:meth:`ModelRegistry.swap` is what the installer's ``on_switch`` calls: new requests go to the new
version at once; the old version's batcher stops accepting, finishes every request it already
accepted, and only then frees its runtime, so a swap under load fails no request.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from .batcher import Batcher, has_batch_dim
from .kserve import tensor_metadata
from .metrics import Metrics
from .runtimes.base import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class BatchLimits:
    """The batcher settings every model starts with (from the config's [batching], changed by set-config)."""

    enabled: bool = True
    max_batch: int | None = None
    max_delay_ms: float = 2.0
    max_queue: int = 256
    sequence_idle_timeout_s: float = 60.0
    max_sequences: int = 1024

    @classmethod
    def from_config(cls, batching: Any) -> "BatchLimits":
        return cls(enabled=batching.enabled, max_batch=batching.max_batch, max_delay_ms=batching.max_delay_ms,
                   max_queue=batching.max_queue, sequence_idle_timeout_s=batching.sequence_idle_timeout_s,
                   max_sequences=batching.max_sequences)


class ModelEntry:
    """One served model version: its loaded runtime, its batcher and what the package says about it."""

    def __init__(self, name: str, version: str, loaded: LoadedModel, batcher: Batcher,
                 manifest: Any = None):
        self.name = name
        self.version = version
        self.loaded = loaded
        self.batcher = batcher
        self.manifest = manifest
        self.platform = getattr(manifest, "runtime", None) or loaded.describe().get("runtime", "unknown")
        self.metrics: Any = None  # this model's ModelMetrics, set by the registry
        self.sequences: Any = None  # SequenceBatcher of a stateful model (sequence_id requests), else None

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "versions": [self.version], "platform": self.platform,
                "inputs": [tensor_metadata(s) for s in self.loaded.inputs],
                "outputs": [tensor_metadata(s) for s in self.loaded.outputs]}

    def retire(self) -> None:
        """Finish every accepted request on this version, then free the runtime."""
        if self.sequences is not None and not self.sequences.close(timeout=120):
            log.warning("model %s %s: sequence requests still running after 120 s", self.name, self.version)
        if not self.batcher.close(timeout=120):
            log.warning("model %s %s: requests still running after 120 s; freeing anyway", self.name, self.version)
        try:
            self.loaded.close()
        except Exception:  # the runtime is going away either way
            log.exception("model %s %s: close failed", self.name, self.version)


class ModelRegistry:
    """Name -> serving :class:`ModelEntry`. :meth:`swap` is the hot swap the installer triggers."""

    def __init__(self, metrics: Metrics | None = None, limits: BatchLimits | None = None):
        self.metrics = metrics or Metrics()
        self.limits = limits or BatchLimits()
        self._entries: dict[str, ModelEntry] = {}
        self._lock = threading.Lock()

    def max_batch_for(self, loaded: LoadedModel, manifest: Any) -> int:
        if not self.limits.enabled or not has_batch_dim(loaded):
            return 1
        if self.limits.max_batch is not None:
            return self.limits.max_batch
        # A model run at fixed batch sizes (ONNX Runtime's I/O binding, CUDA graphs) batches up to the largest.
        sizes = getattr(loaded, "batch_sizes", None)
        if sizes:
            return int(max(sizes))
        profile = getattr(manifest, "profile", None) or {}
        return int(profile.get("batch_size", 1) or 1)

    def swap(self, name: str, version: str, loaded: LoadedModel, manifest: Any = None) -> ModelEntry:
        """Serve ``loaded`` for ``name`` from now on; the previous version drains in the background."""
        mm = self.metrics.model(name)
        text = getattr(loaded, "task", None) == "text-generation"
        if text:  # a language model: its continuous-batching engine stands in for the batcher
            batcher = loaded.engine
            mm.text = loaded.fresh_metrics()
        else:
            batcher = Batcher(loaded, name, max_batch=self.max_batch_for(loaded, manifest),
                              max_delay_ms=self.limits.max_delay_ms, max_queue=self.limits.max_queue, metrics=mm)
            mm.text = None
        entry = ModelEntry(name, version, loaded, batcher, manifest)
        entry.metrics = mm
        entry.sequences = None if text else self._sequences_for(name, loaded, manifest, mm)
        with self._lock:
            old = self._entries.get(name)
            self._entries[name] = entry
        mm.version = version
        seqs = entry.sequences
        mm.queue_depth = (lambda: batcher.queue_depth + seqs.queue_depth) if seqs else (lambda: batcher.queue_depth)
        mm.sequences = seqs
        log.info("serving %s %s (max batch %d%s)", name, version, batcher.max_batch,
                 "" if batcher.batchable else ", no dynamic batch dimension")
        if old is not None and old is not entry:
            threading.Thread(target=old.retire, name=f"retire-{name}-{old.version}", daemon=True).start()
        return entry

    def sequence_max_batch(self) -> int:
        """Sequences batch across streams up to [batching] max_batch (unset: 32); 1 with batching off."""
        if not self.limits.enabled:
            return 1
        return self.limits.max_batch or 32

    def _sequences_for(self, name: str, loaded: LoadedModel, manifest: Any, mm: Any):
        """A SequenceBatcher when the model is stateful: the manifest's state pairs, else pairs detected by
        name and shape (packages from before the manifest recorded them)."""
        from ..sdk.stateful import detect_pairs
        from .sequences import SequenceBatcher

        pairs = list(getattr(manifest, "state", None) or []) or detect_pairs(loaded.inputs, loaded.outputs)
        if not pairs:
            return None
        lim = self.limits
        seqs = SequenceBatcher(loaded, name, pairs, max_batch=self.sequence_max_batch(),
                               max_delay_ms=lim.max_delay_ms, max_queue=lim.max_queue,
                               idle_timeout_s=lim.sequence_idle_timeout_s, max_sequences=lim.max_sequences,
                               metrics=mm)
        log.info("model %s is stateful (%s): sequences keep their state, batched up to %d", name,
                 ", ".join(f"{p.input} <- {p.output}" for p in pairs), seqs.max_batch)
        return seqs

    def get(self, name: str) -> ModelEntry | None:
        return self._entries.get(name)

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._entries.values())

    def reconfigure(self, **limits: Any) -> None:
        """Apply new batching limits to the defaults and to every serving model."""
        for key, value in limits.items():
            setattr(self.limits, key, value)
        for entry in self.entries():
            entry.batcher.reconfigure(max_batch=self.max_batch_for(entry.loaded, entry.manifest),
                                      max_delay_ms=self.limits.max_delay_ms, max_queue=self.limits.max_queue)
            if entry.sequences is not None:
                entry.sequences.reconfigure(max_batch=self.sequence_max_batch(),
                                            max_delay_ms=self.limits.max_delay_ms, max_queue=self.limits.max_queue)

    def close(self) -> None:
        with self._lock:
            entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            entry.retire()
