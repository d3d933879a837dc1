"""PyTorch AOTInductor packages (``.pt2``): models compiled ahead of time by TorchInductor into native code
for one device (``cuda`` or ``cpu``), for devices that have PyTorch.

The SDK compiles one ``.pt2`` per batch size the profile names (``model-b<N>.pt2``), each with fixed shapes and
TorchInductor's kernel autotuning at that size: the code ``torch.compile(mode="max-autotune")`` would run, without
Python in the loop. The agent loads every size, keeps inputs and outputs in buffers allocated once per size on
the device, pads a batch up to the nearest size (zeroed padding rows), splits one larger than the largest, and on
CUDA replays one captured CUDA graph per size. Host copies go through pinned (page-locked) staging buffers, which
is what makes a host-to-device copy run at the bus's speed.

A ``.pt2`` runs only on the PyTorch release line that compiled it and, on CUDA, on the GPU architecture it was
compiled for: :meth:`TorchAotiRuntime.load` refuses any other, naming both.
"""
from __future__ import annotations

import ctypes
import json
import logging
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ...sdk.errors import InputError, MissingDependencyError, UnsupportedError
from ...sdk.package import TensorSpec
from .base import LoadedModel, Runtime

log = logging.getLogger(__name__)

IO_FILE = "aoti-io.json"  # written by the SDK beside the .pt2 files: input/output specs and batch files


def _torch():
    try:
        import torch
    except ImportError:
        raise MissingDependencyError(
            "runtime torch-aoti needs PyTorch on the device", hint="install this device's PyTorch build (the release "
            "line the package names), then pip install 'edgeopt[agent-torch]', and restart the agent") from None
    return torch


def release_line(version: str) -> str:
    """'2.11.0+cu130' -> '2.11': AOTInductor's generated code is tied to the PyTorch release it came from."""
    return ".".join(version.split("+")[0].split(".")[:2])


def cuda_arch(torch, index: int = 0) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


