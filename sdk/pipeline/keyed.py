"""Calibration and held-out ``.npz`` files keyed per sample or per sequence step.

* per sample: ``<i>/<input name>`` holds sample ``i``'s feed as the model takes it (any rank, batch on any
  axis, scalars, integers): the layout golden samples use.
* sequences: ``<seq>/<step>/<input name>`` for stateful models (voice activity, keyword spotting, tracking);
  steps run in order and each step's state inputs are fed the state outputs of the step before. A state
  input may be left out after step 0 (it is carried), and at step 0 too (it starts at zeros).

Each array is checked against the model input (rank, fixed dims, dtype kind). Error messages name the first
few keys and the count, never every key of a file.
"""
from __future__ import annotations

import re
from typing import Iterable

import numpy as np

from ..errors import InputError
from .shapes import InputSpec

# A file with more keys than this is refused before its arrays are read (each key costs a zip member).
MAX_KEYS = 200_000
_INDEX = re.compile(r"^\d{1,9}$")


def few(keys: Iterable[str], n: int = 5) -> str:
    """The keys, or the first ``n`` and the count: "['0/input', '0/sr', ...] (1,440 keys)"."""
    keys = list(keys)
    if len(keys) <= n:
        return "[" + ", ".join(repr(k) for k in keys) + "]"
    return "[" + ", ".join(repr(k) for k in keys[:n]) + f", ...] ({len(keys):,} keys)"


def layout_of(keys: list[str], file: str, role: str) -> str:
    """stacked (``<input>``), per-sample (``<i>/<input>``) or sequences (``<seq>/<step>/<input>``)."""
    if len(keys) > MAX_KEYS:
        raise InputError(f"{role} file {file} has {len(keys):,} arrays, over the limit of {MAX_KEYS:,}")
    parts = {k.count("/") for k in keys}
    if parts == {0}:
        return "stacked"
    if len(parts) == 1:
        depth = parts.pop()
        bad = [k for k in keys if not all(_INDEX.match(p) for p in k.split("/")[:depth])]
        if depth in (1, 2) and not bad:
            return "per-sample" if depth == 1 else "sequences"
        if bad and depth in (1, 2):
            raise InputError(f"{role} file {file}: keys {few(bad)} do not start with sample numbers",
                             hint="key arrays '<i>/<input>' per sample or '<seq>/<step>/<input>' per sequence step")
    raise InputError(f"{role} file {file} mixes key layouts: {few(keys)}",
                     hint="use one layout: '<input>' (samples stacked on axis 0), '<i>/<input>' per sample, or "
                          "'<seq>/<step>/<input>' per sequence step")


def check_array(spec: InputSpec, arr: np.ndarray, key: str, role: str) -> np.ndarray:
    """``arr`` as input ``spec`` takes it: same rank and fixed dims, dtype of the same kind (cast)."""
    if arr.ndim != len(spec.shape):
        raise InputError(f"{role} array {key!r} has shape {list(arr.shape)}, but input {spec.name!r} has rank "
                         f"{len(spec.shape)} (shape {_fmt(spec.shape)})")
    for i, (want, got) in enumerate(zip(spec.shape, arr.shape)):
        if isinstance(want, int) and want > 0 and want != got:
            raise InputError(f"{role} array {key!r} has shape {list(arr.shape)}, but input {spec.name!r} needs "
                             f"{_fmt(spec.shape)} (dim {i}: expected {want}, found {got})")
    want_dtype = np.dtype(spec.dtype)
    if _kind(arr.dtype) != _kind(want_dtype):
        raise InputError(f"{role} array {key!r} has dtype {arr.dtype}, but input {spec.name!r} takes {want_dtype}",
                         hint=f"convert it with array.astype('{want_dtype}')")
    return arr.astype(want_dtype, copy=False)


def _kind(dtype: np.dtype) -> str:
    return "float" if dtype.kind == "f" else "int" if dtype.kind in "iu" else "bool" if dtype.kind == "b" else dtype.kind


def _fmt(shape) -> str:
    return "[" + ",".join(str(d) if isinstance(d, int) else "?" for d in shape) + "]"


