"""Calibration and held-out inputs: .npz keyed by input name, a folder of images, or random data.

Three .npz layouts (:mod:`.keyed` for the last two):

* stacked, ``<input>``: arrays hold samples along axis 0: for an input of shape [N?, C, H, W], an array of
  shape [S, C, H, W] gives S samples (one batch of the model's batch size each);
* per sample, ``<i>/<input>``: one feed per sample, any rank, batch axis, scalar or integer input;
* sequences, ``<seq>/<step>/<input>``: stateful models, each step fed the state the step before returned.

Names, ranks, fixed dims and dtypes are checked against the model's inputs with messages that name what was
expected and what was found.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import keyed
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
    # Sequences (stateful models): index in ``samples`` where each sequence starts; None: independent samples.
    starts: list[int] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def sequences(self) -> int:
        return len(self.starts) if self.starts is not None else len(self.samples)

    def sequence_slice(self, first: int, last: int | None = None) -> "SampleSet":
        """Sequences ``first``..``last`` (exclusive) as their own set."""
        assert self.starts is not None
        ends = self.starts[1:] + [len(self.samples)]
        last = len(self.starts) if last is None else min(last, len(self.starts))
        lo = self.starts[first] if first < len(self.starts) else len(self.samples)
        hi = ends[last - 1] if last > 0 else lo
        return SampleSet(self.samples[lo:hi], self.source, self.sha256, None, list(self.notes),
                         starts=[s - lo for s in self.starts[first:last]])

    def head(self, n: int) -> "SampleSet":
        if self.starts is not None:
            return self.sequence_slice(0, n)
        labels = self.labels[:n] if self.labels is not None else None
        per = _rows(self.samples[0]) if self.samples and self.samples[0] else 1
        return SampleSet(self.samples[:n], self.source, self.sha256, labels, list(self.notes),
                         self.names[: n * per] if self.names else None,
                         self.transforms[: n * per] if self.transforms else None)


def _kind(dtype: np.dtype) -> str:
    return "float" if dtype.kind == "f" else "int" if dtype.kind in "iu" else "bool" if dtype.kind == "b" else dtype.kind


def load_npz(path: Path, specs: list[InputSpec], role: str, batch: int = 1, limit: int | None = None,
             state_inputs: dict[str, int | None] | None = None) -> SampleSet:
    """Read an .npz (stacked, per sample or per sequence step, plus optional 'labels'); check it against
    ``specs``. ``state_inputs`` (state input -> batch axis) is needed for sequences."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = [k for k in data.files if k != LABELS_KEY]
            layout = keyed.layout_of(keys, path.name, role)
            if layout != "stacked":
                labels = np.asarray(data[LABELS_KEY]) if LABELS_KEY in data.files else None
                if layout == "per-sample":
                    samples = keyed.load_per_sample(data, keys, specs, role, limit)
                    starts = None
                else:
                    if labels is not None:
                        raise InputError(f"{role} file {path.name}: 'labels' are not taken with sequences",
                                         hint="drop 'labels'; sequences are judged against the fp32 model")
                    samples, starts = keyed.load_sequences(data, keys, specs, role, limit, state_inputs or {})
                if not samples:
                    raise InputError(f"{role} file {path.name} holds no samples")
                if labels is not None:
                    rows = sum(_rows(f) for f in samples)
                    if len(labels) < rows:
                        raise InputError(f"{role} 'labels' has {len(labels)} entries for {rows} samples")
                    labels = labels[:rows]
                return SampleSet(samples, "npz", _sha256(path), labels, starts=starts)
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
        raise InputError(f"{role} file {path.name} has arrays {keyed.few(list(arrays))}, but the model's inputs "
                         f"are {expected}" + (f" (missing {missing})" if missing else "")
                         + (f" (unexpected {keyed.few(extra)})" if extra else ""),
                         hint="key each array by the model input name (plus optional 'labels')")
    counts = set()
    for spec in specs:
        arr = arrays[spec.name]
        if arr.ndim != len(spec.shape):
            raise InputError(f"{role} array {spec.name!r} has shape {list(arr.shape)}, but the input has rank "
                             f"{len(spec.shape)} (shape {_fmt(spec.shape)}); samples go along axis 0",
                             hint="for inputs whose batch is not on axis 0 (or scalars), key one feed per "
                                  "sample as '<i>/<input>' (or '<seq>/<step>/<input>' for sequences)")
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


def _rows(feed: dict[str, np.ndarray]) -> int:
    first = next((a for a in feed.values() if a.ndim >= 1), None)
    return int(first.shape[0]) if first is not None else 1


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


