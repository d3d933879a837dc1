"""OpenVINO backend: OpenVINO IR in fp32 / fp16 (compressed weights) / int8 static PTQ (NNCF) / int8
weight-only (NNCF ``compress_weights``).

Devices the host lacks (NPU, Intel GPU) are targeted by the IR itself (an IR is device-neutral) and
measured on the host CPU as a proxy: ``run_device`` says so, it never pretends the device ran.
"""
from __future__ import annotations

import contextlib
import logging
import re
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import UnsupportedError
from ..pipeline.types import Artifact
from .base import Backend, BuildJob, Layer

log = logging.getLogger(__name__)

RUNTIME = "openvino"
WEIGHTED = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData", "MatMul")
# Ops NNCF may place quantizers on (their inputs): the candidates for keeping in float.
SENSITIVE_OPS = WEIGHTED + ("Add", "Multiply", "Subtract", "Divide", "Concat", "Interpolate", "AvgPool",
                            "ReduceMean", "Sigmoid", "HSigmoid", "HSwish", "Swish", "SoftMax", "Softmax", "MVN")
_NNCF_DEVICE = {"CPU": "CPU", "GPU": "GPU", "NPU": "NPU"}


class OpenVINOBackend(Backend):
    name: ClassVar[str] = RUNTIME
    extra: ClassVar[str] = "sdk"
    accepts: ClassVar[tuple[str, ...]] = ("onnx", "openvino-ir", "tflite")  # TFLite through OpenVINO's frontend
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8", "int8-weight-only")

    @classmethod
    def check_importable(cls) -> None:
        import openvino  # noqa: F401

    def _read(self, source: Path, source_format: str, display: str | None = None):
        import openvino as ov

        try:
            if source_format == "openvino-ir":
                return _core().read_model(str(source))
            return ov.convert_model(str(source))
        except Exception as exc:  # OpConversionFailure, GeneralFailure, RuntimeError
            text = " ".join(str(exc).split())
            m = re.search(r"No conversion rule found for operations: ([^\n]+?)(?: Summary| \[| -|$)", text)
            ops = m.group(1).strip() if m else None
            what = f"op {ops}" if ops else "the model"
            raise UnsupportedError(f"OpenVINO {ov.get_version().split('-')[0]} cannot convert {what} in "
                                   f"{display or source.name}"
                                   + ("" if ops else f": {text[:200]}"),
                                   hint="choose a profile with another runtime, or replace the op") from None

    def check_ops(self, source: Path, source_format: str, display: str | None = None) -> None:
        if source_format not in self.accepts:
            raise UnsupportedError(f"OpenVINO takes ONNX, OpenVINO IR or TFLite; {display or source.name} is "
                                   f"{source_format}")
        self._read(source, source_format, display)

    def run_device(self, runtime_options: Any) -> tuple[str, str, bool]:
        from ...agent.runtimes import get_runtime

        wanted = runtime_options.device
        if wanted in get_runtime(RUNTIME).devices():
            return wanted, wanted, False
        return wanted, "CPU", True

    def build(self, job: BuildJob) -> Artifact:
        import openvino as ov

        # Always start from the one converted IR: the converter numbers unnamed ops per call (Multiply_9785),
        # so the layer names the float-layer search found must come from the same conversion.
        model = _core().read_model(str(self.layer_reference(job)))
        notes: list[str] = []
        if job.precision == "int8":
            model = self._quantize(model, job, notes)
        elif job.precision == "int8-weight-only":
            import nncf

            with _progress_to_stderr():
                model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                              ignored_scope=_scope(job.float_layers))
            notes.append("weights int8 (NNCF compress_weights, asymmetric); activations stay float")
        elif job.precision not in ("fp32", "fp16"):
            raise UnsupportedError(f"OpenVINO backend has no precision {job.precision!r}")
        xml = job.workdir / "model.xml"
        # fp16 stores weights as f16 (half the size); the device's plugin picks its execution precision.
        ov.save_model(model, str(xml), compress_to_fp16=job.precision == "fp16")
        options = {}
        if job.precision != "fp16":
            # OpenVINO's CPU plugin runs float parts in bf16 by default where the CPU has it (avx512_bf16,
            # AMX): then "fp32" and the float layers of an int8 model silently lose precision (the OCR
            # detector's int8 cosine fell from 0.99 to 0.97 here). Pin what was validated.
            options["INFERENCE_PRECISION_HINT"] = "f32"
            notes.append("float parts pinned to f32 (INFERENCE_PRECISION_HINT), not the CPU's bf16 default")
        return Artifact(model_file=xml, files={"model.xml": xml, "model.bin": xml.with_suffix(".bin")},
                        runtime=RUNTIME, precision=job.precision, float_layers=list(job.float_layers), notes=notes,
                        runtime_options=options)

    def _quantize(self, model, job: BuildJob, notes: list[str]):
        import nncf
        from nncf.common.logging import nncf_logger

        # NNCF logs every ignored node at INFO through its own handler; keep it to warnings unless -vv.
        nncf_logger.setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))

        if not job.calibration:
            raise UnsupportedError("int8 static quantization needs calibration data")
        device = _NNCF_DEVICE.get(getattr(job.runtime_options, "device", "CPU"), "ANY")
        with _progress_to_stderr():
            quantized = nncf.quantize(
                model, nncf.Dataset(job.calibration), subset_size=len(job.calibration),
                target_device=nncf.TargetDevice(device), preset=nncf.QuantizationPreset.PERFORMANCE,
                ignored_scope=_scope(job.float_layers),
            )
        notes.append(f"NNCF post-training int8 for {device}, {len(job.calibration)} calibration samples"
                     + (f", {len(job.float_layers)} layers kept in float" if job.float_layers else ""))
        return quantized

    # ------------------------------------------------------------------ float fallback without re-quantizing

    def revert_points(self, model_file: Path, layers: bool = False) -> list[str]:
        """The activation quantizers (FakeQuantize on a non-constant input) of an int8 IR, in graph order; with
        ``layers``, also each weighted layer with int8 weights (reverting one restores its fp32 weights and its
        input's quantizer, which bypassing activations alone cannot reach)."""
        model = _core().read_model(str(model_file))
        return [op.get_friendly_name() for op in model.get_ordered_ops() if _is_activation_fq(op)
                or (layers and _int8_weights(op))]

    def revert_consumers(self, model_file: Path) -> dict[str, list[str]]:
        """Each activation FakeQuantize -> the weighted layers it feeds (through weightless reshapes): the
        layers to keep in float, weights too, when re-quantizing with that quantizer's input in float."""
        model = _core().read_model(str(model_file))
        out: dict[str, list[str]] = {}
        for op in model.get_ordered_ops():
            if op.get_type_name() != "FakeQuantize" or op.input_value(0).get_node().get_type_name() in (
                    "Constant", "Convert"):
                continue
            found, stack, seen = [], [t.get_node() for t in op.output(0).get_target_inputs()], set()
            while stack:
                node = stack.pop()
                name = node.get_friendly_name()
                if name in seen:
                    continue
                seen.add(name)
                if node.get_type_name() in WEIGHTED:
                    found.append(name)
                elif node.get_type_name() in ("Reshape", "Transpose", "Concat", "Split", "VariadicSplit",
                                              "StridedSlice", "Squeeze", "Unsqueeze", "MaxPool", "Interpolate"):
                    stack.extend(t.get_node() for o in node.outputs() for t in o.get_target_inputs())
            out[op.get_friendly_name()] = found
        for op in model.get_ordered_ops():
            if _int8_weights(op):
                out[op.get_friendly_name()] = [op.get_friendly_name()]
        return out

    def revert_layers(self, model_file: Path) -> dict[str, str]:
        """Each revert point -> its layer (NNCF names an activation quantizer '<layer>/fq_...')."""
        return {name: name.split("/fq_")[0] for name in self.revert_points(model_file, layers=True)}

    def score_reverts(self, model_file: Path, feeds: list[dict], score, groups: list[list[str]],
                      reference: Path | None = None) -> list[float]:
        """``score(outputs)`` on ``feeds`` with each group of revert points in float (activation quantizers
        bypassed; layers given their ``reference`` fp32 weights), without re-calibrating: what NNCF's accuracy
        control ranks by. One score per group."""
        model = _core().read_model(str(model_file))
        weights = _reference_weights(reference)
        return [float(score(_run_all(_bypass(model.clone(), group, weights), feeds))) for group in groups]

    def build_reverted(self, model_file: Path, names: list[str], workdir: Path, precision: str,
                       reference: Path | None = None) -> Artifact:
        """The int8 IR with the named revert points in float (activations bypassed, layers with fp32 weights)."""
        import openvino as ov

        model = _bypass(_core().read_model(str(model_file)), names, _reference_weights(reference))
        xml = workdir / "model.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        layers = sorted({n.split("/fq_")[0] for n in names})
        return Artifact(model_file=xml, files={"model.xml": xml, "model.bin": xml.with_suffix(".bin")},
                        runtime=RUNTIME, precision=precision, float_layers=layers,
                        notes=[f"{len(names)} activation quantizer(s) bypassed: those activations stay float"],
                        runtime_options={"INFERENCE_PRECISION_HINT": "f32"})

    # ------------------------------------------------------------------ sensitivity

    def layer_reference(self, job: BuildJob) -> Path:
        import openvino as ov

        ref = job.workdir.parent / f"ov-fp32-{job.graph_level}.xml"
        if not ref.exists():
            ov.save_model(self._read(job.source, job.source_format), str(ref), compress_to_fp16=False)
        return ref

    def layers(self, reference: Path) -> list[Layer]:
        model = _core().read_model(str(reference))
        picked = [op for op in model.get_ordered_ops() if op.get_type_name() in SENSITIVE_OPS
                  and not (op.get_type_name() in WEIGHTED
                           and op.input_value(1).get_node().get_type_name() == "Parameter")
                  and not _is_constant_subgraph(op)]
        names = {op.get_friendly_name() for op in picked}
        out = []
        for op in picked:
            ups, seen, stack = [], set(), [v.get_node() for v in op.input_values()]
            while stack:
                node = stack.pop()
                name = node.get_friendly_name()
                if name in seen:
                    continue
                seen.add(name)
                if name in names:
                    ups.append(name)
                else:
                    stack.extend(v.get_node() for v in node.input_values())
            out.append(Layer(op.get_friendly_name(), op.get_friendly_name(), ups))
        return out

    def layer_probe(self, model_file: Path, layers: list[Layer]):
        model = _core().read_model(str(model_file))
        ops = {op.get_friendly_name(): op for op in model.get_ops()}
        wanted = list({l.name: l for l in layers if l.name in ops}.values())
        model.add_outputs([ops[l.name].output(0) for l in wanted])
        # add_outputs skips ports that are already outputs: find each layer's output index from the Results.
        index = {}
        for i, port in enumerate(model.outputs):
            producer = port.get_node().input_value(0).get_node().get_friendly_name()
            index.setdefault(producer, i)
        wanted = [l for l in wanted if l.name in index]
        compiled = _core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()

        def probe(feed: dict) -> dict[str, np.ndarray]:
            values = request.infer(feed)
            return {layer.name: np.asarray(values[compiled.outputs[index[layer.name]]], dtype=np.float32).copy()
                    for layer in wanted}

        return probe


