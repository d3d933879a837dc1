"""Lazy registries of runtime plug-ins: a name maps to ``"module:Class"`` and the extra that installs it.

The SDK's backends (compile/quantize) and the agent's runtimes (load/infer) each keep such a registry;
this is the one place that imports an entry and turns a missing dependency into an error naming the extra.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

from .errors import MissingDependencyError, UnsupportedError


def load_registered(registry: Mapping[str, tuple[str, str]], name: str) -> Any:
    """Import and return the class registered under ``name`` (its ``check_importable()`` must pass)."""
    try:
        target, extra = registry[name]
    except KeyError:
        raise UnsupportedError(f"unknown runtime {name!r}; known: {', '.join(registry)}") from None
    module, attr = target.split(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
        cls.check_importable()
    except ImportError as exc:
        raise MissingDependencyError(
            f"runtime {name!r} is not installed ({exc.name or exc} cannot be imported)",
            hint=f"install it with: pip install 'edgeopt[{extra}]'",
        ) from None
    return cls
