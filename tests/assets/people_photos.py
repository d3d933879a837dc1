"""Folders of real photos of people, for the detectors' calibration and held-out sets.

Sources (all fetched from PyPI wheels by ``pretrained.fetch``, or shipped by an installed package):
ultralytics' ``bus.jpg`` and ``zidane.jpg``, scikit-image's ``astronaut.png`` and ``camera.png``, matplotlib's
``grace_hopper.jpg``; backgrounds: scikit-learn's ``china.jpg``/``flower.jpg`` and scikit-image's
``coffee.png``/``chelsea.png``/``rocket.jpg``.

Calibration and held-out sets never share a photo: calibration uses bus, camera and grace_hopper on china,
coffee and rocket; held-out uses zidane and astronaut on flower and chelsea. Each image is a scene: a crop
of a person photo (scaled, mirrored, brightness-jittered) pasted on a background crop, or the person crop
alone, at several aspect ratios, saved as JPEG so the SDK's own image loader (letterbox) reads them.
Face sets (for BlazeFace, 128x128) are square crops around each photo's face, the face filling 25-60%.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

CALIB_PEOPLE = ("photo_bus", "photo_camera", "grace_hopper")
HELDOUT_PEOPLE = ("photo_zidane", "photo_astronaut")
CALIB_BACKGROUNDS = ("china", "photo_coffee", "photo_rocket")
HELDOUT_BACKGROUNDS = ("flower", "photo_chelsea")
# Face boxes (x1, y1, x2, y2) in each photo, as the fp32 YOLOv8n detector finds them (see README).
FACES = {"photo_zidane": (897, 128, 1064, 285), "photo_astronaut": (173, 82, 274, 179),
         "photo_camera": (182, 128, 266, 197), "grace_hopper": (168, 141, 359, 340)}
CALIB_FACES = ("photo_camera", "grace_hopper")
HELDOUT_FACES = ("photo_zidane", "photo_astronaut")
GRACE_SHA256 = "a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130"
CANVASES = ((640, 480), (480, 640), (640, 360), (512, 512), (720, 540))


def _open(key: str, fetch):
    from PIL import Image

    if key == "grace_hopper":
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != GRACE_SHA256:
            raise RuntimeError(f"{path} has sha256 {digest}, expected {GRACE_SHA256}")
    elif key in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(f"{key}.jpg"))
    else:
        path = fetch(key)
    with Image.open(path) as im:
        return im.convert("RGB")


def _jitter(im, rng):
    from PIL import ImageEnhance

    im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.8, 1.2)))
    return ImageEnhance.Contrast(im).enhance(float(rng.uniform(0.85, 1.15)))


def scenes(folder: Path, people: tuple[str, ...], backgrounds: tuple[str, ...], count: int, seed: int, fetch) -> Path:
    """Write ``count`` JPEG scenes into ``folder`` (created); return it."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    persons = [_open(k, fetch) for k in people]
    grounds = [_open(k, fetch) for k in backgrounds]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        cw, ch = CANVASES[int(rng.integers(len(CANVASES)))]
        person = persons[i % len(persons)]
        pw, ph = person.size
        fx, fy = rng.uniform(0.55, 1.0, size=2)
        w, h = int(pw * fx), int(ph * fy)
        x0, y0 = int(rng.integers(0, pw - w + 1)), int(rng.integers(0, ph - h + 1))
        crop = person.crop((x0, y0, x0 + w, y0 + h))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop = _jitter(crop, rng)
        if rng.random() < 0.35:  # the person crop alone
            canvas = crop.resize((cw, ch), Image.BILINEAR) if rng.random() < 0.5 else crop
        else:
            ground = grounds[int(rng.integers(len(grounds)))]
            gw, gh = ground.size
            s = max(cw / gw, ch / gh) * float(rng.uniform(1.0, 1.5))
            ground = ground.resize((int(gw * s) + 1, int(gh * s) + 1), Image.BILINEAR)
            gx, gy = int(rng.integers(0, ground.size[0] - cw + 1)), int(rng.integers(0, ground.size[1] - ch + 1))
            canvas = ground.crop((gx, gy, gx + cw, gy + ch))
            scale = ch * float(rng.uniform(0.6, 1.0)) / crop.size[1]
            crop = crop.resize((max(1, int(crop.size[0] * scale)), max(1, int(crop.size[1] * scale))), Image.BILINEAR)
            px = int(rng.integers(-crop.size[0] // 4, max(1, cw - crop.size[0] * 3 // 4)))
            canvas.paste(crop, (px, ch - crop.size[1]))
        canvas.save(folder / f"scene_{i:03d}.jpg", quality=90)
    return folder


def faces(folder: Path, photos: tuple[str, ...], count: int, seed: int, fetch) -> Path:
    """Write ``count`` square JPEG crops, each around one photo's face (face 25-60% of the side)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    opened = {k: _open(k, fetch) for k in photos}
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        key = photos[i % len(photos)]
        im = opened[key]
        x1, y1, x2, y2 = FACES[key]
        face = max(x2 - x1, y2 - y1)
        side = int(face / rng.uniform(0.25, 0.6))
        cx = (x1 + x2) / 2 + rng.uniform(-0.2, 0.2) * side
        cy = (y1 + y2) / 2 + rng.uniform(-0.2, 0.2) * side
        box = (int(cx - side / 2), int(cy - side / 2), int(cx - side / 2) + side, int(cy - side / 2) + side)
        crop = _jitter(im.crop(box), rng)  # outside the photo: black, as a camera's letterbox would be
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop.resize((256, 256), Image.BILINEAR).save(folder / f"face_{i:03d}.jpg", quality=92)
    return folder