def random_samples(specs: list[InputSpec], n: int, seed: int, batch: int = 1, default: int = 1,
                   state_inputs: dict[str, int | None] | None = None) -> SampleSet:
    """Random inputs (standard normal for floats, small non-negative ints otherwise); dynamic dims other than
    the batch are set to ``default``. State inputs (``state_inputs``: name -> batch axis) start at zeros,
    their batch axis sized ``batch``, as a stream starts.

    Refuses (InputError) when the ``n`` samples would take more than :data:`MAX_RANDOM_BYTES`: each
    allocation alone may fit, so without this bound the process would grow until the OOM killer ends it."""
    state_inputs = state_inputs or {}

    def shape_of(s: InputSpec) -> tuple[int, ...]:
        if s.name in state_inputs:
            axis = state_inputs[s.name]
            return tuple(d if isinstance(d, int) and d > 0 else (batch if i == axis else default)
                         for i, d in enumerate(s.shape))
        return concrete_shape(s, batch, default)

    total = 0
    for s in specs:
        shape = shape_of(s)
        # float inputs are drawn as float64 before the cast: count the larger of the two
        total += n * math.prod(shape) * max(np.dtype(s.dtype).itemsize, 8 if np.dtype(s.dtype).kind == "f" else 0)
    if total > MAX_RANDOM_BYTES:
        inputs = ", ".join(f"{s.name} {list(shape_of(s))}" for s in specs)
        raise InputError(f"random data for {n} samples of {inputs} would take {total / 1024**3:.1f} GiB, over the "
                         f"{MAX_RANDOM_BYTES / 1024**3:.1f} GiB limit",
                         hint="give smaller input shapes, or real data with --calib / --heldout")
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        feed = {}
        for s in specs:
            shape = shape_of(s)
            dt = np.dtype(s.dtype)
            if s.name in state_inputs:
                feed[s.name] = np.zeros(shape, dt)
            elif dt.kind == "f":
                feed[s.name] = rng.standard_normal(shape).astype(dt)
            elif dt.kind == "b":
                feed[s.name] = rng.integers(0, 2, shape).astype(dt)
            else:
                feed[s.name] = rng.integers(0, 10, shape).astype(dt)
        samples.append(feed)
    return SampleSet(samples, "random", None)


# Sizes tried for the dynamic dims of random data, smallest first: many models need a minimum length (a
# reflect pad, a convolution window, an STFT frame), and 1 fails inside them.
RANDOM_DIM_SIZES = (1, 16, 64, 256, 512, 1024, 4096)


def runnable_random(specs: list[InputSpec], n: int, seed: int, run, state_inputs: dict[str, int | None] | None,
                    role: str) -> tuple[SampleSet, int]:
    """Random samples at the smallest of :data:`RANDOM_DIM_SIZES` for which ``run(feed)`` (the fp32 model)
    succeeds; refuses (InputError) with the model's reason when none does. Returns the set and the size."""
    state_inputs = state_inputs or {}
    has_dynamic = any(not isinstance(d, int) or d <= 0 for s in specs if s.name not in state_inputs
                      for i, d in enumerate(s.shape) if i > 0)
    error = None
    for size in RANDOM_DIM_SIZES if has_dynamic else RANDOM_DIM_SIZES[:1]:
        try:
            data = random_samples(specs, n, seed, default=size, state_inputs=state_inputs)
        except InputError:
            if error is None:
                raise  # even the smallest random data is too large: that is the message
            break  # larger sizes would be too: the model's refusal at the last size is the message
        try:
            run(data.samples[0])
        except Exception as exc:  # the model's own refusal at the largest size tried goes into the message
            error = " ".join(str(exc).split())[:240]
            continue
        return data, size
    shapes = ", ".join(f"{s.name} {_fmt(s.shape)}" for s in specs)
    tried = f"dynamic dims set to {', '.join(map(str, RANDOM_DIM_SIZES))}" if has_dynamic else "its fixed shapes"
    raise InputError(f"random {role} inputs do not run in the fp32 model ({shapes}; {tried}): {error}",
                     hint="give real data with --calib / --heldout, or fix the dims with --input-shape")


def load_any(source: Path, specs: list[InputSpec], prep: ImagePreprocessing | None, role: str, batch: int,
             limit: int | None, state_inputs: dict[str, int | None] | None = None) -> SampleSet:
    source = Path(source)
    if source.is_dir():
        return load_images(source, specs, prep, role, batch, limit)
    if not source.exists():
        raise InputError(f"{role} data {source} not found", hint="pass an .npz file or a folder of images")
    return load_npz(source, specs, role, batch, limit, state_inputs)


def split_heldout(data: SampleSet, n_heldout: int) -> tuple[SampleSet, SampleSet]:
    """Hold the last samples (whole sequences, for sequence data) out of calibration so the accuracy check
    never sees calibration inputs."""
    if data.starts is not None:
        n = len(data.starts)
        if n < 2:
            raise InputError(f"calibration data has {n} sequence(s): too few to also hold some out for the "
                             f"accuracy check", hint="give more sequences, or a separate --heldout file")
        k = max(1, min(n_heldout, n // 5))
        held = data.sequence_slice(n - k)
        held.source = "split"
        held.notes = [f"held out the last {k} of {n} calibration sequences for the accuracy check"]
        return data.sequence_slice(0, n - k), held
    k = max(1, min(n_heldout, len(data) // 5))
    if len(data) < 2:
        raise InputError(f"calibration data has {len(data)} sample(s): too few to also hold some out for the "
                         f"accuracy check", hint="give more samples, or a separate --heldout file")
    cut = len(data) - k
    per = _rows(data.samples[0])
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
