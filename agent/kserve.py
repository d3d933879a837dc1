"""Open Inference Protocol (KServe v2) codec: request parsing, input checks, response encoding.

Transport-free so it can be tested on its own; :mod:`edgeopt.agent.server` wires it to HTTP.
Supports JSON tensors and the binary tensor data extension: a request body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw tensors of every input whose
``parameters.binary_data_size`` is set, in input order; outputs asked for with
``parameters.binary_data`` (or the request-level ``binary_data_output``) come back the same way.
See https://github.com/kserve/open-inference-protocol and Triton's binary_data extension.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..sdk.package import TensorSpec
from .batcher import batch_signature
from .caches import BoundedCache

# numpy dtype name <-> Open Inference Protocol datatype. BYTES (variable-length strings) is not served:
# the runtimes here take numeric tensors only.
DTYPE_TO_KSERVE = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}
KSERVE_TO_DTYPE = {v: k for k, v in DTYPE_TO_KSERVE.items()}
HEADER_LENGTH = "Inference-Header-Content-Length"


class ApiError(Exception):
    """An error answered as KServe JSON ``{"error": message}`` with an HTTP status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def kserve_datatype(dtype: str) -> str:
    """The protocol datatype name for a numpy dtype name (``float32`` -> ``FP32``)."""
    return DTYPE_TO_KSERVE.get(dtype, dtype.upper())


def protocol_shape(spec: TensorSpec) -> list[int]:
    """Shape as the protocol writes it: -1 for every dynamic (named or negative) dimension."""
    return [d if isinstance(d, int) and d >= 0 else -1 for d in spec.shape]


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": kserve_datatype(spec.dtype), "shape": protocol_shape(spec)}


@dataclass
class InferRequest:
    """A decoded inference request: arrays keyed by input name plus what the client wants back."""

    inputs: dict[str, np.ndarray]
    id: str | None = None
    # Output name -> binary? ; None means every output, in the default encoding.
    outputs: dict[str, bool] | None = None
    binary_default: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)
    # Which requests may share a batch (same input names, dtypes and per-sample shapes); see the batcher.
    batch_signature: tuple | None = None
    # Shared by every request with the same binary-tensor header (see _BinaryPlan): what a caller derives
    # from the header alone (its checks, its sequence parameters) is kept here and done once. None: not planned.
    memo: dict | None = None

    @property
    def batch(self) -> int:
        first = next(iter(self.inputs.values()), None)
        return int(first.shape[0]) if first is not None and first.ndim else 1


_KIND_NAMES = {"b": "boolean", "i": "integer", "u": "integer", "f": "floating-point", "U": "string", "O": "mixed"}
_DATATYPE_BY_DTYPE = {np.dtype(k): v for k, v in DTYPE_TO_KSERVE.items()}
# Per input list (one per served model version): name -> (spec, datatype, protocol shape, numpy dtype).
# Computing these for every request was a visible share of the API's per-request cost.
_PLANS = BoundedCache(256)  # id(specs) -> (specs, plan); models come and go with installs


def _plan(specs: list[TensorSpec]) -> dict[str, tuple]:
    cached = _PLANS.get(id(specs))
    if cached is not None and cached[0] is specs:
        return cached[1]
    plan = {s.name: (s, kserve_datatype(s.dtype), protocol_shape(s), np.dtype(s.dtype)) for s in specs}
    _PLANS.put(id(specs), (specs, plan))  # holding `specs` keeps its id from being reused
    return plan


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


def _shape_of(doc: dict, name: str) -> list[int]:
    shape = doc.get("shape")
    # type(d) is int also refuses bools (True is an int subclass).
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise _bad(f"input {name!r}: 'shape' must be a list of non-negative integers, found {shape!r}")
    return shape


