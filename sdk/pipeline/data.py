"""Calibration and held-out inputs: .npz keyed by input name, a folder of images, or random data.

Arrays hold samples along axis 0: for an input of shape [N?, C, H, W], an array of shape [S, C, H, W]
gives S samples (one batch of the model's batch size each). Names, ranks, fixed dims and dtypes are
checked against the model's inputs with messages that name what was expected and what was found.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from .shapes import InputSpec, concrete_shape
from .types import ImagePreprocessing

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff"}
LABELS_KEY = "labels"
# Random calibration/held-out data is for smoke tests; more than this is a mistake, not a smoke test.
MAX_RANDOM_BYTES = 4 * 1024**3


@dataclass
class SampleSet:
    """Model feeds, one dict per sample (each of the model's batch size), and optional labels."""

    samples: list[dict[str, np.ndarray]]
    source: str  # npz | images | random | split
    sha256: str | None = None
    labels: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    names: list[str] | None = None  # image file name per image (image folders)
    transforms: list[tuple[float, float, float]] | None = None  # (scale, pad_x, pad_y) per image

    def __len__(self) -> int:
        return len(self.samples)

    def head(self, n: int) -> "SampleSet":
        labels = self.labels[:n] if self.labels is not None else None
        per = len(next(iter(self.samples[0].values()))) if self.samples and self.samples[0] else 1
        return SampleSet(self.samples[:n], self.source, self.sha256, labels, list(self.notes),
                         self.names[: n * per] if self.names else None,
                         self.transforms[: n * per] if self.transforms else None)


def _kind(dtype: np.dtype) -> str:
    return "float" if dtype.kind == "f" else "int" if dtype.kind in "iu" else "bool" if dtype.kind == "b" else dtype.kind


def load_npz(path: Path, specs: list[InputSpec], role: str, batch: int = 1, limit: int | None = None) -> SampleSet:
    """Read an .npz of inputs keyed by name (plus optional 'labels'); check it against ``specs``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise InputError(f"{role} file {path} not found") from None
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{role} file {path.name} is not a readable .npz ({' '.join(str(exc).split())[:200]})",
                         hint="save it with numpy.savez(path, **{input_name: array})") from None
    labels = arrays.pop(LABELS_KEY, None)
    expected = [s.name for s in specs]
    missing = [n for n in expected if n not in arrays]
    extra = [n for n in arrays if n not in expected]
    if missing or extra:
        raise InputError(f"{role} file {path.name} has arrays {sorted(arrays)}, but the model's inputs are "
                         f"{expected}" + (f" (missing {missing})" if missing else "")
                         + (f" (unexpected {extra})" if extra else ""),
                         hint="key each array by the model input name (plus optional 'labels')")
    counts = set()
    for spec in specs:
        arr = arrays[spec.name]
        if arr.ndim != len(spec.shape):
            raise InputError(f"{role} array {spec.name!r} has shape {list(arr.shape)}, but the input has rank "
                             f"{len(spec.shape)} (shape {_fmt(spec.shape)}); samples go along axis 0")
        for i, (want, got) in enumerate(zip(spec.shape, arr.shape)):
            if i > 0 and isinstance(want, int) and want > 0 and want != got:
                raise InputError(f"{role} array {spec.name!r} has shape {list(arr.shape)}, but the input needs "
                                 f"{_fmt(spec.shape)} (dim {i}: expected {want}, found {got})",
                                 hint="preprocess the samples to the model's input shape (samples along axis 0),"
                                      " or fix a dynamic dim with --input-shape")
        want_dtype = np.dtype(spec.dtype)
        if _kind(arr.dtype) != _kind(want_dtype):
            raise InputError(f"{role} array {spec.name!r} has dtype {arr.dtype}, but the input takes {want_dtype}",
                             hint=f"convert it with array.astype('{want_dtype}') after your preprocessing")
        arrays[spec.name] = arr.astype(want_dtype, copy=False)
        counts.add(arr.shape[0])
    if len(counts) != 1:
        raise InputError(f"{role} arrays in {path.name} hold different sample counts {sorted(counts)}")
    total = counts.pop()
    per = _batch_of(specs, batch)
    n = total // per
    if n == 0:
        raise InputError(f"{role} file {path.name} holds {total} samples, fewer than one batch of {per}")
    if labels is not None and len(labels) != total:
        raise InputError(f"{role} 'labels' has {len(labels)} entries for {total} samples")
    if limit:
        n = min(n, limit)
    samples = [{s.name: arrays[s.name][i * per:(i + 1) * per] for s in specs} for i in range(n)]
    if labels is not None:
        labels = np.asarray(labels)[: n * per]
    return SampleSet(samples, "npz", _sha256(path), labels)


def _batch_of(specs: list[InputSpec], batch: int) -> int:
    first = specs[0].shape[0] if specs and specs[0].shape else None
    return first if isinstance(first, int) and first > 0 else batch


def load_images(folder: Path, specs: list[InputSpec], prep: ImagePreprocessing | None, role: str,
                batch: int = 1, limit: int | None = None) -> SampleSet:
    """Images in ``folder`` (sorted by name) preprocessed into the model's single image input."""
    try:
        from PIL import Image
    except ImportError:
        from ..errors import missing_extra

        raise missing_extra("pillow", "sdk") from None
    if len(specs) != 1 or len(specs[0].shape) != 4:
        raise InputError(f"a folder of images can feed a model with one 4-D image input; this model has inputs "
                         f"{[(s.name, _fmt(s.shape)) for s in specs]}", hint="give an .npz keyed by input name")
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{role} folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    spec = specs[0]
    prep = prep or ImagePreprocessing()
    layout = prep.layout or guess_layout(spec.shape)
    shape = concrete_shape(spec, 1)
    c, h, w = (shape[1], shape[2], shape[3]) if layout == "NCHW" else (shape[3], shape[1], shape[2])
    if prep.size:
        h, w = prep.size
    if h <= 1 or w <= 1:
        raise InputError(f"input {spec.name!r} has dynamic height/width {_fmt(spec.shape)}",
                         hint="give --image-size H,W or --input-shape")
    if len(prep.mean) not in (1, c):
        raise InputError(f"--mean/--std give {len(prep.mean)} values, but input {spec.name!r} has {c} channels")
    per = _batch_of(specs, batch)
    if limit:
        files = files[: limit * per]
    digest = hashlib.sha256()
    images = []
    transforms = []
    for f in files:
        digest.update(_sha256(f).encode())
        try:
            with Image.open(f) as im:
                im = im.convert("L" if c == 1 else "RGB")
                if (prep.resize or "stretch") == "letterbox":
                    im, transform = letterbox(im, w, h, prep.pad_value)
                else:
                    transform = (min(w / im.size[0], h / im.size[1]), 0.0, 0.0)
                    im = im.resize((w, h), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float32)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise InputError(f"{role} image {f.name} cannot be read: {exc}") from None
        transforms.append(transform)
        if c == 1:
            arr = arr[:, :, None]
        elif prep.channel_order == "BGR":
            arr = arr[:, :, ::-1]
        arr = (arr * prep.scale - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
        images.append(arr.transpose(2, 0, 1) if layout == "NCHW" else arr)
    stack = np.stack(images).astype(np.dtype(spec.dtype))
    n = len(stack) // per
    if n == 0:
        raise InputError(f"{role} folder {folder} holds {len(stack)} images, fewer than one batch of {per}")
    samples = [{spec.name: stack[i * per:(i + 1) * per]} for i in range(n)]
    return SampleSet(samples, "images", digest.hexdigest(), names=[f.name for f in files[: n * per]],
                     transforms=transforms[: n * per])


def letterbox(im, w: int, h: int, pad: int):
    """Resize keeping the aspect ratio, centred on a ``pad``-grey canvas (Ultralytics' LetterBox).
    Returns the image and (scale, pad_x, pad_y), which map source pixels into the model's frame."""
    from PIL import Image

    scale = min(w / im.size[0], h / im.size[1])
    nw, nh = max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))
    resized = im.resize((nw, nh), Image.BILINEAR)
    canvas = Image.new(im.mode, (w, h), pad if im.mode == "L" else (pad, pad, pad))
    px, py = (w - nw) // 2, (h - nh) // 2
    canvas.paste(resized, (px, py))
    return canvas, (scale, float(px), float(py))


