"""A small ResNet trained here on scikit-learn's digits, upscaled to 24x24: the pruning tests' model.

Data: ``load_digits`` (ships with scikit-learn), the digits asset's stratified split (seed 20260, 75/25),
each 8x8 image upscaled 3x bilinearly to 24x24, ``pixel / 16``, NCHW ``[N, 1, 24, 24]``. Net: a 3x3 stem,
then three residual stages (32 @24x24, 64 @12x12, 128 @6x6; BasicBlocks with a 1x1 projection shortcut
where the shape changes), global average pool, linear 10. The residual adds tie channels across layers,
which is what a dependency-graph pruner must handle.

``build()`` is the ``module:factory`` the CLI takes (``tests/assets/digits_resnet/digits_resnet.py:build``);
``train(path)`` writes the trained ``state_dict`` (about 1-2 min on 2 busy CPU cores, once: cached); ``inputs(folder)`` writes
``calib.npz`` (the training split, no labels) and ``heldout.npz`` (``images`` + ``labels``, never trained on).
torch is needed (the test set-up installs it); nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SEED = 20260
SIZE = 24
INPUT = "images"
EPOCHS = 4


def splits():
    """(x_train, x_test, y_train, y_test): float32 NCHW [N,1,24,24] / int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=SEED)
    return _upscale(x_tr), _upscale(x_te), y_tr, y_te


def _upscale(x: np.ndarray) -> np.ndarray:
    import torch

    t = torch.nn.functional.interpolate(torch.from_numpy(x), size=(SIZE, SIZE), mode="bilinear",
                                        align_corners=False)
    return t.numpy().astype(np.float32)


def build(width: int = 32):
    """The untrained network (the CLI's factory; load the trained weights with --weights)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + self.shortcut(x))

    class DigitsResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
            self.layer1 = Block(width, width, 1)
            self.layer2 = Block(width, 2 * width, 2)
            self.layer3 = Block(2 * width, 4 * width, 2)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4 * width, 10)

        def forward(self, x):
            x = self.layer3(self.layer2(self.layer1(self.stem(x))))
            return self.fc(torch.flatten(self.pool(x), 1))

    return DigitsResNet()


def train(path: Path) -> dict:
    """Train with labels (the only labelled training in the pruning tests) and save the state_dict."""
    import torch

    torch.manual_seed(SEED)
    x_tr, x_te, y_tr, y_te = splits()
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    steps = EPOCHS * ((len(xt) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()  # +-2 px shifts: not brittle
            xb = torch.roll(xt[idx], shifts=(dy, dx), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return {"fp32_heldout_accuracy": acc, "epochs": EPOCHS}


def inputs(folder: Path) -> dict:
    """calib.npz (training split, no labels) and heldout.npz (test split with labels) under ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    x_tr, x_te, _, y_te = splits()
    out = {"calib": folder / "calib.npz", "heldout": folder / "heldout.npz"}
    for key, arrays in (("calib", {INPUT: x_tr}), ("heldout", {INPUT: x_te, "labels": y_te})):
        tmp = folder / f".{key}.tmp.npz"
        np.savez(tmp, **arrays)
        tmp.replace(out[key])
    return out


if __name__ == "__main__":
    import sys
    import time

    start = time.perf_counter()
    print(train(Path(sys.argv[1] if len(sys.argv) > 1 else "digits_resnet.pt")),
          f"{time.perf_counter() - start:.1f} s")
