"""The same network in PyTorch eager mode, built from an ONNX file's weights (benchmark baseline only).

torch is a dev-only dependency of the benchmarks (``pip install torch==2.13.0``), never of edgeopt. The
module below holds the ONNX initializers as torch tensors and runs the graph's nodes in order with
``torch.nn.functional`` calls: exactly the kernels and per-op dispatch of an ``nn.Module`` written by hand
(Conv2d/ReLU/MaxPool2d/Linear...), without a hand-written class per model. Only the ops of the benchmark's CNNs
are supported; anything else raises.
"""
from __future__ import annotations

from pathlib import Path


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _conv_padding(pads, k):
    half = len(pads) // 2
    if list(pads[:half]) != list(pads[half:]):
        raise NotImplementedError(f"asymmetric conv padding {pads}")
    return tuple(pads[:half]) if pads else (0,) * len(k)


def build_module(path: str | Path):
    """A ``torch.nn.Module`` that computes the ONNX model at ``path`` (Conv/Gemm/Relu/pools/Add/Flatten)."""
    import onnx
    import torch
    import torch.nn.functional as F
    from onnx import numpy_helper

    model = onnx.load(str(path))
    params = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    steps = []
    for node in model.graph.node:
        a = _attrs(node)
        op, ins, out = node.op_type, list(node.input), node.output[0]
        if op == "Conv":
            k = a.get("kernel_shape") or list(params[ins[1]].shape[2:])
            kw = dict(stride=tuple(a.get("strides", [1] * len(k))), padding=_conv_padding(a.get("pads", []), k),
                      dilation=tuple(a.get("dilations", [1] * len(k))), groups=a.get("group", 1))
            steps.append((out, lambda env, i=ins, kw=kw: F.conv2d(env[i[0]], env[i[1]],
                                                                   env[i[2]] if len(i) > 2 else None, **kw)))
        elif op == "Relu":
            steps.append((out, lambda env, i=ins: F.relu(env[i[0]])))
        elif op == "Add":
            steps.append((out, lambda env, i=ins: env[i[0]] + env[i[1]]))
        elif op == "MaxPool":
            k = a["kernel_shape"]
            kw = dict(kernel_size=tuple(k), stride=tuple(a.get("strides", k)),
                      padding=_conv_padding(a.get("pads", []), k), ceil_mode=bool(a.get("ceil_mode", 0)))
            steps.append((out, lambda env, i=ins, kw=kw: F.max_pool2d(env[i[0]], **kw)))
        elif op == "GlobalAveragePool":
            steps.append((out, lambda env, i=ins: F.adaptive_avg_pool2d(env[i[0]], 1)))
        elif op == "Flatten":
            axis = a.get("axis", 1)
            steps.append((out, lambda env, i=ins, ax=axis: torch.flatten(env[i[0]], ax)))
        elif op == "Gemm":
            if a.get("transA", 0) or not a.get("transB", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                raise NotImplementedError("only Gemm(transB=1, alpha=beta=1), i.e. nn.Linear, is supported")
            steps.append((out, lambda env, i=ins: F.linear(env[i[0]], env[i[1]], env[i[2]] if len(i) > 2 else None)))
        else:
            raise NotImplementedError(f"op {op} is not supported by the eager baseline")
    input_name = [i.name for i in model.graph.input if i.name not in params][0]
    output_name = model.graph.output[0].name

    class OnnxEager(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for n, (name, t) in enumerate(params.items()):
                self.register_buffer(f"p{n}", t)
            self._names = list(params)

        def forward(self, x):
            env = {name: getattr(self, f"p{n}") for n, name in enumerate(self._names)}
            env[input_name] = x
            for name, fn in steps:
                env[name] = fn(env)
            return env[output_name]

    return OnnxEager().eval()
