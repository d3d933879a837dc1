"""PyTorch AOTInductor (``torch-aoti``): the PyTorch model compiled ahead of time into native code for one device.

It takes the model as PyTorch (``edgeopt package MODULE:FACTORY --weights w.pt``), not the ONNX export: the ONNX
export stays the fp32 reference the accuracy gate compares with, and names the inputs and outputs. Each batch size
of the profile's block is exported with ``torch.export`` at fixed shapes and compiled by
``torch._inductor.aoti_compile_and_package`` (with ``max_autotune``: the kernels ``torch.compile(mode=
"max-autotune")`` would pick), into ``model-b<N>.pt2``; ``aoti-io.json`` beside them records the tensors, the batch
files, the PyTorch version and, on CUDA, the GPU architecture, which the agent checks before loading.

Compilation happens on the device kind it targets: a ``cuda`` package is built on a machine with that GPU
(AOTInductor emits code for the GPU it compiles on). Elsewhere the candidate is skipped with the reason.
"""
from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

from ..errors import InputError, UnsupportedError, missing_extra
from .base import Backend, BuildJob

log = logging.getLogger(__name__)

RUNTIME = "torch-aoti"
IO_FILE = "aoti-io.json"  # the agent's edgeopt.agent.runtimes.torch_aoti reads it


def _torch():
    try:
        import torch
    except ImportError:
        raise missing_extra("torch", "torch") from None
    return torch


class TorchAotiBackend(Backend):
    name = RUNTIME
    extra = "torch"
    accepts = ("onnx",)  # the reference; the PyTorch model itself comes with the request (torch_source)
    precisions = ("fp32", "fp16")

    @classmethod
    def check_importable(cls) -> None:
        _torch()

    def check_request(self, request, runtime_options) -> None:
        """Refuse (one line) what this backend cannot build here: no PyTorch model, or no target device."""
        if getattr(request, "torch_source", None) is None:
            raise UnsupportedError("torch-aoti compiles the PyTorch model itself, and the input is a model file",
                                   hint="give the model as MODULE:FACTORY with --weights")
        torch = _torch()
        if runtime_options.device == "cuda" and not torch.cuda.is_available():
            raise UnsupportedError("torch-aoti compiles for the GPU it runs on, and this host has no CUDA device",
                                   hint="package on a machine with the target GPU")

    def check_ops(self, source: Path, source_format: str, display: str | None = None) -> None:
        return None  # torch.export reports what it cannot trace when the model is built

    def run_device(self, runtime_options: Any) -> tuple[str, str, bool]:
        return runtime_options.device, runtime_options.device, False

    def build(self, job: BuildJob):
        from ...agent.runtimes.torch_aoti import cuda_arch
        from ..pipeline.types import Artifact
        from ..prune.source import build_module

        torch = _torch()
        opts = job.runtime_options
        if job.precision not in self.precisions:
            raise UnsupportedError(f"torch-aoti has no precision {job.precision!r} (fp32, fp16)")
        src = job.torch_source
        if src is None:
            raise UnsupportedError("torch-aoti needs the PyTorch model (MODULE:FACTORY)")
        inputs, outputs = _io_specs(job.source)
        half = job.precision == "fp16"
        in_dtype = "float16" if half and opts.fp16_inputs else "float32"
        for spec in inputs:
            if spec["dtype"] != "float32":
                raise UnsupportedError(f"torch-aoti: input {spec['name']} is {spec['dtype']}; float inputs only")
            if any(not isinstance(d, int) or d < 1 for d in spec["shape"][1:]):
                raise InputError(f"torch-aoti compiles fixed shapes; input {spec['name']} is {spec['shape']}",
                                 hint="fix them with --input-shape")
        model = build_module(src.factory, src.weights)
        device = opts.device
        wrapped = _Edges(torch, model.to(device), torch.float16 if half else torch.float32,
                         len(outputs)).eval()
        if half:
            wrapped.model.half()
        files: dict[str, Path] = {}
        batch_files: dict[str, str] = {}
        notes = []
        t0 = time.perf_counter()
        for b in opts.batch_sizes:
            example = tuple(torch.zeros([b, *s["shape"][1:]], dtype=getattr(torch, in_dtype), device=device)
                            for s in inputs)
            path = job.workdir / f"model-b{b}.pt2"
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations inside export
                    program = torch.export.export(wrapped, example)
                    torch._inductor.aoti_compile_and_package(
                        program, package_path=str(path), inductor_configs={"max_autotune": bool(opts.max_autotune)})
            except Exception as exc:  # noqa: BLE001 - torch.export / Inductor errors are long: one line
                raise UnsupportedError(f"torch-aoti could not compile batch {b}: {type(exc).__name__}: "
                                       f"{' '.join(str(exc).split())[:300]}") from None
            files[path.name] = path
            batch_files[str(b)] = path.name
        notes.append(f"AOTInductor: {len(batch_files)} batch size(s) {list(opts.batch_sizes)} compiled for "
                     f"{device}{' with max-autotune' if opts.max_autotune else ''} in {time.perf_counter() - t0:.0f} s")
        io = {"inputs": [{**s, "dtype": in_dtype, "shape": ["batch", *s["shape"][1:]]} for s in inputs],
              "outputs": [{**o, "dtype": "float32", "shape": ["batch", *o["shape"][1:]]} for o in outputs],
              "batch_files": batch_files, "torch": torch.__version__, "device": device,
              "arch": cuda_arch(torch) if device == "cuda" else None}
        io_path = job.workdir / IO_FILE
        io_path.write_text(json.dumps(io, indent=1))
        files[IO_FILE] = io_path
        top = job.workdir / batch_files[str(max(opts.batch_sizes))]
        return Artifact(model_file=top, files=files, runtime=RUNTIME, precision=job.precision, notes=notes,
                        runtime_options={})


def _io_specs(onnx_path: Path) -> tuple[list[dict], list[dict]]:
    """Names, dtypes and shapes of the ONNX reference's inputs and outputs (the names the package keeps)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}

    def spec(v) -> dict:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        return {"name": v.name, "dtype": str(helper.tensor_dtype_to_np_dtype(t.elem_type)), "shape": dims}

    return [spec(v) for v in model.graph.input if v.name not in inits], [spec(v) for v in model.graph.output]


def _edges_class(torch):
    class Edges(torch.nn.Module):
        """The model between the package's tensors: inputs cast to the model's precision, outputs to float32,
        always a tuple in the ONNX export's output order."""

        def __init__(self, model, dtype, n_out: int):
            super().__init__()
            self.model, self.dtype, self.n_out = model, dtype, n_out

        def forward(self, *xs):
            out = self.model(*[x.to(self.dtype) for x in xs])
            if isinstance(out, dict):
                out = tuple(out.values())
            if not isinstance(out, (tuple, list)):
                out = (out,)
            return tuple(o.float() for o in out)

    return Edges


def _Edges(torch, model, dtype, n_out):
    return _edges_class(torch)(model, dtype, n_out)