def _group(keys: list[str], depth: int) -> dict[tuple[int, ...], dict[str, str]]:
    """{(i,) or (seq, step): {input name: key}}."""
    groups: dict[tuple[int, ...], dict[str, str]] = {}
    for k in keys:
        parts = k.split("/", depth)
        groups.setdefault(tuple(int(p) for p in parts[:depth]), {})[parts[depth]] = k
    return groups


def _feed(data, names: dict[str, str], specs: list[InputSpec], where: str, role: str,
          optional: frozenset[str]) -> dict[str, np.ndarray]:
    expected = [s.name for s in specs]
    missing = [n for n in expected if n not in names and n not in optional]
    extra = [n for n in names if n not in expected]
    if missing or extra:
        raise InputError(f"{role} {where} has inputs {few(sorted(names))}, but the model's inputs are {expected}"
                         + (f" (missing {missing[:5]})" if missing else "")
                         + (f" (unexpected {extra[:5]})" if extra else ""),
                         hint="key each array by the model input name")
    return {s.name: check_array(s, np.asarray(data[names[s.name]]), names[s.name], role)
            for s in specs if s.name in names}


def load_per_sample(data, keys: list[str], specs: list[InputSpec], role: str, limit: int | None
                    ) -> list[dict[str, np.ndarray]]:
    """Feeds of a ``<i>/<input>`` file, in sample order (at most ``limit``)."""
    groups = _group(keys, 1)
    order = sorted(groups)[:limit] if limit else sorted(groups)
    return [_feed(data, groups[i], specs, f"sample {i[0]}", role, frozenset()) for i in order]


def load_sequences(data, keys: list[str], specs: list[InputSpec], role: str, limit: int | None,
                   state_inputs: dict[str, int | None]) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """Steps of a ``<seq>/<step>/<input>`` file flattened in order, and the index where each sequence starts.

    ``state_inputs`` maps each state input to its batch axis: a state left out at step 0 starts at zeros
    (batch axis sized like the step's other inputs); after step 0 a state is carried, so it may be left out
    (a later step's own state, if given, is ignored in favour of the carried one by the runner)."""
    if not state_inputs:
        raise InputError(f"{role} data is keyed per sequence step ('<seq>/<step>/<input>'), but the model has no "
                         f"state input paired with a state output",
                         hint="declare the pair with --state INPUT:OUTPUT, or key samples '<i>/<input>'")
    groups = _group(keys, 2)
    seqs: dict[int, list[int]] = {}
    for seq, step in groups:
        seqs.setdefault(seq, []).append(step)
    order = sorted(seqs)[:limit] if limit else sorted(seqs)
    samples, starts = [], []
    optional = frozenset(state_inputs)
    by_name = {s.name: s for s in specs}
    for seq in order:
        steps = sorted(seqs[seq])
        if steps != list(range(len(steps))):
            gaps = sorted(set(range(steps[-1] + 1)) - set(steps))[:5]
            raise InputError(f"{role} sequence {seq} has steps {steps[:5]}{'...' if len(steps) > 5 else ''} "
                             f"({len(steps)} steps), missing step(s) {gaps}", hint="number steps 0, 1, 2, ...")
        starts.append(len(samples))
        for step in steps:
            feed = _feed(data, groups[(seq, step)], specs, f"sequence {seq} step {step}", role, optional)
            if step == 0:
                for name, axis in state_inputs.items():
                    if name not in feed:
                        feed[name] = zero_state(by_name[name], axis, feed, f"{role} sequence {seq}")
            samples.append(feed)
    return samples, starts


def zero_state(spec: InputSpec, axis: int | None, feed: dict[str, np.ndarray], where: str) -> np.ndarray:
    """A zero state for ``spec``: fixed dims as they are, the batch axis sized like the feed's batch."""
    batch = next((int(a.shape[0]) for n, a in feed.items() if a.ndim >= 1), 1)
    shape = []
    for i, d in enumerate(spec.shape):
        if isinstance(d, int) and d > 0:
            shape.append(d)
        elif i == axis:
            shape.append(batch)
        else:
            raise InputError(f"{where}: state input {spec.name!r} {_fmt(spec.shape)} has a dynamic dim {i} that is "
                             f"not its batch axis, so its starting zeros have no size",
                             hint=f"give '{spec.name}' at step 0 of every sequence")
    return np.zeros(shape, np.dtype(spec.dtype))
