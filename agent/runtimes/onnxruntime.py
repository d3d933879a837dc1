"""ONNX Runtime.

Its own log lines go through logging, never raw onto the terminal: sessions log at FATAL only (a refusal
comes back in the exception, which is turned into a one-line error), and with debug logging on (``-v``) the
lines it writes while a session loads are captured from file descriptor 2 and logged at DEBUG.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...sdk.errors import InputError, UnsupportedError
from ...sdk.layers import LayerRun, RawProfile, precision_word
from ...sdk.native_log import native_stderr_to_log
from ...sdk.package import TensorSpec
from ...sdk.placement import RECORD_ASSIGNMENT, placement
from .base import LoadedModel, Runtime

import onnxruntime as ort  # noqa: E402

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(int32)": "int32",
    "tensor(int64)": "int64", "tensor(bool)": "bool",
}
_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _spec(arg) -> TensorSpec:
    shape = [d if isinstance(d, int) else (d or f"d{i}") for i, d in enumerate(arg.shape)]
    return TensorSpec(name=arg.name, dtype=_ORT_TYPES.get(arg.type, arg.type), shape=shape)


# A profile of a few hundred runs of a big graph is tens of MB; more than this is not ours or not sane.
MAX_PROFILE_FILE_BYTES = 512 * 1024 * 1024
_CONV = {"Conv": 1, "FusedConv": 1, "NhwcFusedConv": 1, "ConvInteger": 1, "QLinearConv": 3}
_GEMM = {"Gemm", "FusedGemm", "QGemm", "MatMul", "FusedMatMul", "MatMulInteger", "QLinearMatMul",
         "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Add"}
_ITEMSIZE = {"float": 4, "float16": 2, "bfloat16": 2, "double": 8, "uint8": 1, "int8": 1, "int16": 2,
             "int32": 4, "int64": 8, "bool": 1}


def _shapes(entries) -> list[tuple[str, list[int]]]:
    out = []
    for entry in entries or []:
        if isinstance(entry, dict) and len(entry) == 1:
            (dtype, dims), = entry.items()
            if isinstance(dims, list) and all(isinstance(d, int) for d in dims):
                out.append((str(dtype), dims))
    return out


def _macs(op: str, ins: list[tuple[str, list[int]]], outs: list[tuple[str, list[int]]]) -> int | None:
    """MACs of a Conv/Gemm-like node from the shapes ORT's profiler recorded (weights may be pre-packed
    and missing from them: then Conv is not counted here and the SDK counts it from the model)."""
    if not outs:
        return None
    out = math.prod(outs[0][1])
    if op in _CONV:
        w = _CONV[op]
        if len(ins) > w and len(ins[w][1]) >= 3:
            return out * math.prod(ins[w][1][1:])
        return None
    if op in _GEMM and ins and ins[0][1]:
        return out * ins[0][1][-1]
    return None


@contextlib.contextmanager
def _runtime_log_to_logging():
    """With DEBUG on for this logger (ONNX Runtime's log severity is 2 then, else 4: nothing is printed): what
    ONNX Runtime writes to fd 2 meanwhile becomes log records (:mod:`edgeopt.sdk.native_log`)."""
    if not log.isEnabledFor(logging.DEBUG):
        yield
        return
    with native_stderr_to_log(log, "onnxruntime"):
        yield


class OnnxRuntimeModel(LoadedModel):
    def __init__(self, session: ort.InferenceSession, profile_dir: Path | None = None,
                 producers: dict[str, str] | None = None, nodes: dict[str, tuple[str, list[str]]] | None = None):
        self.session = session
        self._profile_dir = profile_dir
        self._producers = producers or {}
        self._nodes = nodes or {}
        self.inputs = [_spec(a) for a in session.get_inputs()]
        self.outputs = [_spec(a) for a in session.get_outputs()]
        self._names = [o.name for o in self.outputs]
        self._fp16_inputs = {s.name for s in self.inputs if s.dtype == "float16"}

    def _host_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """float32 arrays for a float16 input (an ``fp16_inputs`` package) are converted on the host: half the bytes
        cross to the device, and no Cast runs on it. Nothing else is converted."""
        if not self._fp16_inputs:
            return feeds
        return {k: (v.astype(np.float16) if k in self._fp16_inputs and v.dtype == np.float32 else v)
                for k, v in feeds.items()}

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = self._host_feeds(feeds)
        self.check_feeds(feeds)
        try:
            values = self.session.run(self._names, feeds)
        except (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ort.capi.onnxruntime_pybind11_state.Fail) as exc:
            log.debug("onnxruntime refused a run: %s", exc)
            raise InputError(f"ONNX Runtime refused the inputs: {' '.join(str(exc).split())[:300]}") from None
        return dict(zip(self._names, values))

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(runtime="onnxruntime", providers=self.session.get_providers(), version=ort.__version__)
        return out

    def close(self) -> None:
        if self._profile_dir is not None:
            shutil.rmtree(self._profile_dir, ignore_errors=True)

    def placement(self) -> list[dict[str, Any]]:
        """Every node of the graph ORT partitioned and the execution provider it was assigned to."""
        ops = {}
        try:
            for sub in self.session.get_provider_graph_assignment_info():
                for node in sub.get_nodes():
                    ops[node.name] = node.op_type
        except Exception:  # noqa: BLE001 - an older ORT; placement() below says so
            pass
        return [{"node": name, "op_type": ops.get(name, ""), "device": ep, "precision": None}
                for name, ep in placement(self.session).items()]

    def _source(self, name: str, outputs: list[str]) -> list[str]:
        """Source node(s) of an executed node: ORT names fused nodes '<node>_token_<n>', 'fused <node>' or
        after their output tensor ('<tensor>_nchwc'); the producer of that tensor is the source node."""
        base = name[6:] if name.startswith("fused ") else name
        base = re.sub(r"_token_\d+$", "", base)
        sources = set(self._producers.values())
        if base in sources:
            return [base]
        tensor = re.sub(r"_nchwc$", "", base)
        if tensor not in self._producers:
            return []
        node = self._producers[tensor]
        # A fused Conv+Relu is named after the Relu's output: name the Conv first (it is the layer's work, and
        # the key a comparison with an unfused or quantized build matches on).
        op, inputs = self._nodes.get(node, ("", []))
        if op in _ACTIVATIONS and inputs and inputs[0] in self._producers:
            return [self._producers[inputs[0]], node]
        return [node]

    def profile_layers(self, feeds: dict[str, np.ndarray], runs: int, *, warmup: int = 2,
                       deadline_s: float | None = None, between=None) -> RawProfile:
        """Run ``warmup`` + ``runs`` inferences under ORT's profiler and read its per-node records."""
        if self._profile_dir is None:
            raise UnsupportedError("this ONNX Runtime session was not loaded for profiling "
                                   "(load it with options={'profile_layers': True})")
        end = time.monotonic() + deadline_s if deadline_s else None
        run_ms = []
        done = 0
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            self.infer(feeds)
            elapsed = time.perf_counter() - t0
            if i >= warmup:
                run_ms.append(elapsed * 1e3)
                done += 1
            if between is not None:
                between(elapsed)
            if end is not None and time.monotonic() > end and done >= 1:
                break
        path = Path(self.session.end_profiling())
        try:
            if path.stat().st_size > MAX_PROFILE_FILE_BYTES:
                raise UnsupportedError(f"ONNX Runtime's profile {path.name} is over {MAX_PROFILE_FILE_BYTES} bytes")
            events = json.loads(path.read_text())
        finally:
            path.unlink(missing_ok=True)
        per_run: list[dict[str, float]] = []
        current: dict[str, float] = {}
        meta: dict[str, dict] = {}
        order: list[str] = []
        for ev in events if isinstance(events, list) else []:
            if not isinstance(ev, dict):
                continue
            if ev.get("cat") == "Session" and ev.get("name") == "model_run":
                per_run.append(current)
                current = {}
            elif ev.get("cat") == "Node" and str(ev.get("name", "")).endswith("_kernel_time"):
                name = str(ev["name"])[: -len("_kernel_time")]
                current[name] = current.get(name, 0.0) + float(ev.get("dur") or 0.0)
                if name not in meta:
                    meta[name] = ev.get("args") or {}
                    order.append(name)
        per_run = per_run[warmup:warmup + done]
        layers = []
        for name in order:
            args = meta[name]
            ins, outs = _shapes(args.get("input_type_shape")), _shapes(args.get("output_type_shape"))
            op = str(args.get("op_name", ""))
            size = sum(math.prod(d) * _ITEMSIZE.get(t, 4) for t, d in ins + outs)
            layers.append(LayerRun(
                name=name, op_type=op, precision=precision_word(ins[0][0] if ins else None),
                times_us=[run.get(name, 0.0) for run in per_run], device=str(args.get("provider", "")),
                source_nodes=self._source(name, []), macs=_macs(op, ins, outs), bytes_moved=size or None))
        notes = ["ONNX Runtime profiler: node kernel times (µs) per run; weights pre-packed by ORT are not in "
                 "the recorded input shapes, so bytes moved are a lower bound"]
        if not self._producers:
            notes.append("runtime node names are shown as ORT reports them (mapping to source nodes needs the "
                         "'onnx' package)")
        return RawProfile(runtime="onnxruntime", runtime_version=ort.__version__,
                          device=",".join(self.session.get_providers()), layers=layers, runs=len(per_run),
                          run_ms=run_ms, notes=notes)


_NP_TO_ORT_DEVICE = {"CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}


class BoundOnnxRuntimeModel(OnnxRuntimeModel):
    """A model run at fixed batch sizes with its inputs and outputs in buffers allocated once per size on the
    provider's device (ONNX Runtime's I/O binding), optionally replaying one captured CUDA graph per size.

    A batch of ``n`` samples runs at the smallest size >= n: the host array is copied into that size's input
    buffer (padding rows keep zeros), the outputs' first ``n`` rows are returned. A batch larger than the
    largest size runs in pieces of the largest. Every non-batch dimension must be fixed, so each buffer has
    one shape: what CUDA graphs need (a captured graph replays fixed addresses and shapes).
    """

    def __init__(self, session: ort.InferenceSession, batch_sizes: tuple[int, ...], device: str = "cpu",
                 graphs: bool = False, profile_dir: Path | None = None,
                 producers: dict[str, str] | None = None, nodes: dict[str, tuple[str, list[str]]] | None = None):
        super().__init__(session, profile_dir, producers, nodes)
        self.batch_sizes = tuple(sorted({int(b) for b in batch_sizes}))
        self.device = device
        self.graphs = graphs
        for spec in self.inputs + self.outputs:
            if not spec.shape or any(not isinstance(d, int) or d < 0 for d in spec.shape[1:]):
                raise UnsupportedError(
                    f"batch_sizes needs fixed shapes apart from the batch dimension; {spec.name} is {spec.shape} "
                    f"(fix them at package time with --input-shape)")
        self._slots: dict[int, tuple] = {}
        for graph_id, b in enumerate(self.batch_sizes, start=1):
            ins = {s.name: np.zeros([b, *s.shape[1:]], dtype=np.dtype(s.dtype)) for s in self.inputs}
            dev_in = {k: ort.OrtValue.ortvalue_from_numpy(v, device, 0) for k, v in ins.items()}
            dev_out = {s.name: ort.OrtValue.ortvalue_from_shape_and_type([b, *s.shape[1:]], np.dtype(s.dtype).type,
                                                                        device, 0) for s in self.outputs}
            binding = session.io_binding()
            for k, v in dev_in.items():
                binding.bind_ortvalue_input(k, v)
            for k, v in dev_out.items():
                binding.bind_ortvalue_output(k, v)
            run_options = ort.RunOptions()
            if graphs:
                # One captured graph per size: ONNX Runtime keys graphs by this id (0 is reserved).
                run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
            self._slots[b] = (ins, dev_in, dev_out, binding, run_options)
        # Run every size now: cuDNN's algorithm search, memory arenas and graph capture (ONNX Runtime captures
        # after its first regular runs) happen at load, not on the first requests.
        for b in self.batch_sizes:
            for _ in range(3):
                self._run_slot(b)

    def _run_slot(self, b: int) -> None:
        _, _, _, binding, run_options = self._slots[b]
        self.session.run_with_iobinding(binding, run_options)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = self._host_feeds(feeds)
        self.check_feeds(feeds)
        n = next(iter(feeds.values())).shape[0]
        if any(v.shape[0] != n for v in feeds.values()):
            raise InputError("inputs disagree on the batch dimension")
        top = self.batch_sizes[-1]
        if n > top:
            parts = [self.infer({k: v[i:i + top] for k, v in feeds.items()}) for i in range(0, n, top)]
            return {k: np.concatenate([p[k] for p in parts]) for k in self._names}
        b = next(size for size in self.batch_sizes if size >= n)
        ins, dev_in, dev_out, binding, run_options = self._slots[b]
        for k, v in feeds.items():
            if n == b and v.flags.c_contiguous:
                dev_in[k].update_inplace(v)  # one copy, straight from the caller's array
                continue
            host = ins[k]
            host[:n] = v
            if n < b:
                host[n:] = 0
            dev_in[k].update_inplace(host)
        try:
            self.session.run_with_iobinding(binding, run_options)
        except (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ort.capi.onnxruntime_pybind11_state.Fail) as exc:
            raise InputError(f"ONNX Runtime refused the inputs: {' '.join(str(exc).split())[:300]}") from None
        if self.device == "cpu":  # numpy() is a view of the bound buffer there, which the next run overwrites
            return {k: dev_out[k].numpy()[:n].copy() for k in self._names}
        return {k: dev_out[k].numpy()[:n] for k in self._names}

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(batch_sizes=list(self.batch_sizes), cuda_graph=self.graphs, io_binding=self.device)
        return out


class OnnxRuntimeRuntime(Runtime):
    name = "onnxruntime"
    extra = "onnxruntime"

    @classmethod
    def version(cls) -> str:
        return ort.__version__

    @classmethod
    def devices(cls) -> list[str]:
        return list(ort.get_available_providers())

    @classmethod
    def load(cls, model_path: Path, *, device: str = "CPUExecutionProvider", threads: int | None = None,
             performance_hint: str = "latency", cache_dir: Path | None = None,
             options: dict[str, Any] | None = None) -> OnnxRuntimeModel:
        options = dict(options or {})
        providers = options.pop("providers", None) or [device]
        available = cls.devices()
        # ORT silently falls back to CPU for an absent provider: refuse instead, naming what exists.
        absent = [p for p in providers if p not in available]
        if absent:
            raise UnsupportedError(f"ONNX Runtime execution provider(s) {', '.join(absent)} not available here "
                                   f"(available: {', '.join(available)})")
        so = ort.SessionOptions()
        # Which node runs on which provider (sdk.placement); recorded at partitioning, no cost per run.
        so.add_session_config_entry(RECORD_ASSIGNMENT, "1")
        profile_dir = None
        if options.pop("profile_layers", False):
            profile_dir = Path(tempfile.mkdtemp(prefix="edgeopt-ortprof-"))
            so.enable_profiling = True
            so.profile_file_prefix = str(profile_dir / "ort")
        so.graph_optimization_level = _LEVELS[options.pop("graph_optimization_level", "all")]
        # FATAL only: errors come back in exceptions; its warnings and infos are logged with -v (see above).
        so.log_severity_level = 2 if log.isEnabledFor(logging.DEBUG) else 4
        # Spinning is ONNX Runtime's default; the agent passes False unless the profile asks for it
        # (BENCHMARKS.md: the same batching-on throughput for 43% less agent CPU on 2 cores, 90% on 16).
        if not options.pop("intra_op_spinning", True):
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            so.intra_op_num_threads = int(threads)
        batch_sizes = tuple(options.pop("batch_sizes", ()) or ())
        graphs = bool(options.pop("cuda_graph", False))
        cuda = {"prefer_nhwc": "1" if options.pop("prefer_nhwc", False) else "0",
                "cudnn_conv_algo_search": str(options.pop("cudnn_conv_algo_search", "EXHAUSTIVE"))}
        if graphs:
            if providers[0] != "CUDAExecutionProvider" or not batch_sizes:
                raise UnsupportedError("cuda_graph needs CUDAExecutionProvider and batch_sizes")
            cuda["enable_cuda_graph"] = "1"
        provider_list = [(p, cuda) if p == "CUDAExecutionProvider" else p for p in providers]
        try:
            with _runtime_log_to_logging():
                session = ort.InferenceSession(str(model_path), sess_options=so, providers=provider_list)
        except Exception as exc:  # ORT raises several pybind exception types
            if profile_dir is not None:
                shutil.rmtree(profile_dir, ignore_errors=True)
            raise UnsupportedError(f"ONNX Runtime cannot load {Path(model_path).name}: "
                                   f"{' '.join(str(exc).split())[:300]}") from None
        producers, nodes = _graph(model_path) if profile_dir else ({}, {})
        if not batch_sizes:
            return OnnxRuntimeModel(session, profile_dir, producers, nodes)
        try:
            return BoundOnnxRuntimeModel(session, batch_sizes, device=_NP_TO_ORT_DEVICE.get(providers[0], "cpu"),
                                         graphs=graphs, profile_dir=profile_dir,
                                         producers=producers, nodes=nodes)
        except UnsupportedError:
            raise
        except Exception as exc:  # capture or binding failed on this device
            raise UnsupportedError(f"ONNX Runtime cannot run {Path(model_path).name} at batch sizes "
                                   f"{list(batch_sizes)}: {' '.join(str(exc).split())[:300]}") from None


def _graph(model_path: Path) -> tuple[dict[str, str], dict[str, tuple[str, list[str]]]]:
    """(tensor name -> producing node, node -> (op type, inputs)) of the model file; empty without the onnx
    package (a device may run ORT without ONNX tooling: then ORT's own names are shown)."""
    try:
        import onnx
    except ImportError:
        return {}, {}
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - ORT loaded it; names are a nicety
        log.info("cannot read %s for node names: %s", model_path, exc)
        return {}, {}
    named = [n for n in model.graph.node if n.name]
    return ({out: n.name for n in named for out in n.output},
            {n.name: (n.op_type, list(n.input)) for n in named})