def _is_activation_fq(op) -> bool:
    return op.get_type_name() == "FakeQuantize" and \
        op.input_value(0).get_node().get_type_name() not in ("Constant", "Convert")


def _int8_weights(op) -> bool:
    """A weighted layer whose weights NNCF stored as int8 (Multiply '.../fq_weights_N' over a Convert)."""
    return op.get_type_name() in WEIGHTED and "/fq_weights" in op.input_value(1).get_node().get_friendly_name()


def _reference_weights(reference: Path | None) -> dict:
    """fp32 weights of each weighted layer of the reference IR, and the bias of the Add that follows it (NNCF's
    bias correction changed the int8 model's biases to offset its weight error), by op name."""
    if reference is None:
        return {}
    model = _core().read_model(str(reference))
    out = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() in WEIGHTED and op.input_value(1).get_node().get_type_name() == "Constant":
            out[op.get_friendly_name()] = op.input_value(1).get_node().get_data().copy()
            for target in op.output(0).get_target_inputs():
                add = target.get_node()
                if add.get_type_name() == "Add" and add.input_value(1).get_node().get_type_name() == "Constant":
                    out[add.get_friendly_name()] = add.input_value(1).get_node().get_data().copy()
    return out


def _bypass(model, names: list[str], weights: dict | None = None):
    """Put the named revert points in float (in place; returns the model): a FakeQuantize's consumers read its
    input; a layer gets its fp32 weights back and reads its input before that input's quantizer."""
    import openvino as ov

    ops = {op.get_friendly_name(): op for op in model.get_ops()}
    for name in names:
        op = ops.get(name)
        if op is None:
            continue
        if op.get_type_name() == "FakeQuantize":
            source = op.input_value(0)
            for target in list(op.output(0).get_target_inputs()):
                target.replace_source_output(source)
            continue
        w = (weights or {}).get(name)
        if w is None or tuple(w.shape) != tuple(op.input_value(1).get_shape()):
            continue
        op.input(1).replace_source_output(ov.op.Constant(w).output(0))
        for target in op.output(0).get_target_inputs():
            add = target.get_node()
            bias = (weights or {}).get(add.get_friendly_name())
            if add.get_type_name() == "Add" and bias is not None and \
                    tuple(bias.shape) == tuple(add.input_value(1).get_shape()):
                add.input(1).replace_source_output(ov.op.Constant(bias).output(0))
        if _is_activation_fq(op.input_value(0).get_node()):
            op.input(0).replace_source_output(op.input_value(0).get_node().input_value(0))
    model.validate_nodes_and_infer_types()
    return model


def _run_all(model, feeds: list[dict]) -> list[dict]:
    compiled = _core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    names = [p.get_any_name() for p in compiled.outputs]
    out = []
    for feed in feeds:
        values = request.infer(feed)
        out.append({n: np.asarray(values[p]).copy() for n, p in zip(names, compiled.outputs)})
    return out


def _progress_to_stderr():
    """NNCF draws its progress bars on stdout (rich's global console); stdout is for --json."""
    return contextlib.redirect_stdout(sys.stderr)


def _is_constant_subgraph(op) -> bool:
    """True for ops computing on constants only (weight decompression chains): not activations."""
    return all(v.get_node().get_type_name() in ("Constant", "Convert") for v in op.input_values())


def _scope(names: list[str]):
    import nncf

    # validate=False: a name may have been fused away in the quantizer's graph; that is not an error here.
    return nncf.IgnoredScope(names=list(names), validate=False) if names else None


def _core():
    from ...agent.runtimes.openvino import core

    return core()
