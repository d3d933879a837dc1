"""ONNX Runtime backend: fp32 / fp16 / int8 static QDQ (per-channel) / int8 weight-only ONNX files.

Old-opset models (opset < 13) are upgraded before per-channel QDQ: ONNX Runtime's quantizer would write
``DequantizeLinear`` with an ``axis`` attribute that opset 11 does not have, and ONNX Runtime then refuses
its own output. ``quant_pre_process`` is retried without symbolic shape inference when that fails
("Incomplete symbolic shape inference"), which real exported detection models trigger.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import UnsupportedError
from ..pipeline.types import Artifact
from .base import Backend, BuildJob, Layer

log = logging.getLogger(__name__)

RUNTIME = "onnxruntime"
QUANTIZABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # ops with weights (weight-only int8)
# Ops whose inputs or outputs the QDQ quantizer may quantize with their own scales: the candidates for
# keeping in float. Pure data movement (Reshape, Transpose, MaxPool, ...) shares its input's scale.
SENSITIVE_OPS = QUANTIZABLE + ("Add", "Mul", "Sub", "Concat", "Resize", "AveragePool", "GlobalAveragePool",
                               "Sigmoid", "HardSigmoid", "HardSwish", "Softmax", "LeakyRelu", "Div",
                               "InstanceNormalization", "LayerNormalization", "ReduceMean", "Pow")
MIN_QDQ_OPSET = 13  # per-axis DequantizeLinear


class OnnxRuntimeBackend(Backend):
    name: ClassVar[str] = RUNTIME
    extra: ClassVar[str] = "sdk"
    accepts: ClassVar[tuple[str, ...]] = ("onnx",)
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8", "int8-weight-only")

    @classmethod
    def check_importable(cls) -> None:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

    # ------------------------------------------------------------------ checks

    def check_ops(self, source: Path, source_format: str, display: str | None = None) -> None:
        import onnx
        import onnxruntime as ort

        if source_format != "onnx":
            raise UnsupportedError(f"ONNX Runtime needs an ONNX model; {display or source.name} is {source_format}")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 4
        try:
            ort.InferenceSession(str(source), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # pybind errors: Fail, InvalidGraph, NotImplemented
            text = " ".join(str(exc).split())
            model = onnx.load(str(source), load_external_data=False)
            ops = sorted({f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph.node
                          if n.op_type in text})
            what = f"op {', '.join(ops)}" if ops else "the model"
            raise UnsupportedError(f"ONNX Runtime {ort.__version__} cannot run {what} in {display or source.name}: "
                                   f"{text[:200]}",
                                   hint="choose a profile with another runtime, or replace the op") from None

    def run_device(self, runtime_options: Any) -> tuple[str, str, bool]:
        from ...agent.runtimes import get_runtime

        wanted = runtime_options.providers[0]
        available = get_runtime(RUNTIME).devices()
        if wanted in available:
            return wanted, wanted, False
        return wanted, "CPUExecutionProvider", True

    # ------------------------------------------------------------------ builds

    def build(self, job: BuildJob) -> Artifact:
        import onnx

        out = job.workdir / "model.onnx"
        notes: list[str] = []
        if job.precision == "fp32":
            self._optimize_offline(job.source, out, job.graph_level, notes)
        elif job.precision == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            # Optimize the fp32 graph first, then convert. Optimizing the fp16 graph offline would run on the
            # CPU provider, which has no fp16 Conv/Gemm kernels: ONNX Runtime then bakes fp16->fp32 Casts
            # around every weight into the saved file, and the GPU computes in fp32 (measured on an H200:
            # 1.00x vs fp32 with the casts, see BENCHMARKS.md).
            tmp = job.workdir / "fp32-opt.onnx"
            self._optimize_offline(job.source, tmp, job.graph_level, notes)
            model = onnx.load(str(tmp))
            # keep_io_types: the package takes and returns float32 like the original, so callers don't change;
            # With the profile's fp16_inputs, the inputs are float16 too (no Cast at the input edge, half the bytes
            # copied to the device); outputs stay float32, so they keep what the last layer computed (box
            # coordinates of a few hundred pixels would lose a fraction of a pixel to fp16 at the edge).
            if getattr(job.runtime_options, "fp16_inputs", False):
                keep: bool | list[str] = [o.name for o in model.graph.output]
                notes.append("inputs in float16 (profile fp16_inputs): no Cast at the model's input edge")
            else:
                keep = True
            fp16 = convert_float_to_float16(model, keep_io_types=keep, disable_shape_infer=False)
            onnx.save(fp16, str(out))
        elif job.precision == "int8":
            pre = self.layer_reference(job)
            self._quantize_static(pre, out, job, notes)
        elif job.precision == "int8-weight-only":
            model = upgrade_opset(onnx.load(str(job.source)), MIN_QDQ_OPSET, notes)
            n = quantize_weights_only(model, exclude=set(job.float_layers))
            notes.append(f"{n} weight tensors stored as int8 (per-channel, symmetric); activations stay float")
            onnx.save(model, str(out))
        else:
            raise UnsupportedError(f"ONNX Runtime backend has no precision {job.precision!r}")
        return Artifact(model_file=out, files={"model.onnx": out}, runtime=RUNTIME, precision=job.precision,
                        float_layers=list(job.float_layers), notes=notes)

    def _optimize_offline(self, src: Path, out: Path, level: str, notes: list[str]) -> None:
        """Graph level 'all': ONNX Runtime's own basic (portable) optimizations saved into the file."""
        if level != "all":
            shutil.copyfile(src, out)
            return
        import onnxruntime as ort

        so = ort.SessionOptions()
        # Only the basic level is saved: extended/all levels write hardware-specific fused ops.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(out)
        so.log_severity_level = 4
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        notes.append("ONNX Runtime basic graph optimizations applied offline")

    def layer_reference(self, job: BuildJob) -> Path:
        """opset upgrade + quant_pre_process, cached in the job's workdir: the fp32 graph QDQ works on."""
        import onnx

        pre = job.workdir.parent / f"ort-pre-{job.graph_level}.onnx"
        if pre.exists():
            return pre
        notes: list[str] = []
        upgraded = job.workdir.parent / "ort-upgraded.onnx"
        onnx.save(upgrade_opset(onnx.load(str(job.source)), MIN_QDQ_OPSET, notes), str(upgraded))
        preprocess(upgraded, pre, skip_optimization=job.graph_level == "none")
        model = onnx.load(str(pre))
        unnamed = [n for n in model.graph.node if not n.name]
        if unnamed:  # nodes_to_exclude addresses nodes by name
            for i, n in enumerate(unnamed):
                n.name = f"{n.op_type}_edgeopt_{i}"
            onnx.save(model, str(pre))
        return pre

    def _quantize_static(self, pre: Path, out: Path, job: BuildJob, notes: list[str]) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        if not job.calibration:
            raise UnsupportedError("int8 static quantization needs calibration data")
        reader = _Reader(job.calibration)
        from ..cpu import reduce_range_for

        target = job.profile.target
        reduce, why = reduce_range_for(job.profile.precision.reduce_range, tuple(target.arch),
                                       tuple(target.cpu_flags))
        quantize_static(
            str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=job.profile.precision.per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=list(job.float_layers) or None, op_types_to_quantize=None, reduce_range=reduce,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        notes.append(f"QDQ int8 ({'per-channel' if job.profile.precision.per_channel else 'per-tensor'}), "
                     f"{len(job.calibration)} calibration samples")
        notes.append(("weights in 7 bits (reduce_range): " if reduce else "weights in full 8 bits: ") + why)
        quantized, sub_graphs = _count_quantizers(out)
        if quantized == 0:
            # Said, not hidden: the quantizer does not enter If/Loop/Scan bodies, so a model whose work sits in
            # them (Silero VAD) is an "int8" package that computes in float.
            notes.append("no tensor was quantized" + (f" (ONNX Runtime's quantizer leaves the {sub_graphs} "
                                                        f"control-flow sub-graph(s) in float)" if sub_graphs else "")
                         + ": this int8 package computes in float")

    # ------------------------------------------------------------------ float fallback without re-quantizing

    def revert_points(self, model_file: Path, layers: bool = False) -> list[str]:
        """The activation QuantizeLinear nodes of a QDQ model (weights are initializers, never bypassed)."""
        import onnx

        model = onnx.load(str(model_file), load_external_data=False)
        consts = {t.name for t in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                              for o in n.output}
        return [n.name for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in consts]

    def revert_consumers(self, model_file: Path) -> dict[str, list[str]]:
        """Each activation QuantizeLinear -> the weighted nodes reading its DequantizeLinear output: the nodes
        to keep in float, weights too, when re-quantizing with that activation in float."""
        import onnx

        model = onnx.load(str(model_file), load_external_data=False)
        readers: dict[str, list] = {}
        for n in model.graph.node:
            for i in n.input:
                readers.setdefault(i, []).append(n)
        out = {}
        for q in model.graph.node:
            if q.op_type != "QuantizeLinear":
                continue
            dqs = [d for d in readers.get(q.output[0], []) if d.op_type == "DequantizeLinear"]
            out[q.name] = [n.name for d in dqs for n in readers.get(d.output[0], []) if n.op_type in QUANTIZABLE]
        return out

    def revert_layers(self, model_file: Path) -> dict[str, str]:
        """Each activation QuantizeLinear -> the node whose output it quantizes (its layer)."""
        import onnx

        model = onnx.load(str(model_file), load_external_data=False)
        producers = {o: n.name for n in model.graph.node for o in n.output}
        return {n.name: producers.get(n.input[0], n.input[0]) for n in model.graph.node if n.op_type == "QuantizeLinear"}

    def score_reverts(self, model_file: Path, feeds: list[dict], score, groups: list[list[str]],
                      reference: Path | None = None) -> list[float]:
        """``score(outputs)`` on ``feeds`` with each group of activation Q/DQ pairs bypassed (weights stay
        int8); one score per group. The same search as OpenVINO's, so both runtimes rank by the task metric."""
        import onnx

        model = onnx.load(str(model_file))
        return [float(score(_run_all(_bypass_qdq(_copy(model), group), feeds))) for group in groups]

    def build_reverted(self, model_file: Path, names: list[str], workdir: Path, precision: str,
                       reference: Path | None = None) -> Artifact:
        """The QDQ model with the named activation Q/DQ pairs bypassed (those activations stay float)."""
        import onnx

        model = onnx.load(str(model_file))
        producers = {o: n.name for n in model.graph.node for o in n.output}
        inputs = {n.name: n.input[0] for n in model.graph.node if n.name in set(names)}
        model = _bypass_qdq(model, names)
        out = workdir / "model.onnx"
        onnx.save(model, str(out))
        layers = sorted({producers.get(t, t) for t in inputs.values()})
        return Artifact(model_file=out, files={"model.onnx": out}, runtime=RUNTIME, precision=precision,
                        float_layers=layers,
                        notes=[f"{len(names)} activation Q/DQ pair(s) bypassed: those activations stay float"])

    # ------------------------------------------------------------------ sensitivity

    def layers(self, reference: Path) -> list[Layer]:
        import onnx

        model = onnx.load(str(reference), load_external_data=False)
        producer = {o: n for n in model.graph.node for o in n.output}
        # Every node: the QDQ quantizer also wraps Relu, pooling, Resize, ... in Q/DQ pairs, so only the full
        # list guarantees that "all layers in float" is the fp32 model. Data movement ranks last (it adds
        # no error of its own).
        picked = [n for n in model.graph.node if n.name and n.op_type not in ("Constant", "Shape")]
        names = {n.name for n in picked}
        out = []
        for node in picked:
            ups, seen, stack = [], set(), list(node.input)
            while stack:
                t = stack.pop()
                p = producer.get(t)
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                if p.name in names:
                    ups.append(p.name)
                else:
                    stack.extend(p.input)
            out.append(Layer(node.name, node.output[0], ups))
        return out

    def layer_probe(self, model_file: Path, layers: list[Layer]):
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(model_file))
        present = {o for n in model.graph.node for o in n.output}
        have = {o.name for o in model.graph.output}
        wanted = [l for l in layers if l.output in present]
        for layer in wanted:
            if layer.output not in have:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(layer.output))
        so = ort.SessionOptions()
        so.log_severity_level = 4
        # Basic level keeps every requested tensor materialized, in float, as the quantized graph computes it.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        names = [l.output for l in wanted]

        def probe(feed: dict) -> dict[str, np.ndarray]:
            values = sess.run(names, feed)
            return {layer.name: np.asarray(v, dtype=np.float32) for layer, v in zip(wanted, values)}

        return probe


