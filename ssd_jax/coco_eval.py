"""COCO detection metrics through pycocotools (the COCO API's own scoring, not a rewrite):
AP@[.5:.95], AP50, AP75, AP of small / medium / large objects and the average recalls.

The detections of `ssd_jax.evaluation` (normalized corners, labels 1..C) become COCO results
(pixel [x, y, w, h] of the original image, the dataset's own image and category ids) and are
scored against the source's COCO json: a COCO-format source's own (crowd regions and the
annotations' areas included, so small / medium / large and the crowd rule are COCO's), or, for
other sources (shapes, VOC), one built from their ground truth, VOC's difficult objects passed
as crowd regions (pycocotools' only way to ignore a region).
"""
import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# COCOeval.stats in order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
              "ARl")


def to_results(detections, ground_truths, label_ids) -> list[dict]:
    """COCO results: [{"image_id", "category_id", "bbox": [x, y, w, h] pixels, "score"}].

    detections / ground_truths: one dict per image as `evaluation.evaluate` returns them
    (detections "boxes" [K, 4] normalized corners, "scores" [K], "labels" [K] in 1..C; ground
    truths "image_size" (height, width) and "image_id", else the index is the id).
    label_ids: the dataset's id of each label 1..C.
    """
    results = []
    for index, (det, gt) in enumerate(zip(detections, ground_truths)):
        height, width = gt["image_size"]
        corners = np.asarray(det["boxes"], np.float64).reshape(-1, 4) * ([width, height] * 2)
        category_ids = [label_ids[int(label) - 1] for label in det["labels"]]
        results += result_records(gt.get("image_id", index), corners, det["scores"],
                                  category_ids)
    return results


def result_records(image_id, corners, scores, category_ids) -> list[dict]:
    """One image's detections as COCO result records, for evaluation and `ssd-jax detect`.

    corners: [K, 4] pixel (xmin, ymin, xmax, ymax) of the original image; scores: [K];
    category_ids: [K] the dataset's own ids. The bbox [x, y, w, h] is rounded to 1/1000 of a
    pixel and the score to 1e-6: far below what changes a COCO figure, and the file stays small.
    """
    return [{"image_id": image_id, "category_id": int(category),
             "bbox": [round(float(v), 3) for v in (xmin, ymin, xmax - xmin, ymax - ymin)],
             "score": round(float(score), 6)}
            for (xmin, ymin, xmax, ymax), score, category in zip(corners, scores, category_ids)]


def ground_truth_from_examples(ground_truths, class_names, label_ids) -> dict:
    """A COCO json of ground truths in the eval loader's format (difficult objects as crowd
    regions), for sources without one of their own."""
    images, annotations = [], []
    for index, gt in enumerate(ground_truths):
        height, width = gt["image_size"]
        image_id = gt.get("image_id", index)
        images.append({"id": image_id, "width": int(width), "height": int(height)})
        corners = np.asarray(gt["boxes"], np.float64).reshape(-1, 4) * ([width, height] * 2)
        for (xmin, ymin, xmax, ymax), label, difficult in zip(corners, gt["labels"],
                                                             gt["difficult"]):
            w, h = xmax - xmin, ymax - ymin
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(label_ids[int(label) - 1]),
                                "bbox": [xmin, ymin, w, h], "area": w * h,
                                "iscrowd": int(difficult)})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": int(i), "name": n} for i, n in zip(label_ids, class_names)]}


def score(results, ground_truth: dict, label_ids) -> dict:
    """pycocotools' bbox evaluation of `results` against the COCO json `ground_truth`.

    Returns {"coco": {STAT_NAMES: value, NaN where pycocotools gives -1 (no ground truth in that
    area range)}, "map": AP@[.5:.95], "ap": float64 [C] each class's AP@[.5:.95] (NaN for a
    class without ground truth), "table": COCOeval.summarize's printed table}. No detections at
    all score 0 (pycocotools cannot load an empty result list).
    """
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        truth = COCO()
        truth.dataset = ground_truth
        truth.createIndex()
        if not results:
            return _no_detections(truth, label_ids)
        # loadRes adds fields to the dicts it is given: give it copies.
        evaluator = COCOeval(truth, truth.loadRes([dict(r) for r in results]), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        evaluator.summarize()
    stats = {name: float(v) if v >= 0 else float("nan")
             for name, v in zip(STAT_NAMES, evaluator.stats)}
    # precision: [IoU thresholds, recall points, categories, area ranges, max dets]; area "all"
    # and 100 detections are index 0 and -1, as summarize's AP.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    order = list(evaluator.params.catIds)
    per_class = []
    for category_id in label_ids:
        values = precision[:, :, order.index(int(category_id))]
        values = values[values > -1]
        per_class.append(float(values.mean()) if values.size else float("nan"))
    return {"coco": stats, "map": stats["AP"], "ap": np.asarray(per_class),
            "table": table.getvalue().rstrip()}


def _no_detections(truth, label_ids) -> dict:
    has_truth = [bool(truth.getAnnIds(catIds=[int(i)], iscrowd=False)) for i in label_ids]
    stats = {name: 0.0 for name in STAT_NAMES}
    return {"coco": stats, "map": 0.0, "table": "no detections: every figure is 0",
            "ap": np.where(has_truth, 0.0, np.nan)}


def evaluate_detections(detections, ground_truths, source, class_names) -> dict:
    """`score` of the detections of `source`'s images; also returns the "results" scored.
    The source's `coco_ground_truth()` and `label_ids` are used where it has them."""
    label_ids = tuple(getattr(source, "label_ids", range(1, len(class_names) + 1)))
    if hasattr(source, "coco_ground_truth"):
        truth = source.coco_ground_truth()
    else:
        truth = ground_truth_from_examples(ground_truths, class_names, label_ids)
    results = to_results(detections, ground_truths, label_ids)
    return dict(score(results, truth, label_ids), results=results)
