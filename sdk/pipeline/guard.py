"""Guards for graph steps: a step that turns a model ONNX Runtime loads into one it refuses is undone.

Shape fixing and simplification infer shapes through the whole graph, including the sub-graphs of ``If``,
``Loop`` and ``Scan``; an inference bug (in the step or in the runtime) can leave a graph that no longer
loads, e.g. "Node (_if_then_branch_LSTM) Op (LSTM) [ShapeInferenceError] First input tensor must have rank 3"
after fixing a voice-activity model's input dims. Each guarded step is checked by loading its result in
ONNX Runtime, with the optimizations it will run with; a refusal undoes the step and the output says so.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

CONTROL_FLOW = ("If", "Loop", "Scan")


def control_flow_ops(model) -> list[str]:
    """Control-flow op types in the main graph (their bodies are sub-graphs)."""
    return sorted({n.op_type for n in model.graph.node if n.op_type in CONTROL_FLOW})


def load_error(model) -> str | None:
    """None when ONNX Runtime accepts ``model`` (a ModelProto), else the first line of its refusal."""
    try:
        import onnxruntime as ort
    except ImportError:  # no runtime to ask: nothing can be checked
        return None
    so = ort.SessionOptions()
    # All optimizations, as the model will run: some refusals only come from them (the voice-activity model's
    # fixed shapes pass graph resolution and fail in the basic level's inference through its If).
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 4  # its refusal comes back in the exception; nothing raw on the terminal
    try:
        ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several pybind exception types
        text = " ".join(str(exc).split())
        log.debug("ONNX Runtime refuses the model: %s", text)
        return text.replace("[ONNXRuntimeError] : 1 : FAIL : ", "")[:300]
    return None