def guess_layout(shape) -> str:
    """NCHW when dim 1 looks like channels (1 or 3), NHWC when the last dim does."""
    if len(shape) == 4 and shape[-1] in (1, 3, 4) and shape[1] not in (1, 3, 4):
        return "NHWC"
    return "NCHW"


def random_samples(specs: list[InputSpec], n: int, seed: int, batch: int = 1) -> SampleSet:
    """Random inputs (standard normal for floats, small non-negative ints otherwise).

    Refuses (InputError) when the ``n`` samples would take more than :data:`MAX_RANDOM_BYTES`: each
    allocation alone may fit, so without this bound the process would grow until the OOM killer ends it."""
    total = 0
    for s in specs:
        shape = concrete_shape(s, batch)
        # float inputs are drawn as float64 before the cast: count the larger of the two
        total += n * math.prod(shape) * max(np.dtype(s.dtype).itemsize, 8 if np.dtype(s.dtype).kind == "f" else 0)
    if total > MAX_RANDOM_BYTES:
        inputs = ", ".join(f"{s.name} {list(concrete_shape(s, batch))}" for s in specs)
        raise InputError(f"random data for {n} samples of {inputs} would take {total / 1024**3:.1f} GiB, over the "
                         f"{MAX_RANDOM_BYTES / 1024**3:.1f} GiB limit",
                         hint="give smaller input shapes, or real data with --calib / --heldout")
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        feed = {}
        for s in specs:
            shape = concrete_shape(s, batch)
            dt = np.dtype(s.dtype)
            if dt.kind == "f":
                feed[s.name] = rng.standard_normal(shape).astype(dt)
            elif dt.kind == "b":
                feed[s.name] = rng.integers(0, 2, shape).astype(dt)
            else:
                feed[s.name] = rng.integers(0, 10, shape).astype(dt)
        samples.append(feed)
    return SampleSet(samples, "random", None)


