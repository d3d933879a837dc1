"""Train the digits CNN test asset and export it to ONNX.

Data: scikit-learn's ``load_digits`` (1797 8x8 grey images, pixel values 0..16), shipped
with scikit-learn, so nothing is downloaded. Preprocessing: ``pixel / 16.0`` as float32,
layout NCHW ``[batch, 1, 8, 8]``.

Split (stratified, fixed seed): 75% train (1347 samples), 25% held-out test (450 samples) that
is never used for training or calibration. Calibration: 300 samples drawn (seeded) from the
train split.

Outputs written next to this file:
  digits_cnn.onnx      input ``images`` [batch,1,8,8] float32, output ``logits`` [batch,10]
  digits_calib.npz     key ``images``: 300 samples from the train split
  digits_heldout.npz   keys ``images`` float32 and ``labels`` int64 (held-out split)

Run (torch is a dev-only dependency):  .venv/bin/python tests/assets/digits/train_digits.py
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
SEED = 20260
N_CALIB = 300


def load_splits():
    """Return (x_train, y_train, x_test, y_test) as float32 NCHW / int64."""
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.25, stratify=y, random_state=SEED)


def build_model(torch):
    nn = torch.nn
    # Three padded conv stages (16/32/64 channels) so int8 quantization has real work to do.
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),                                   # 8x8 -> 4x4
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2),                                   # 4x4 -> 2x2
        nn.Flatten(),
        nn.Linear(64 * 2 * 2, 128), nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(128, 10),
    )


def main() -> None:
    import torch

    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)
    x_tr, x_te, y_tr, y_te = load_splits()

    model = build_model(torch)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(40):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            # Small random shifts (+-1 px) as augmentation, so the net is not brittle.
            xb = xt[idx]
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()

    model.eval()
    with torch.no_grad():
        acc = (model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean()
    print(f"torch fp32 held-out accuracy: {acc:.4f} on {len(y_te)} samples")

    onnx_path = HERE / "digits_cnn.onnx"
    torch.onnx.export(
        model, (torch.from_numpy(x_te[:1]),), str(onnx_path),
        input_names=["images"], output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17, dynamo=False,
    )
    rng = np.random.default_rng(SEED)
    calib_idx = np.sort(rng.choice(len(x_tr), size=N_CALIB, replace=False))
    np.savez_compressed(HERE / "digits_calib.npz", images=x_tr[calib_idx])
    np.savez_compressed(HERE / "digits_heldout.npz", images=x_te, labels=y_te)

    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_acc = float((sess.run(None, {"images": x_te})[0].argmax(1) == y_te).mean())
    print(f"onnxruntime fp32 held-out accuracy: {ort_acc:.4f}")
    (HERE / "digits_metrics.json").write_text(json.dumps(
        {"fp32_heldout_accuracy": round(ort_acc, 4), "heldout_samples": int(len(y_te)),
         "calib_samples": N_CALIB, "onnx_bytes": onnx_path.stat().st_size}, indent=2) + "\n")


if __name__ == "__main__":
    main()
