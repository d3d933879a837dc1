"""The project's ResNet-18 (tests/assets/make_resnet18.py) as a PyTorch module, for the gpu profile's torch-aoti
runtime and the torch.compile baseline (benchmarks/gpu_aoti.py): the same graph (convolutions with their folded
batch-norm bias, ReLU, max-pool, eight basic blocks, global average pool, fully connected 1000) and, through
``weights``, the same weights as the ONNX file, so every path of the benchmark runs one model.

    python benchmarks/resnet18_torch.py weights resnet18.onnx resnet18.pt     # ONNX initializers -> state_dict
    edgeopt package benchmarks/resnet18_torch.py:build --weights resnet18.pt --input-shape images:1,3,224,224 ...
"""
from __future__ import annotations

import sys


def build():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.a = nn.Conv2d(cin, cout, 3, stride, 1)
            self.b = nn.Conv2d(cout, cout, 3, 1, 1)
            self.proj = nn.Conv2d(cin, cout, 1, stride, 0) if stride != 1 or cin != cout else None

        def forward(self, x):
            y = self.b(torch.relu(self.a(x)))
            return torch.relu(y + (self.proj(x) if self.proj is not None else x))

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 64, 7, 2, 3)
            blocks, cin = [], 64
            for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                blocks += [Block(cin, cout, stride), Block(cout, cout, 1)]
                cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(512, 1000)

        def forward(self, images):
            x = nn.functional.max_pool2d(torch.relu(self.stem(images)), 3, 2, 1)
            x = self.blocks(x)
            return self.fc(x.mean((2, 3)))

    return ResNet18().eval()


def convs_in_onnx_order(model) -> list:
    """The module's convolutions in the order make_resnet18 creates them (stem; per block a, b, projection)."""
    out = [model.stem]
    for block in model.blocks:
        out += [block.a, block.b] + ([block.proj] if block.proj is not None else [])
    return out


def weights_from_onnx(onnx_path: str, out_path: str) -> None:
    import onnx
    import torch
    from onnx import numpy_helper

    graph = onnx.load(onnx_path).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    model = build()
    conv_nodes = [n for n in graph.node if n.op_type == "Conv"]
    convs = convs_in_onnx_order(model)
    assert len(conv_nodes) == len(convs), (len(conv_nodes), len(convs))
    with torch.no_grad():
        for node, conv in zip(conv_nodes, convs):
            conv.weight.copy_(torch.from_numpy(inits[node.input[1]]))
            conv.bias.copy_(torch.from_numpy(inits[node.input[2]]))
        model.fc.weight.copy_(torch.from_numpy(inits["fc.weight"]))
        model.fc.bias.copy_(torch.from_numpy(inits["fc.bias"]))
    torch.save(model.state_dict(), out_path)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "weights":
        sys.exit("usage: resnet18_torch.py weights RESNET18.onnx OUT.pt")
    weights_from_onnx(sys.argv[2], sys.argv[3])
