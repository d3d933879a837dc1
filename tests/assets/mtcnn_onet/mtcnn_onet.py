"""MTCNN's ONet (the last stage of the MTCNN face detector), with the pretrained weights that ship inside the
facenet-pytorch wheel (MIT licence, https://github.com/timesler/facenet-pytorch; weights ported from the MTCNN
authors' release, Zhang et al. 2016).

The architecture is written out here (the same layers and forward as ``facenet_pytorch.models.mtcnn.ONet``)
because importing facenet_pytorch imports torchvision, which does not load beside the CPU torch build used here.
``build()`` reads ``onet.pt`` from the wheel's contents unpacked under ``EDGEOPT_ONET_WEIGHTS`` or passed with
``--weights``. Input: a 48x48 RGB crop, (pixel - 127.5) / 128, NCHW. Outputs: box offsets [N,4], five landmarks
[N,10], face / not-face probabilities [N,2].
"""
from __future__ import annotations

import torch
from torch import nn


class ONet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.softmax6_1 = nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))


def build() -> ONet:
    return ONet()


def crops(photos, faces: tuple[str, ...], backgrounds: tuple[str, ...], n: int, seed: int, fetch):
    """n 48x48 crops of real photos, as MTCNN's earlier stages hand them to ONet: half around a face (the box
    jittered by up to 20% of its side and scaled 0.8-1.3x, as a PNet/RNet proposal is), half from a photo
    without a face (what ONet must reject). ``photos`` is tests/assets/people_photos; float32 [n,3,48,48]."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    opened = {k: photos._open(k, fetch).convert("RGB") for k in faces + backgrounds}
    out = np.empty((n, 3, 48, 48), np.float32)
    for i in range(n):
        if i % 2 == 0:
            key = faces[(i // 2) % len(faces)]
            x1, y1, x2, y2 = photos.FACES[key]
            side = max(x2 - x1, y2 - y1) * rng.uniform(0.8, 1.3)
            cx = (x1 + x2) / 2 + rng.uniform(-0.2, 0.2) * side
            cy = (y1 + y2) / 2 + rng.uniform(-0.2, 0.2) * side
        else:
            im = opened[backgrounds[(i // 2) % len(backgrounds)]]
            side = rng.uniform(48, min(im.size) / 2)
            cx, cy = rng.uniform(side / 2, im.size[0] - side / 2), rng.uniform(side / 2, im.size[1] - side / 2)
            key = backgrounds[(i // 2) % len(backgrounds)]
        box = (int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2))
        crop = photos._jitter(opened[key].crop(box), rng).resize((48, 48), Image.BILINEAR)
        arr = np.asarray(crop, np.float32)
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
        out[i] = ((arr - 127.5) / 128.0).transpose(2, 0, 1)
    return out
