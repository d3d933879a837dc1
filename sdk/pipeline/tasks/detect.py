"""detect: the optimized model's detections against the fp32 model's detections (and labels, when given).

fp32's detections at the deployment threshold (``detect_conf``, after NMS) are the ground truth, and the optimized
model's detections are scored against them the standard way: mAP@0.5 and mAP@0.5:0.95 by pycocotools (the
COCO reference implementation), predictions down to a 0.001 score floor (Ultralytics' validation default).
mAP judges the ranking of boxes, not the threshold an application cuts at, and int8 often lowers scores
as a whole: so F1 at the deployment threshold (both models cut at ``detect_conf``, matched at IoU 0.5, same
class) is a second budgeted check (``min_f1``), what an application that keeps detections above the
threshold sees. With COCO labels (``--labels``), fp32 and the optimized model are both scored against them
and the drop in mAP@0.5 (in points) is held to ``max_metric_drop``.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np

from ...errors import InputError, missing_extra
from .base import TaskEvaluator, TaskResult, at_least, max_drop
from .detect_heads import Detections, Head, box_iou, choose_head, decode

log = logging.getLogger(__name__)

PRED_FLOOR = 0.001  # predictions kept for the PR curve (Ultralytics' validation default)
MAX_LABEL_BYTES = 64 * 1024 * 1024


class DetectEvaluator(TaskEvaluator):
    task = "detect"

    head: Head | None = None

    def prepare(self, reference: list[dict]) -> None:
        """Decide how to read the outputs, once, on the fp32 outputs."""
        hw = _input_hw(self.info)
        nc = len(self.info.class_names) if self.info.class_names else None
        self.head = choose_head(reference[0], self.options.detect_format, nc, hw)
        self.reason = (self.reason + "; " if self.reason else "") + self.head.reason

    def detections(self, outputs: list[dict], floor: float) -> list[Detections]:
        images: list[Detections] = []
        for out in outputs:
            images.extend(decode(self.head, out, floor, self.budget.detect_nms_iou))
        return images

    def evaluate(self, reference: list[dict], optimized: list[dict], labels=None) -> TaskResult:
        if self.head is None:
            self.prepare(reference)
        conf = self.budget.detect_conf
        ref = self.detections(reference, conf)
        opt_all = self.detections(optimized, min(PRED_FLOOR, conf))
        opt = [d.above(conf) for d in opt_all]
        n_truth = sum(len(d) for d in ref)
        notes = list(self.head.notes)
        figures = {"fp32_detections": float(n_truth), "optimized_detections": float(sum(len(d) for d in opt))}
        if n_truth == 0:
            # Nothing to find: agreement is perfect only if the optimized model finds nothing either.
            map50 = map5095 = 1.0 if figures["optimized_detections"] == 0 else 0.0
            notes.append("fp32 detected nothing on the held-out data at the deployment threshold: give held-out "
                         "images that contain the objects, or the detection check says little")
        else:
            map50, map5095 = coco_map(ref, opt_all)
        p, r, f1 = prf(ref, opt, 0.5)
        figures.update({"map50_95": map5095, "precision": p, "recall": r, "f1": f1})
        checks = [at_least("mAP@0.5 vs fp32", map50, self.budget.min_map50)]
        if self.budget.min_f1 is not None:
            checks.append(at_least(f"F1 vs fp32 at conf {conf:g}", f1, self.budget.min_f1))
        else:
            checks.append(at_least(f"F1 vs fp32 at conf {conf:g}", f1, None))
        checks.append(at_least("mAP@0.5:0.95 vs fp32", map5095, None))
        if self.options.labels_file:
            truth = self._labels(len(ref))
            fp32_map, _ = coco_map(truth, self.detections(reference, min(PRED_FLOOR, conf)))
            opt_map, _ = coco_map(truth, opt_all)
            checks.insert(0, max_drop("mAP@0.5 on labels (points)", 100 * fp32_map, 100 * opt_map,
                                      self.budget.max_metric_drop))
        return TaskResult(checks=checks, figures=figures, notes=notes)

    def _labels(self, n_images: int) -> list[Detections]:
        return coco_labels(Path(self.options.labels_file), self.options.sample_names, self.options.transforms,
                           n_images, self.info.class_names)


def _input_hw(info) -> tuple[int, int] | None:
    for shape in info.input_shapes.values():
        if len(shape) == 4:
            # NCHW when dim 1 is channels, else NHWC
            return (int(shape[2]), int(shape[3])) if shape[1] in (1, 3, 4) else (int(shape[1]), int(shape[2]))
    return None


def coco_map(truth: list[Detections], predicted: list[Detections]) -> tuple[float, float]:
    """(mAP@0.5, mAP@0.5:0.95) of ``predicted`` against ``truth`` (one entry per image), by pycocotools."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise missing_extra("pycocotools", "sdk") from None
    images, anns, cats = [], [], set()
    for i, t in enumerate(truth):
        images.append({"id": i + 1, "width": 1, "height": 1})
        for box, cls in zip(t.boxes, t.classes):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(cls) + 1, "iscrowd": 0,
                         "bbox": [float(box[0]), float(box[1]), w, h], "area": max(w * h, 1e-9)})
            cats.add(int(cls) + 1)
    if not anns:
        return (1.0, 1.0) if not any(len(p) for p in predicted) else (0.0, 0.0)
    results = [{"image_id": i + 1, "category_id": int(c) + 1, "score": float(s),
                "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
               for i, p in enumerate(predicted) for b, s, c in zip(p.boxes, p.scores, p.classes)]
    if not results:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in sorted(cats)]}
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = [1, 10, 300]
        ev.params.areaRng = [[0, 1e12]] * 4  # the model's own frame: COCO's pixel-area buckets do not apply
        ev.evaluate()
        ev.accumulate()
    # precision[T IoU thresholds, R recall points, K classes, A area ranges, M max-dets]; -1 marks a class
    # without ground truth. Read directly: summarize() hard-codes maxDets=100 for mAP@0.5:0.95.
    precision = ev.eval["precision"][:, :, :, 0, -1]
    return _mean(precision[0]), _mean(precision)