class TorchAotiModel(LoadedModel):
    """Every batch size's compiled model, with buffers allocated once per size (see the module docstring)."""

    def __init__(self, runners: dict[int, Any], inputs: list[TensorSpec], outputs: list[TensorSpec], device: str,
                 graphs: bool):
        torch = _torch()
        self._torch = torch
        self.inputs, self.outputs = inputs, outputs
        self.device = device
        self.graphs = graphs and device == "cuda"
        self.batch_sizes = tuple(sorted(runners))
        self._runners = runners
        self._names = [o.name for o in outputs]
        self._lock = threading.RLock()  # run_resident takes it too, inside infer
        cuda = device == "cuda"
        self._stream = torch.cuda.Stream() if cuda else None
        self._slots: dict[int, dict[str, Any]] = {}
        for b in self.batch_sizes:
            dev_in = [torch.zeros([b, *s.shape[1:]], dtype=_dtype(torch, s.dtype), device=device) for s in inputs]
            host_in = [torch.zeros_like(t, device="cpu").pin_memory() if cuda else None for t in dev_in]
            # A float16 input fed float32 (an application's numpy array) crosses the bus as float32 and is cast
            # on the GPU: numpy's float32 -> float16 conversion is scalar code (0.38 ms for one 3x224x224 image
            # on a 2-core EPYC, 12 ms for 32), the GPU's a few microseconds; the bus moves the extra bytes faster.
            wide = [(torch.zeros_like(t, dtype=torch.float32, device="cpu").pin_memory(),
                     torch.zeros_like(t, dtype=torch.float32)) if cuda and s.dtype == "float16" else None
                    for s, t in zip(inputs, dev_in)]
            slot = {"in": dev_in, "host_in": host_in, "wide": wide, "out": None, "host_out": None, "graph": None}
            self._slots[b] = slot
        # Warm every size (autotuned kernels, cuBLAS/cuDNN handles), then capture each size's graph: at load,
        # never on the first requests.
        with torch.inference_mode():
            for b in self.batch_sizes:
                slot = self._slots[b]
                if cuda:
                    with torch.cuda.stream(self._stream):
                        for _ in range(3):
                            slot["out"] = self._call(b, slot["in"])
                    self._stream.synchronize()
                    if self.graphs:
                        try:
                            graph = torch.cuda.CUDAGraph()
                            with torch.cuda.graph(graph, stream=self._stream):
                                slot["out"] = self._call(b, slot["in"])
                            slot["graph"] = graph
                        except RuntimeError as exc:  # served without graphs, and said so (describe())
                            log.warning("torch-aoti: CUDA graph capture failed at batch %d, running without graphs: "
                                        "%s", b, " ".join(str(exc).split())[:200])
                            self.graphs = False
                            torch.cuda.synchronize()
                            slot["out"] = self._call(b, slot["in"])
                    slot["host_out"] = [torch.empty_like(t, device="cpu").pin_memory() for t in slot["out"]]
                else:
                    slot["out"] = self._call(b, slot["in"])

    def _call(self, b: int, tensors: list) -> list:
        out = self._runners[b](*tensors)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def run_resident(self, b: int) -> list:
        """One run of size ``b`` on the inputs already in its device buffers; the outputs stay on the device
        (what an application that keeps its data on the GPU pays; benchmarks/gpu_profile.py). Holds the model's
        lock (re-entrant: ``infer`` already holds it): the runners may be single-threaded, and a graph replays
        into one set of buffers."""
        slot = self._slots[b]
        with self._lock:
            if slot["graph"] is not None:
                slot["graph"].replay()
                return slot["out"]
            with self._torch.inference_mode():
                if self._stream is not None:
                    with self._torch.cuda.stream(self._stream):
                        slot["out"] = self._call(b, slot["in"])
                else:
                    slot["out"] = self._call(b, slot["in"])
            return slot["out"]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # float32 arrays for a float16 input (fp16_inputs) are accepted: cast on the GPU after the copy (see
        # __init__), on the CPU while copying into the input buffer.
        self.check_feeds(feeds, widen={"float16": "float32"})
        n = next(iter(feeds.values())).shape[0]
        if any(v.shape[0] != n for v in feeds.values()):
            raise InputError("inputs disagree on the batch dimension")
        if n == 0:
            raise InputError("an empty batch (0 samples)")
        top = self.batch_sizes[-1]
        if n > top:
            parts = [self.infer({k: v[i:i + top] for k, v in feeds.items()}) for i in range(0, n, top)]
            return {k: np.concatenate([p[k] for p in parts]) for k in self._names}
        b = next(size for size in self.batch_sizes if size >= n)
        torch = self._torch
        slot = self._slots[b]
        # The buffers are inference tensors (made at load under inference_mode): every write to them too.
        with self._lock, torch.inference_mode():
            if self.device == "cuda":
                with torch.cuda.stream(self._stream):
                    # Only the real rows cross the bus; the padding rows are zeroed on the GPU (a memset).
                    for spec, dev, host, wide in zip(self.inputs, slot["in"], slot["host_in"], slot["wide"]):
                        x = feeds[spec.name]
                        if wide is not None and x.dtype == np.float32:
                            host, dev32 = wide
                            host.numpy()[:n] = x
                            dev32[:n].copy_(host[:n], non_blocking=True)
                            dev[:n].copy_(dev32[:n])  # the cast, one kernel on this stream
                        else:
                            host.numpy()[:n] = x
                            dev[:n].copy_(host[:n], non_blocking=True)
                        if n < b:
                            dev[n:].zero_()
                    outs = self.run_resident(b)
                    for dev, host in zip(outs, slot["host_out"]):
                        host[:n].copy_(dev[:n], non_blocking=True)
                self._stream.synchronize()
                return {k: host.numpy()[:n].copy() for k, host in zip(self._names, slot["host_out"])}
            for spec, dev in zip(self.inputs, slot["in"]):
                np.copyto(dev.numpy()[:n], feeds[spec.name], casting="same_kind")
                if n < b:
                    dev[n:].zero_()
            outs = self.run_resident(b)
            return {k: t.numpy()[:n].copy() for k, t in zip(self._names, outs)}

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(runtime="torch-aoti", version=self._torch.__version__, device=self.device,
                   batch_sizes=list(self.batch_sizes), cuda_graph=self.graphs)
        return out

    def close(self) -> None:
        self._slots.clear()
        self._runners.clear()


