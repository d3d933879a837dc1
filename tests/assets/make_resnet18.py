"""Build a ResNet-18 (random, seeded weights) as an ONNX file, and real-photo inputs for it.

Topology is torchvision's ``resnet18``: 7x7/2 conv, 3x3/2 max-pool, four stages of two basic
blocks (64-128-256-512 channels, stride 2 at the start of stages 2-4 with a 1x1/2 projection
shortcut), global average pool, fully connected 1000. BatchNormalization is folded into each
conv's weight and bias, as every deployment exporter does.

Weights are He-initialised, then scaled per output channel by a log-normal factor (what a folded
``gamma / sqrt(var)`` looks like in a trained network: channels differ in range, which is what
makes per-channel quantization matter). The last conv of each residual branch gets a smaller
gain so activations stay O(1) through the eight residual additions instead of growing; the
folded bias is a small per-channel shift. The result has realistic int8 quantization error
rather than the near-zero error of an all-equal random net.

Run: ``python tests/assets/make_resnet18.py OUT.onnx`` (``--inputs DIR`` also writes the
calibration / held-out ``.npz`` files). Tests use the ``resnet18_onnx`` / ``resnet18_inputs``
fixtures, which cache the results in ``.cache/assets/``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

# Bump when the builder changes so cached files are regenerated.
VERSION = 1
SEED = 18
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes = []
        self.inits = []
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int, gain: float, relu: bool) -> str:
        from onnx import helper, numpy_helper

        name = self._name("conv")
        fan_in = cin * k * k
        w = self.rng.standard_normal((cout, cin, k, k)).astype(np.float32)
        w *= np.float32(gain * np.sqrt(2.0 / fan_in))
        # Folded BN: per-channel gamma/sqrt(var) spread (log-normal) and a small beta - mean*scale shift.
        w *= self.rng.lognormal(0.0, 0.35, size=(cout, 1, 1, 1)).astype(np.float32)
        b = (0.1 * self.rng.standard_normal(cout)).astype(np.float32)
        self.inits += [numpy_helper.from_array(w, f"{name}.weight"), numpy_helper.from_array(b, f"{name}.bias")]
        pad = k // 2
        out = f"{name}_out"
        self.nodes.append(helper.make_node(
            "Conv", [x, f"{name}.weight", f"{name}.bias"], [out], name=name,
            kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4))
        if relu:
            return self.relu(out)
        return out

    def relu(self, x: str) -> str:
        from onnx import helper

        out = self._name("relu")
        self.nodes.append(helper.make_node("Relu", [x], [out], name=out))
        return out

    def basic_block(self, x: str, cin: int, cout: int, stride: int) -> str:
        from onnx import helper

        y = self.conv(x, cin, cout, 3, stride, gain=1.0, relu=True)
        # Small gain on the branch's last conv keeps the residual sum's variance from compounding.
        y = self.conv(y, cout, cout, 3, 1, gain=0.35, relu=False)
        shortcut = x
        if stride != 1 or cin != cout:
            shortcut = self.conv(x, cin, cout, 1, stride, gain=0.7, relu=False)
        out = self._name("add")
        self.nodes.append(helper.make_node("Add", [y, shortcut], [out], name=out))
        return self.relu(out)


def build_resnet18(seed: int = SEED):
    """Return an ``onnx.ModelProto``: input ``images`` [batch,3,224,224], output ``logits`` [batch,1000]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    b = _Builder(seed)
    x = b.conv("images", 3, 64, 7, 2, gain=1.0, relu=True)
    pool = "maxpool"
    b.nodes.append(helper.make_node("MaxPool", [x], [pool], name=pool,
                                    kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, cin = pool, 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        x = b.basic_block(x, cin, cout, stride)
        x = b.basic_block(x, cout, cout, 1)
        cin = cout
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    b.nodes.append(helper.make_node("Flatten", ["gap"], ["features"], name="flatten", axis=1))
    fc_w = (b.rng.standard_normal((1000, 512)) * np.sqrt(1.0 / 512)).astype(np.float32)
    fc_b = (0.01 * b.rng.standard_normal(1000)).astype(np.float32)
    b.inits += [numpy_helper.from_array(fc_w, "fc.weight"), numpy_helper.from_array(fc_b, "fc.bias")]
    b.nodes.append(helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"],
                                    name="fc", transB=1))
    graph = helper.make_graph(
        b.nodes, "resnet18",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
        initializer=b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="edgeopt-tests", producer_version=str(VERSION))
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def photo_crops(count: int, split: str, seed: int, size: int = 224) -> np.ndarray:
    """Crops of scikit-learn's sample photographs (china.jpg, flower.jpg), NCHW float32, ImageNet-normalized.

    ``split="calib"`` takes crops from the left 55% of each photo and ``split="heldout"`` from the
    right 45%, so the two sets never share pixels. Crops vary in size (resized to ``size`` with
    bilinear filtering) and are randomly mirrored.
    """
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two uint8 HxWx3 RGB arrays, 427x640
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, size, size), dtype=np.float32)
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        cut = int(w * 0.55)
        x0, x1 = (0, cut) if split == "calib" else (cut, w)
        side = int(rng.integers(min(96, x1 - x0), min(h, x1 - x0) + 1))
        left = int(rng.integers(x0, x1 - side + 1))
        top = int(rng.integers(0, h - side + 1))
        img = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
        out[i] = ((arr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    return out


def write_inputs(folder: Path, n_calib: int = 32, n_heldout: int = 16) -> dict:
    """Write ``resnet18_calib.npz`` / ``resnet18_heldout.npz`` (key ``images``) atomically into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n, seed in (("calib", n_calib, 1), ("heldout", n_heldout, 2)):
        path = folder / f"resnet18_v{VERSION}_{split}.npz"
        if not path.exists():
            _atomic_write(path, lambda f, s=split, n=n, seed=seed: np.savez(f, images=photo_crops(n, s, seed)))
        paths[split] = path
    return paths


def write_model(path: Path) -> Path:
    """Build the model and write it to ``path`` atomically (temp file + rename)."""
    model = build_resnet18()
    _atomic_write(path, lambda f: f.write(model.SerializeToString()))
    return path


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--inputs", type=Path, help="also write calibration/held-out npz files here")
    args = parser.parse_args()
    write_model(args.output)
    if args.inputs:
        for split, path in write_inputs(args.inputs).items():
            print(f"{split}: {path}")
    print(f"model: {args.output} ({args.output.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