class _BinaryPlan:
    """What a binary-tensor request header says, checked once: clients send the same JSON header for every
    request of one shape, so the next request with the same header bytes skips JSON decoding and every
    check, and only slices its tensors out of the body."""

    __slots__ = ("specs", "layout", "size", "outputs", "binary_default", "parameters", "batch_signature", "memo")

    def __init__(self, specs: list[TensorSpec], layout: list[tuple[str, np.dtype, tuple, int, int]],
                 request: InferRequest):
        self.specs = specs  # holding it keeps id(specs) in the cache key from being reused
        self.layout = layout  # (name, dtype, shape, offset, element count) in body order
        self.size = sum(item[4] * item[1].itemsize for item in layout)
        self.outputs = request.outputs
        self.binary_default = request.binary_default
        self.parameters = request.parameters
        self.batch_signature = request.batch_signature
        self.memo: dict = {}

    def build(self, binary: memoryview) -> InferRequest | None:
        if len(binary) != self.size:
            return None  # let the full parser name what is wrong
        arrays = {name: np.frombuffer(binary, dtype, count, offset).reshape(shape)
                  for name, dtype, shape, offset, count in self.layout}
        return InferRequest(inputs=arrays, outputs=self.outputs, binary_default=self.binary_default,
                            parameters=self.parameters, batch_signature=self.batch_signature, memo=self.memo)


_BINARY_PLANS = BoundedCache(512)  # (id(specs), JSON header bytes) -> _BinaryPlan
_MAX_PLANNED_HEADER = 4096


def parse_infer_request(body: bytes | bytearray, header_length: int | None,
                        specs: list[TensorSpec], same_batch: bool = True) -> InferRequest:
    """Decode a request body and check it against the model's inputs. ``same_batch`` (default) requires
    every input's axis 0 to agree (a stateful model's full feed has its state's batch on another axis).

    Raises :class:`ApiError` (400) naming the input, what was expected and what was found.
    """
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise _bad(f"{HEADER_LENGTH} is {header_length} but the body has {len(body)} bytes")
        header, binary = body[:header_length], memoryview(body)[header_length:]
        if not isinstance(header, bytes):  # an inflated body is a bytearray; the plan cache needs a key
            header = bytes(header)
        plan = _BINARY_PLANS.get((id(specs), header))
        if plan is not None and plan.specs is specs:
            request = plan.build(binary)
            if request is not None:
                return request
        request, layout = _parse_full(header, binary, specs, same_batch)
        # Only short headers without an id are remembered: an id changes with every request, and a client
        # must not be able to pin large headers in memory.
        if layout is not None and request.id is None and header_length <= _MAX_PLANNED_HEADER:
            plan = _BinaryPlan(specs, layout, request)
            _BINARY_PLANS.put((id(specs), header), plan)
            request.memo = plan.memo
        return request
    return _parse_full(body, memoryview(b""), specs, same_batch)[0]


MAX_JSON_DEPTH = 64
# Every byte but the brackets and the quote, for bytes.translate: what is left says how deep the JSON nests.
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'[]{}"')))
_ESCAPE = re.compile(rb"\\.", re.S)
_STRING = re.compile(rb'"[^"]*"')
_DEPTH_CHUNK = 1 << 22


def _nests_deeper_than(data: bytes, limit: int) -> bool:
    """Whether the JSON text nests arrays/objects more than ``limit`` deep, without parsing it.

    Linear and in C or numpy throughout (a hostile 256 MiB body costs about a second, not the stack):
    drop escapes, then strings, then everything but brackets, and take the running depth in chunks.
    """
    if b"\\" in data:
        data = _ESCAPE.sub(b"", data)
    brackets = _STRING.sub(b"", data.translate(None, _NOT_STRUCTURE))
    codes = np.frombuffer(brackets, np.uint8)
    depth = 0
    for start in range(0, len(codes), _DEPTH_CHUNK):
        part = codes[start:start + _DEPTH_CHUNK]
        step = (part == ord("[")).astype(np.int32) + (part == ord("{"))
        step -= (part == ord("]")).astype(np.int32) + (part == ord("}"))
        running = np.cumsum(step) + depth
        if running.max() > limit:
            return True
        depth = int(running[-1])
    return False


