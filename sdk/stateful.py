"""Stateful models: which inputs take back what an output returned on the previous call.

Streaming audio (voice activity, keyword spotting), sensor and tracking models carry a state from one call to
the next: an input such as ``state`` [2, ?, 128] is fed the output ``stateN`` of the previous call. A
:class:`StatePair` names the two and the axis of the state that holds the batch (the sequences batched
together), so the SDK can run calibration and validation over sequences and the agent can keep one state per
stream and batch streams together (gather along that axis, scatter back after the call).

Pure Python (no ML runtime): the package manifest records the pairs, and the agent reads them.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

from pydantic import BaseModel, ConfigDict, Field

# Output name for an input name, tried in order (``state`` -> ``stateN``, ``h0`` -> ``hn``,
# ``past_key_values.0.key`` -> ``present.0.key``, ``in_state`` -> ``out_state``).
_SUFFIXES = ("N", "n", "_n", "_out", "_new", "_next", ".out", "Out", "_1", "1")
_RENAMES = ((re.compile(r"^(h|c|hx|cx)0$"), r"\1n"), (re.compile(r"^past_key_values(.*)$"), r"present\1"),
            (re.compile(r"^in_(.*)$"), r"out_\1"), (re.compile(r"^(.*)_in$"), r"\1_out"),
            (re.compile(r"^(.*)_0$"), r"\1_n"))


class StatePair(BaseModel):
    """One state input, the output that feeds it on the next call, and the axis that holds the batch."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    input: str = Field(description="State input (fed the previous call's output).")
    output: str = Field(description="State output returned by each call.")
    batch_axis: int | None = Field(None, description="Axis of the state that holds the batch (sequences batched "
                                                     "together are stacked along it); None: not batchable.")


def _dims(shape: Sequence) -> list:
    return [d if isinstance(d, int) and d >= 0 else None for d in shape]


def _compatible(a: Sequence, b: Sequence) -> bool:
    if len(a) != len(b):
        return False
    return all(x is None or y is None or x == y for x, y in zip(_dims(a), _dims(b)))


def batch_axis(shape: Sequence) -> int | None:
    """The state's batch axis: its only dynamic dim (``state`` [2, ?, 128] -> 1), else axis 0 when dynamic."""
    dynamic = [i for i, d in enumerate(_dims(shape)) if d is None]
    if len(dynamic) == 1:
        return dynamic[0]
    return 0 if dynamic and dynamic[0] == 0 else None


def _candidates(name: str) -> list[str]:
    out = [name + s for s in _SUFFIXES]
    for pattern, repl in _RENAMES:
        if pattern.match(name):
            out.append(pattern.sub(repl, name))
    return out


def detect_pairs(inputs: Iterable[Any], outputs: Iterable[Any]) -> list[StatePair]:
    """State pairs found by name and shape: an output named like the input plus a state suffix (``stateN``,
    ``hn``, ``present.*``) with the same dtype and a compatible shape. ``inputs``/``outputs`` are tensor specs
    (``name``, ``dtype``, ``shape``)."""
    outs = {o.name: o for o in outputs}
    pairs = []
    for spec in inputs:
        if len(spec.shape) == 0:
            continue
        for cand in _candidates(spec.name):
            out = outs.get(cand)
            if out is not None and str(out.dtype) == str(spec.dtype) and _compatible(spec.shape, out.shape):
                pairs.append(StatePair(input=spec.name, output=out.name, batch_axis=batch_axis(spec.shape)))
                break
    return pairs


def parse_state(text: str) -> tuple[str, str]:
    """``state:stateN`` -> ('state', 'stateN')."""
    name, sep, out = text.rpartition(":")
    if not sep or not name or not out:
        from .errors import InputError

        raise InputError(f"--state {text!r} is not INPUT:OUTPUT", hint="e.g. --state state:stateN")
    return name, out


def resolve_pairs(declared: dict[str, str] | None, inputs: Sequence[Any], outputs: Sequence[Any]) -> list[StatePair]:
    """The declared pairs (``--state in:out``), checked against the model; else the detected ones."""
    from .errors import InputError

    if not declared:
        return detect_pairs(inputs, outputs)
    ins, outs = {i.name: i for i in inputs}, {o.name: o for o in outputs}
    pairs = []
    for name, out in declared.items():
        if name not in ins:
            raise InputError(f"--state {name}:{out}: the model has no input {name!r} (inputs: {', '.join(ins)})")
        if out not in outs:
            raise InputError(f"--state {name}:{out}: the model has no output {out!r} (outputs: {', '.join(outs)})")
        a, b = ins[name], outs[out]
        if str(a.dtype) != str(b.dtype) or not _compatible(a.shape, b.shape):
            raise InputError(f"--state {name}:{out}: input {name} is {a.dtype} {list(a.shape)} but output {out} is "
                             f"{b.dtype} {list(b.shape)}; a state output must fit its input")
        pairs.append(StatePair(input=name, output=out, batch_axis=batch_axis(a.shape)))
    return pairs