def _mean(p: np.ndarray) -> float:
    valid = p[p > -1]
    return float(valid.mean()) if valid.size else 0.0


def prf(truth: list[Detections], predicted: list[Detections], iou: float) -> tuple[float, float, float]:
    """Precision, recall, F1 of thresholded predictions (greedy by score, same class, IoU >= ``iou``)."""
    tp = fp = fn = 0
    for t, p in zip(truth, predicted):
        matched = np.zeros(len(t), bool)
        ious = box_iou(p.boxes, t.boxes)
        for j in np.argsort(-p.scores, kind="stable"):
            cand = np.nonzero((~matched) & (t.classes == p.classes[j]) & (ious[j] >= iou))[0] if len(t) else []
            if len(cand):
                matched[cand[np.argmax(ious[j][cand])]] = True
                tp += 1
            else:
                fp += 1
        fn += int((~matched).sum())
    if tp + fp + fn == 0:
        return 1.0, 1.0, 1.0
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * tp / (2 * tp + fp + fn)
    return precision, recall, f1


def coco_labels(path: Path, names: list[str] | None, transforms, n_images: int,
                class_names: list[str] | None) -> list[Detections]:
    """COCO-format labels of the held-out images, mapped into the model's input frame (letterbox/resize)."""
    if not names or transforms is None:
        raise InputError("--labels (COCO JSON) needs --heldout to be a folder of images, whose file names the "
                         "labels' 'images' entries name")
    try:
        if path.stat().st_size > MAX_LABEL_BYTES:
            raise InputError(f"labels file {path.name} is larger than {MAX_LABEL_BYTES // 2**20} MiB")
        doc = json.loads(path.read_text(encoding="utf-8"))
        images = {im["id"]: Path(str(im["file_name"])).name for im in doc["images"]}
        anns = doc["annotations"]
        cats = {c["id"]: c.get("name") for c in doc.get("categories", [])}
    except FileNotFoundError:
        raise InputError(f"labels file {path} not found") from None
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise InputError(f"labels file {path.name} is not COCO-format JSON ({exc.__class__.__name__}: "
                         f"{' '.join(str(exc).split())[:120]})",
                         hint="give {'images': [{'id', 'file_name'}], 'annotations': [{'image_id', 'category_id', "
                              "'bbox': [x, y, w, h]}], 'categories': [{'id', 'name'}]}") from None
    by_name = {c: i for i, c in enumerate(class_names or [])}

    def class_of(cat_id) -> int:
        name = cats.get(cat_id)
        if name is not None and name in by_name:
            return by_name[name]
        return int(cat_id)

    index = {name: i for i, name in enumerate(names[:n_images])}
    boxes: list[list] = [[] for _ in range(n_images)]
    classes: list[list] = [[] for _ in range(n_images)]
    for ann in anns:
        file = images.get(ann.get("image_id"))
        i = index.get(file)
        if i is None:
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        scale, px, py = transforms[i]
        boxes[i].append([x * scale + px, y * scale + py, (x + w) * scale + px, (y + h) * scale + py])
        classes[i].append(class_of(ann["category_id"]))
    if not any(boxes):
        raise InputError(f"labels file {path.name} names none of the held-out images "
                         f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    return [Detections(np.asarray(b, np.float64).reshape(-1, 4), np.ones(len(b)), np.asarray(c, np.int64))
            for b, c in zip(boxes, classes)]