def _copy(model):
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _bypass_qdq(model, names: list[str]):
    """Replace each named QuantizeLinear's DequantizeLinear consumers by a float Clip of its input to the
    quantizer's range (output names stay, so consumers and graph outputs are untouched).

    The Clip matters: ONNX Runtime's quantizer drops a Relu (or Clip) in front of a uint8 quantizer, whose
    zero point clamps negatives instead; bypassing the pair without the clamp would remove the Relu too.
    """
    from onnx import helper, numpy_helper

    wanted = set(names)
    inits = {t.name: t for t in model.graph.initializer}
    q_nodes = {n.name: n for n in model.graph.node if n.name in wanted and n.op_type == "QuantizeLinear"}
    q_out = {n.output[0]: n for n in q_nodes.values()}
    nodes, consts = [], []
    for node in model.graph.node:
        if node.name in q_nodes:
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in q_out:
            q = q_out[node.input[0]]
            bounds = _q_range(q, inits)
            if bounds is None:
                nodes.append(helper.make_node("Identity", [q.input[0]], [node.output[0]], name=node.name + "_float"))
            else:
                lo, hi = node.name + "_float_min", node.name + "_float_max"
                consts += [numpy_helper.from_array(np.asarray(bounds[0], np.float32), lo),
                           numpy_helper.from_array(np.asarray(bounds[1], np.float32), hi)]
                nodes.append(helper.make_node("Clip", [q.input[0], lo, hi], [node.output[0]], name=node.name + "_float"))
            continue
        nodes.append(node)
    # A Q output read by something other than its DequantizeLinear keeps its Q node.
    used = {i for n in nodes for i in n.input}
    keep_q = [q for out, q in q_out.items() if out in used]
    del model.graph.node[:]
    model.graph.node.extend(keep_q + nodes if keep_q else nodes)
    model.graph.initializer.extend(consts)
    if keep_q:
        _toposort(model)
    return model


