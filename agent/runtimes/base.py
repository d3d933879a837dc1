"""The runtime interface: load a model file for a device, run it, describe it."""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ...sdk.errors import InputError, UnsupportedError
from ...sdk.package import TensorSpec


class LoadedModel(abc.ABC):
    """A model compiled for one device, ready to run. ``infer`` is safe to call from one thread at a time."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @abc.abstractmethod
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; feeds and results are keyed by tensor name."""

    def describe(self) -> dict[str, Any]:
        return {"inputs": [t.model_dump() for t in self.inputs], "outputs": [t.model_dump() for t in self.outputs]}

    def close(self) -> None:
        """Free runtime resources."""

    def placement(self) -> list[dict[str, Any]] | None:
        """What the runtime did with the graph: ``[{node, op_type, device, precision, source_nodes}]``, or
        None where the runtime does not say (see :mod:`edgeopt.sdk.placement`)."""
        return None

    def profile_layers(self, feeds: dict[str, np.ndarray], runs: int, *, warmup: int = 2,
                       deadline_s: float | None = None, between=None):
        """Per-layer times of ``runs`` inferences (a :class:`edgeopt.sdk.layers.RawProfile`); the model must
        have been loaded with ``options={"profile_layers": True}``. Stops early (after at least one run)
        once ``deadline_s`` has passed. ``between(seconds)`` is called after every run with its wall time
        (the host interleaves a plain inference there; a device pauses to leave the CPU to service)."""
        raise UnsupportedError(f"{type(self).__name__} does not expose per-layer times")

    def check_feeds(self, feeds: dict[str, np.ndarray], widen: dict[str, str] | None = None) -> None:
        """Refuse wrong names, dtypes or ranks with a message naming input, expected and found. ``widen`` maps an
        input dtype to one more dtype the runtime converts itself (``{"float16": "float32"}``: cast on the GPU)."""
        expected = {t.name: t for t in self.inputs}
        missing = sorted(set(expected) - set(feeds))
        extra = sorted(set(feeds) - set(expected))
        if missing or extra:
            raise InputError(f"inputs do not match the model: missing {missing}, unexpected {extra}; "
                             f"expected {sorted(expected)}")
        for name, arr in feeds.items():
            spec = expected[name]
            if str(arr.dtype) != spec.dtype and not (widen and widen.get(spec.dtype) == str(arr.dtype)):
                raise InputError(f"input {name!r}: expected dtype {spec.dtype}, found {arr.dtype}")
            if arr.ndim != len(spec.shape):
                raise InputError(f"input {name!r}: expected shape {spec.shape}, found {list(arr.shape)}")
            for want, got in zip(spec.shape, arr.shape):
                if isinstance(want, int) and want >= 0 and want != got:
                    raise InputError(f"input {name!r}: expected shape {spec.shape}, found {list(arr.shape)}")


class Runtime(abc.ABC):
    """One inference runtime (OpenVINO, ONNX Runtime, TFLite)."""

    name: ClassVar[str]
    extra: ClassVar[str]

    @classmethod
    def check_importable(cls) -> None:
        """Raise ImportError (turned into MissingDependencyError by the registry) when unusable."""

    @classmethod
    @abc.abstractmethod
    def version(cls) -> str: ...

    @classmethod
    @abc.abstractmethod
    def devices(cls) -> list[str]:
        """Devices or providers this runtime really has here (not ones it would silently fall back from)."""

    @classmethod
    @abc.abstractmethod
    def load(cls, model_path: Path, *, device: str, threads: int | None = None,
             performance_hint: str = "latency", cache_dir: Path | None = None,
             options: dict[str, Any] | None = None) -> LoadedModel:
        """Compile ``model_path`` for ``device``; raise UnsupportedError if the device is absent."""