def loads_bounded(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses (400) JSON nested more than ``max_depth`` deep instead of recursing into
    it: 100,000 nested brackets made the standard parser raise RecursionError, answered as a 500."""
    # Cheap first: fewer brackets than the limit cannot nest deeper than it.
    if data.count(b"[") + data.count(b"{") > max_depth and _nests_deeper_than(data, max_depth):
        raise _bad(f"request JSON nests deeper than {max_depth} levels")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"request is not valid JSON: {exc}") from None
    except RecursionError:  # not reachable after the check above; kept so it can never become a 500
        raise _bad(f"request JSON nests deeper than {max_depth} levels") from None


def _parse_full(header: bytes, binary: memoryview, specs: list[TensorSpec],
                same_batch: bool = True) -> tuple[InferRequest, list[tuple] | None]:
    """The request and, when every input is binary, the layout a :class:`_BinaryPlan` replays."""
    doc = loads_bounded(header)
    if not isinstance(doc, dict):
        raise _bad("request must be a JSON object with an 'inputs' list")
    items = doc.get("inputs")
    if not isinstance(items, list) or not items:
        raise _bad("request must have a non-empty 'inputs' list")
    expected = _plan(specs)
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("'parameters' must be an object")

    arrays: dict[str, np.ndarray] = {}
    layout: list[tuple] | None = []
    offset = 0
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _bad("every input must be an object with a 'name'")
        name = item["name"]
        planned = expected.get(name)
        if planned is None:
            raise _bad(f"unexpected input {name!r}: the model's inputs are {', '.join(sorted(expected))}")
        if name in arrays:
            raise _bad(f"input {name!r} is given twice")
        _, want_dt, want_shape, dtype = planned
        datatype = item.get("datatype")
        if datatype != want_dt:
            raise _bad(f"input {name!r}: expected datatype {want_dt}, found {datatype!r}")
        shape = _shape_of(item, name)
        if len(shape) != len(want_shape) or any(w >= 0 and w != g for w, g in zip(want_shape, shape)):
            raise _bad(f"input {name!r}: expected shape {want_shape}, found {shape}")
        count = math.prod(shape)
        iparams = item.get("parameters") or {}
        size = iparams.get("binary_data_size") if isinstance(iparams, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0:
                raise _bad(f"input {name!r}: binary_data_size must be a non-negative integer, found {size!r}")
            if size != count * dtype.itemsize:
                raise _bad(f"input {name!r}: shape {shape} of {want_dt} needs {count * dtype.itemsize} bytes, "
                           f"binary_data_size is {size}")
            if offset + size > len(binary):
                raise _bad(f"input {name!r}: binary data ends after {len(binary) - offset} of {size} bytes")
            arr = np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(shape)
            if layout is not None:
                layout.append((name, dtype, tuple(shape), offset, count))
            offset += size
        else:
            layout = None
            data = item.get("data")
            if data is None:
                raise _bad(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
            try:
                # Refuse instead of converting silently: 1.5 into an INT64 input would become 1.
                found = np.asarray(data).dtype.kind
                if (dtype.kind in "iu" and found not in "iu") or (dtype.kind == "b" and found != "b") \
                        or (dtype.kind == "f" and found not in "biuf"):
                    raise ValueError(f"found {_KIND_NAMES.get(found, 'other')} values")
                # 1e39 into FP32 would become inf with only a warning: refuse it like 300 into UINT8.
                with np.errstate(over="raise"):
                    arr = np.asarray(data, dtype=dtype)
            except (TypeError, ValueError, OverflowError, FloatingPointError) as exc:
                raise _bad(f"input {name!r}: data is not a list of {want_dt} values ({exc})") from None
            if arr.size != count:
                raise _bad(f"input {name!r}: shape {shape} needs {count} values, found {arr.size}")
            arr = arr.reshape(shape)
        arrays[name] = arr
    if offset != len(binary):
        raise _bad(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    missing = sorted(set(expected) - set(arrays))
    if missing:
        raise _bad(f"missing input(s) {', '.join(repr(m) for m in missing)}; "
                   f"the model's inputs are {', '.join(sorted(expected))}")
    batches = {a.shape[0] for a in arrays.values() if a.ndim}
    if len(batches) > 1 and same_batch:
        raise _bad(f"inputs disagree on the batch dimension: {sorted(batches)}")

    binary_default = bool(params.get("binary_data_output", False))
    outputs = None
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list):
            raise _bad("'outputs' must be a list")
        outputs = {}
        for out in doc["outputs"]:
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise _bad("every requested output must be an object with a 'name'")
            oparams = out.get("parameters") or {}
            outputs[out["name"]] = bool(oparams.get("binary_data", binary_default))
    rid = doc.get("id")
    request = InferRequest(inputs=arrays, id=str(rid) if rid is not None else None, outputs=outputs,
                           binary_default=binary_default, parameters=params,
                           batch_signature=batch_signature(arrays))
    return request, layout


def check_requested_outputs(request: InferRequest, specs: list[TensorSpec]) -> None:
    if request.outputs is None:
        return
    known = {s.name for s in specs}
    for name in request.outputs:
        if name not in known:
            raise _bad(f"unknown output {name!r}: the model's outputs are {', '.join(sorted(known))}")


_RESPONSE_HEADERS = BoundedCache(512)  # (model, version, output names/dtypes/shapes) -> JSON header


def encode_infer_response(model: str, version: str | None, request: InferRequest,
                          results: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header length for the response header."""
    wanted = request.outputs if request.outputs is not None else {n: request.binary_default for n in results}
    if request.id is None and wanted and all(wanted.values()):
        # Every output binary: the JSON header depends only on names, dtypes and shapes, so it is built
        # once per model version and shape instead of once per request.
        # (tobytes() writes C order whatever the layout, so a sliced output needs no contiguous copy first;
        # dtype objects hash and compare by value, so they key the cache as they are.)
        arrays = [results[name] for name in wanted]
        key = (model, version, tuple((name, a.dtype, a.shape) for name, a in zip(wanted, arrays)))
        header = _RESPONSE_HEADERS.get(key)
        if header is None:
            body, json_len = _encode_full(model, version, request, wanted, results)
            _RESPONSE_HEADERS.put(key, body[:json_len])
            return body, json_len
        return b"".join([header, *(a.tobytes() for a in arrays)]), len(header)
    return _encode_full(model, version, request, wanted, results)


def _encode_full(model: str, version: str | None, request: InferRequest, wanted: dict[str, bool],
                 results: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    outs, blobs = [], []
    for name, binary in wanted.items():
        arr = np.ascontiguousarray(results[name])
        datatype = _DATATYPE_BY_DTYPE.get(arr.dtype) or kserve_datatype(arr.dtype.name)
        entry: dict[str, Any] = {"name": name, "datatype": datatype,
                                 "shape": list(arr.shape)}
        if binary:
            raw = arr.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                # JSON has no NaN or Infinity: Python (and Triton) would write the bare words, which strict
                # parsers (JavaScript, Go, jq) refuse. Binary output carries them exactly.
                raise ApiError(422, f"output {name!r} holds NaN or infinite values, which JSON cannot carry; "
                                    "ask for it as binary data (parameters.binary_data: true)")
            entry["data"] = arr.reshape(-1).tolist()
        outs.append(entry)
    doc: dict[str, Any] = {"model_name": model, "outputs": outs}
    if version is not None:
        doc["model_version"] = version
    if request.id is not None:
        doc["id"] = request.id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