def _q_range(q, inits) -> tuple[float, float] | None:
    """The float range a per-tensor QuantizeLinear represents: ((qmin - zp) * scale, (qmax - zp) * scale)."""
    from onnx import numpy_helper

    if len(q.input) < 3 or q.input[1] not in inits or q.input[2] not in inits:
        return None
    scale = numpy_helper.to_array(inits[q.input[1]]).astype(np.float64)
    zero = numpy_helper.to_array(inits[q.input[2]])
    if scale.size != 1 or zero.size != 1 or zero.dtype.kind not in "iu":
        return None
    info = np.iinfo(zero.dtype)
    zp = float(zero.reshape(()))
    return (info.min - zp) * float(scale.reshape(())), (info.max - zp) * float(scale.reshape(()))


def _toposort(model) -> None:
    produced = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        ready = [n for n in pending if all(i in produced for i in n.input)]
        if not ready:  # a cycle or a dangling input: leave the rest as it was
            ordered.extend(pending)
            break
        for n in ready:
            ordered.append(n)
            produced.update(n.output)
        pending = [n for n in pending if n not in ready]
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def _run_all(model, feeds: list[dict]) -> list[dict]:
    """Outputs of an in-memory model on each feed, as the agent runs it (all graph optimizations)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(names, feed))) for feed in feeds]


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def _count_quantizers(path: Path) -> tuple[int, int]:
    """QuantizeLinear nodes in the model (sub-graphs included) and the number of control-flow sub-graphs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    count, graphs = 0, 0
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        for node in graph.node:
            count += node.op_type == "QuantizeLinear"
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                    graphs += 1
                stack.extend(attr.graphs)
                graphs += len(attr.graphs)
    return count, graphs