def cxx_runtime_global() -> bool:
    """Put the process's C++ runtime (libstdc++) in the global symbol scope before a .pt2 is loaded.

    AOTInductor's CUDA wrapper .so, as PyTorch 2.11 builds it with g++ 13 (Ubuntu 24.04, the lent H200), carries
    61 of libstdc++'s locale symbols of its own and imports none (benchmarks/gpu_aoti_probe.py's ELF report).
    PyTorch loads libstdc++ as a dependency in a local scope, so nothing interposes those copies: the model's
    ``std::regex`` (``parse_device_str``) then looks a facet up in the real locale at its own copy's index and
    calls ``codecvt<char16_t>::do_unshift`` as if it were ``collate::transform``: SIGSEGV in every fresh process.
    With the library global first (what ``LD_PRELOAD=libstdc++.so.6``, or importing ONNX Runtime first, did by
    accident), the wrapper's references bind to the one real runtime: the probe loaded, ran and captured a CUDA
    graph in 4 of 4 such variants and crashed in 2 of 2 without. Returns whether it is global (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)  # already mapped by PyTorch: promotes it
    except OSError as exc:  # a libc++ or static build: nothing to promote
        log.debug("torch-aoti: libstdc++ not promoted to the global scope: %s", exc)
        return False
    return True


def _dtype(torch, name: str):
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
                "int32": torch.int32, "uint8": torch.uint8, "int8": torch.int8, "bool": torch.bool}[name]
    except KeyError:
        raise UnsupportedError(f"torch-aoti: tensor dtype {name} is not supported") from None


def read_io(model_path: Path) -> dict[str, Any]:
    """The SDK's description beside the .pt2 files (bounded: it is a small JSON file)."""
    path = Path(model_path).with_name(IO_FILE)
    try:
        raw = path.read_bytes()[:1_000_000]
        io = json.loads(raw)
        return {"inputs": [TensorSpec.model_validate(t) for t in io["inputs"]],
                "outputs": [TensorSpec.model_validate(t) for t in io["outputs"]],
                "batch_files": {int(k): str(v) for k, v in io["batch_files"].items()},
                "torch": str(io["torch"]), "device": str(io["device"]), "arch": io.get("arch")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UnsupportedError(f"torch-aoti: {IO_FILE} beside {Path(model_path).name} is missing or unreadable "
                               f"({type(exc).__name__})") from None


class TorchAotiRuntime(Runtime):
    name = "torch-aoti"
    extra = "torch"

    @classmethod
    def check_importable(cls) -> None:
        # Found, not imported: the agent's hardware probe asks every runtime, and importing PyTorch takes seconds
        # and hundreds of MB on a device that serves another runtime.
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise ImportError("torch", name="torch")

    @classmethod
    def version(cls) -> str:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("torch")
        except PackageNotFoundError:
            return _torch().__version__

    @classmethod
    def devices(cls) -> list[str]:
        # PyTorch is imported to ask CUDA only where an NVIDIA driver is there to answer (or already imported).
        import shutil
        import sys

        driver = (Path("/proc/driver/nvidia").exists() or Path("/dev/nvidiactl").exists()
                  or shutil.which("nvidia-smi") is not None)
        if not driver and "torch" not in sys.modules:
            return ["cpu"]
        torch = _torch()
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    @classmethod
    def load(cls, model_path: Path, *, device: str = "cpu", threads: int | None = None,
             performance_hint: str = "latency", cache_dir: Path | None = None,
             options: dict[str, Any] | None = None) -> TorchAotiModel:
        torch = _torch()
        options = dict(options or {})
        io = read_io(model_path)
        if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
            raise UnsupportedError(f"torch-aoti: device {device} is not available here (PyTorch "
                                   f"{torch.__version__}: {'CUDA available' if torch.cuda.is_available() else 'no CUDA'})")
        if io["device"] != device:
            raise UnsupportedError(f"torch-aoti: the package was compiled for {io['device']}, asked to run on {device}")
        if release_line(io["torch"]) != release_line(torch.__version__):
            raise UnsupportedError(f"torch-aoti: the package was compiled by PyTorch {io['torch']}, this device has "
                                   f"{torch.__version__} (an AOTInductor package runs on the release line that built it)",
                                   hint=f"install PyTorch {release_line(io['torch'])}.x here, or rebuild the package")
        if device == "cuda" and io.get("arch") and io["arch"] != cuda_arch(torch):
            raise UnsupportedError(f"torch-aoti: the package was compiled for {io['arch']} GPUs, this GPU is "
                                   f"{cuda_arch(torch)}", hint="build the package on a machine with this GPU")
        if threads and device == "cpu":
            torch.set_num_threads(int(threads))
        graphs = bool(options.get("cuda_graph", False)) and device == "cuda"
        cxx_runtime_global()
        runners = {}
        for b, name in sorted(io["batch_files"].items()):
            path = Path(model_path).with_name(name)
            if path.parent != Path(model_path).parent or not path.is_file():
                raise UnsupportedError(f"torch-aoti: batch {b} file {name!r} is missing from the package")
            try:
                # A runner that will be captured into a CUDA graph is loaded single-threaded: the container's
                # own thread synchronization (an event wait per run) is not allowed while a stream is capturing
                # ("operation not permitted when stream is capturing", H200, PyTorch 2.11). Every run of the
                # model goes through TorchAotiModel's lock instead.
                runners[b] = torch._inductor.aoti_load_package(str(path), run_single_threaded=graphs)
            except Exception as exc:  # noqa: BLE001 - a corrupt or foreign .pt2: one line, never a traceback
                raise UnsupportedError(f"torch-aoti: cannot load {name}: {type(exc).__name__}: "
                                       f"{' '.join(str(exc).split())[:200]}") from None
        if not runners:
            raise UnsupportedError("torch-aoti: the package names no batch sizes")
        return TorchAotiModel(runners, io["inputs"], io["outputs"], device, graphs)