def load_any(source: Path, specs: list[InputSpec], prep: ImagePreprocessing | None, role: str, batch: int,
             limit: int | None) -> SampleSet:
    source = Path(source)
    if source.is_dir():
        return load_images(source, specs, prep, role, batch, limit)
    if not source.exists():
        raise InputError(f"{role} data {source} not found", hint="pass an .npz file or a folder of images")
    return load_npz(source, specs, role, batch, limit)


def split_heldout(data: SampleSet, n_heldout: int) -> tuple[SampleSet, SampleSet]:
    """Hold the last samples out of calibration so the accuracy check never sees calibration inputs."""
    k = max(1, min(n_heldout, len(data) // 5))
    if len(data) < 2:
        raise InputError(f"calibration data has {len(data)} sample(s): too few to also hold some out for the "
                         f"accuracy check", hint="give more samples, or a separate --heldout file")
    cut = len(data) - k
    per = len(next(iter(data.samples[0].values())))
    calib_labels = data.labels[: cut * per] if data.labels is not None else None
    held_labels = data.labels[cut * per:] if data.labels is not None else None
    names, tf = data.names, data.transforms
    calib = SampleSet(data.samples[:cut], data.source, data.sha256, calib_labels,
                      names=names[: cut * per] if names else None, transforms=tf[: cut * per] if tf else None)
    held = SampleSet(data.samples[cut:], "split", data.sha256, held_labels,
                     [f"held out the last {k} of {len(data)} calibration samples for the accuracy check"],
                     names=names[cut * per:] if names else None, transforms=tf[cut * per:] if tf else None)
    return calib, held


def _sha256(path: Path) -> str:
    from ..package import sha256_file

    return sha256_file(path)


def _fmt(shape) -> str:
    return "[" + ",".join(str(d) if isinstance(d, int) else "?" for d in shape) + "]"