def upgrade_opset(model, minimum: int, notes: list[str]):
    """Convert the default-domain opset up to ``minimum`` (no-op when already there)."""
    import onnx
    from onnx import version_converter

    from ..pipeline.load import opset_of

    current = opset_of(model)
    if current >= minimum:
        return model
    try:
        converted = version_converter.convert_version(model, minimum)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises RuntimeError/ValidationError/IndexError
        raise UnsupportedError(f"the model's opset {current} must be upgraded to {minimum} for per-channel int8, "
                               f"and the ONNX version converter failed: {' '.join(str(exc).split())[:200]}",
                               hint="re-export the model with opset 13 or newer") from None
    notes.append(f"opset upgraded {current} -> {minimum} for per-channel QDQ")
    log.info("opset upgraded %d -> %d", current, minimum)
    return converted


def preprocess(src: Path, out: Path, skip_optimization: bool = False) -> str:
    """ONNX Runtime's quant_pre_process; without symbolic shape inference when that fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(out), skip_optimization=skip_optimization)
        return "full"
    except Exception as exc:  # "Incomplete symbolic shape inference" and friends
        log.info("quant_pre_process with symbolic shape inference failed (%s); retrying without it", exc)
    try:
        quant_pre_process(str(src), str(out), skip_optimization=skip_optimization, skip_symbolic_shape=True)
        return "no-symbolic"
    except Exception as exc:
        log.info("quant_pre_process failed again (%s); quantizing the model as is", exc)
        shutil.copyfile(src, out)
        return "none"


def quantize_weights_only(model, exclude: set[str] = frozenset()) -> int:
    """Store Conv/Gemm/MatMul float weights as int8 + DequantizeLinear (per output channel, symmetric).

    ONNX Runtime folds the DequantizeLinear at load time, so this shrinks the file (about 4x for the weights)
    without changing the compute precision.
    """
    from onnx import helper, numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    replaced: dict[str, list] = {}  # weight name -> its int8, scale and zero-point initializers
    dq_nodes = []
    for node in model.graph.node:
        if node.op_type not in QUANTIZABLE or node.name in exclude or len(node.input) < 2:
            continue
        wname = node.input[1]
        w = inits.get(wname)
        if w is None or uses.get(wname, 0) != 1 or w.dtype != np.float32 or w.ndim < 2 or wname in replaced:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            axis = 0
        elif node.op_type == "ConvTranspose":
            axis = 1
        elif node.op_type == "Gemm":
            axis = 0 if attrs.get("transB", 0) else 1
        else:  # MatMul: weight [K, N], one scale per output column
            axis = w.ndim - 1
        red = tuple(i for i in range(w.ndim) if i != axis)
        scale = (np.maximum(np.abs(w).max(axis=red), 1e-12) / 127.0).astype(np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        qname, sname, zname = wname + "_int8", wname + "_scale", wname + "_zero"
        replaced[wname] = [numpy_helper.from_array(q, qname), numpy_helper.from_array(scale, sname),
                           numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), zname)]
        dq_nodes.append(helper.make_node("DequantizeLinear", [qname, sname, zname], [wname],
                                         name=wname + "_DequantizeLinear", axis=axis))
    # Rebuild the repeated fields once: protobuf element references go stale while a field is edited.
    kept = [t for t in model.graph.initializer if t.name not in replaced]
    new_inits = kept + [t for group in replaced.values() for t in group]
    del model.graph.initializer[:]
    model.graph.initializer.extend(new_inits)
    nodes = dq_nodes + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    done = len(replaced)
    return done
