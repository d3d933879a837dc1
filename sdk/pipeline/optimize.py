"""Stage 2, graph optimization: onnxslim (constant folding, fusion, dead-node removal) and, for
graph level 'all', the runtime's own optimizer (applied by the backend). Reports node counts."""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class GraphReport:
    level: str
    nodes_before: int
    nodes_after: int
    note: str = ""

    def line(self) -> str:
        text = f"graph ({self.level}): {self.nodes_before} -> {self.nodes_after} nodes"
        return text + (f" ({self.note})" if self.note else "")


def simplify(model, level: str = "all"):
    """Return (model, GraphReport). Level 'none' keeps the graph; 'basic' and 'all' run onnxslim."""
    import onnx

    before = len(model.graph.node)
    if level == "none":
        return model, GraphReport(level, before, before, "simplifier off")
    try:
        import onnxslim
    except ImportError:  # the simplifier is part of the sdk extra, but the pipeline can run without it
        return model, GraphReport(level, before, before, "onnxslim not installed: pip install 'edgeopt[sdk]'")
    try:
        slim = onnxslim.slim(model)
    except Exception as exc:  # onnxslim raises many types; an unsimplified graph is still correct
        log.warning("onnxslim failed (%s); continuing with the original graph", exc)
        return model, GraphReport(level, before, before, f"onnxslim failed: {str(exc)[:120]}; graph kept as is")
    try:
        onnx.checker.check_model(slim)
    except onnx.checker.ValidationError as exc:
        log.warning("onnxslim output fails the checker (%s); keeping the original graph", exc)
        return model, GraphReport(level, before, before, "onnxslim output failed the checker; graph kept as is")
    return slim, GraphReport(level, before, len(slim.graph.node))
