"""PASCAL VOC detection metric: per-class average precision and their mean (mAP).

Follows the official devkit (MATLAB VOCevaldet.m and its Python port, the
voc_eval.py of py-faster-rcnn) step by step, so the numbers match published
VOC results: the same greedy matching of detections to ground truth, the same
handling of "difficult" objects, the same pixel-overlap rule and the same two
ways of summarizing the precision/recall curve (VOC2007 11-point, VOC2010+ area).
"""
import dataclasses

import numpy as np

from reference.validation import (check_array, check_boxes, check_labels, check_positive_int,
                                  check_threshold)

# The devkit's thresholds 0:0.1:1 (MATLAB) / np.arange(0, 1.1, 0.1) (Python) are
# accumulated floats: 0.3, 0.6 and 0.7 come out a hair above their decimal value,
# so a recall of exactly 3/10 does not reach t = 0.3. Kept as-is to reproduce
# published VOC2007 numbers.
VOC07_RECALL_THRESHOLDS = np.arange(0.0, 1.1, 0.1)


def average_precision(recall, precision, use_07_metric: bool = True) -> float:
    """Area under a precision/recall curve, the devkit's voc_ap.

    Args:
      recall: [K] float recall after each of the K detections, ranked by score.
      precision: [K] float precision after each detection.
      use_07_metric: True for VOC2007's 11-point average: the mean over
        t in VOC07_RECALL_THRESHOLDS of the highest precision at recall >= t
        (0 where recall never reaches t). False for VOC2010+: the exact area
        under the curve after precision is made monotonically decreasing
        (each point takes the highest precision at any larger recall).

    Returns:
      AP in [0, 1]; 0 for an empty curve.
    """
    recall = check_array(recall, "recall", shape=(None,)).astype(np.float64)
    precision = check_array(precision, "precision", shape=(recall.size,)).astype(np.float64)
    if use_07_metric:
        return float(np.mean([precision[recall >= t].max(initial=0.0)
                              for t in VOC07_RECALL_THRESHOLDS]))
    recall = np.concatenate([[0.0], recall, [1.0]])
    envelope = np.maximum.accumulate(np.concatenate([[0.0], precision, [0.0]])[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * envelope[steps + 1]))


def evaluate_detections(detections, ground_truths, num_classes: int, iou_threshold: float = 0.5,
                        use_07_metric: bool = True, return_curves: bool = False) -> dict:
    """VOC average precision of every class and their mean.

    Args:
      detections: list with one dict per image: "boxes" [K, 4] float corners
        (xmin, ymin, xmax, ymax) in [0, 1], "scores" [K] float, "labels" [K]
        int in 1..C.
      ground_truths: list of the same length, one dict per image: "boxes"
        [G, 4] float corners in [0, 1] (xmax > xmin, ymax > ymin), "labels"
        [G] int in 1..C, optionally "difficult" [G] bool (default all False)
        and "image_size" (height, width) in pixels.
      num_classes: C.
      iou_threshold: a detection matches a ground truth when IoU > threshold
        (strictly, as in the devkit).
      use_07_metric: VOC2007 11-point AP (True) or VOC2010+ area AP (False).
      return_curves: also return each class's precision/recall curve, the one
        its AP summarizes (for plotting).

    Returns:
      {"ap": [C] float64 with entry c - 1 for class c, "map": float mean of
      the APs that are not NaN}. A class without non-difficult ground truth
      has AP NaN (recall is undefined) and is left out of the mean; mAP is
      NaN only if every class is. With return_curves, also "recall" and
      "precision": lists of C entries, entry c - 1 the [K_c] float64 curve of
      class c after each of its K_c detections ranked by score (recall = TP /
      positives, precision = TP / (TP + FP), cumulative as described below),
      None where the AP is NaN; average_precision(recall[c - 1],
      precision[c - 1], use_07_metric) is ap[c - 1].

    Per class, the devkit's rule: all detections of the class over all images
    are ranked by score (a stable sort: ties keep image order, then list
    order). Each goes to the ground truth of that class in its image with the
    highest IoU (see `devkit_iou`; first one on ties). If that IoU > threshold:
    a difficult ground truth makes the detection count as nothing, an
    undetected one makes it a true positive (and marks it detected), an
    already detected one makes it a false positive (a duplicate). Otherwise it
    is a false positive. Recall = TP / (non-difficult ground truths),
    precision = TP / (TP + FP), both cumulative along the ranking.
    """
    images = _check_and_convert(detections, ground_truths, num_classes)
    iou_threshold = check_threshold(iou_threshold, "iou_threshold")
    curves = [_precision_recall(images, label, iou_threshold)
              for label in range(1, num_classes + 1)]
    ap = np.array([float("nan") if curve is None else average_precision(*curve, use_07_metric)
                   for curve in curves])
    defined = ~np.isnan(ap)
    mean_ap = float(ap[defined].mean()) if defined.any() else float("nan")
    result = {"ap": ap, "map": mean_ap}
    if return_curves:
        result["recall"] = [None if curve is None else curve[0] for curve in curves]
        result["precision"] = [None if curve is None else curve[1] for curve in curves]
    return result


def devkit_iou(box, gt_boxes, pixel_offset: float) -> np.ndarray:
    """IoU of one box with each of [G] boxes, by the devkit's overlap rule.

    VOC annotations count pixels inclusively, so a box from pixel xmin to
    pixel xmax is xmax - xmin + 1 pixels wide: with pixel_offset 1 every width
    and height (of the boxes and of the intersection) gets + 1, as in the
    devkit (iw = min(xmax) - max(xmin) + 1, ...). This raises the IoU of small
    boxes noticeably. pixel_offset 0 is the plain IoU of continuous
    coordinates, used for normalized boxes.

    Args:
      box: [4] float corners.
      gt_boxes: [G, 4] float corners in the same coordinates.
      pixel_offset: 1.0 for pixel coordinates, 0.0 for normalized ones.

    Returns:
      [G] float64 IoU; 0 where the boxes do not overlap.
    """
    def area(b):
        return (b[..., 2] - b[..., 0] + pixel_offset) * (b[..., 3] - b[..., 1] + pixel_offset)

    inter_w = np.maximum(np.minimum(gt_boxes[:, 2], box[2]) - np.maximum(gt_boxes[:, 0], box[0])
                         + pixel_offset, 0.0)
    inter_h = np.maximum(np.minimum(gt_boxes[:, 3], box[3]) - np.maximum(gt_boxes[:, 1], box[1])
                         + pixel_offset, 0.0)
    intersection = inter_w * inter_h
    union = area(box) + area(gt_boxes) - intersection
    # Only two zero-area normalized detections/boxes can give union 0; call that no overlap.
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def _precision_recall(images, label, iou_threshold):
    """(recall [K], precision [K]) float64 of class `label` after each of its K
    detections ranked by score; None without non-difficult ground truth."""
    gt_boxes = [image.gt_boxes[image.gt_labels == label] for image in images]
    difficult = [image.difficult[image.gt_labels == label] for image in images]
    num_positives = sum(int((~d).sum()) for d in difficult)
    if num_positives == 0:
        return None

    image_ids, boxes, scores = [], [], []
    for i, image in enumerate(images):
        mine = image.det_labels == label
        image_ids += [i] * int(mine.sum())
        boxes += list(image.det_boxes[mine])
        scores += list(image.det_scores[mine])

    detected = [np.zeros(len(d), dtype=bool) for d in difficult]
    true_positive = np.zeros(len(scores))
    false_positive = np.zeros(len(scores))
    for rank, k in enumerate(np.argsort(-np.asarray(scores), kind="stable")):
        i = image_ids[k]
        overlaps = devkit_iou(boxes[k], gt_boxes[i], images[i].pixel_offset)
        best = int(np.argmax(overlaps)) if overlaps.size else -1
        if best < 0 or overlaps[best] <= iou_threshold:
            false_positive[rank] = 1
        elif difficult[i][best]:
            continue
        elif detected[i][best]:
            false_positive[rank] = 1
        else:
            true_positive[rank] = 1
            detected[i][best] = True

    true_positive, false_positive = np.cumsum(true_positive), np.cumsum(false_positive)
    recall = true_positive / num_positives
    precision = true_positive / np.maximum(true_positive + false_positive,
                                           np.finfo(np.float64).eps)
    return recall, precision


@dataclasses.dataclass(frozen=True)
class _Image:
    """One image's detections and ground truth, in the coordinates IoU is computed in."""
    det_boxes: np.ndarray
    det_scores: np.ndarray
    det_labels: np.ndarray
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    difficult: np.ndarray
    pixel_offset: float


def _check_and_convert(detections, ground_truths, num_classes) -> list:
    num_classes = check_positive_int(num_classes, "num_classes")
    for name, value in (("detections", detections), ("ground_truths", ground_truths)):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list with one dict per image, got {type(value)}")
    if len(detections) != len(ground_truths):
        raise ValueError(f"detections has {len(detections)} images but ground_truths has "
                         f"{len(ground_truths)}: both need one entry per image")
    return [_check_image(i, det, gt, num_classes)
            for i, (det, gt) in enumerate(zip(detections, ground_truths))]


def _check_image(i, det, gt, num_classes) -> _Image:
    _check_keys(det, f"detections[{i}]", ("boxes", "scores", "labels"))
    _check_keys(gt, f"ground_truths[{i}]", ("boxes", "labels"))
    det_boxes = check_boxes(_empty_as_boxes(det["boxes"]), f"detections[{i}]['boxes']")
    k = len(det_boxes)
    det_scores = check_array(det["scores"], f"detections[{i}]['scores']", shape=(k,))
    det_labels = check_labels(det["labels"], f"detections[{i}]['labels']", shape=(k,),
                              num_classes=num_classes)
    gt_boxes = check_boxes(_empty_as_boxes(gt["boxes"]), f"ground_truths[{i}]['boxes']",
                           strict=True)
    g = len(gt_boxes)
    gt_labels = check_labels(gt["labels"], f"ground_truths[{i}]['labels']", shape=(g,),
                             num_classes=num_classes)
    difficult = _check_difficult(gt.get("difficult"), f"ground_truths[{i}]['difficult']", g)

    det_boxes, gt_boxes, pixel_offset = det_boxes.astype(np.float64), gt_boxes.astype(np.float64), 0.0
    if gt.get("image_size") is not None:
        height, width = _check_image_size(gt["image_size"], f"ground_truths[{i}]['image_size']")
        scale = np.array([width, height, width, height], dtype=np.float64)
        det_boxes, gt_boxes, pixel_offset = det_boxes * scale, gt_boxes * scale, 1.0
    return _Image(det_boxes, det_scores.astype(np.float64), det_labels, gt_boxes, gt_labels,
                  difficult, pixel_offset)


def _check_keys(entry, name, keys):
    if not isinstance(entry, dict):
        raise ValueError(f"{name} must be a dict, got {type(entry)}")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise ValueError(f"{name} is missing key(s) {missing}; it needs {list(keys)}")


def _empty_as_boxes(boxes):
    # An image without boxes may come as [] rather than a [0, 4] array.
    return np.zeros((0, 4)) if np.size(boxes) == 0 else boxes


def _check_difficult(difficult, name, g) -> np.ndarray:
    if difficult is None:
        return np.zeros(g, dtype=bool)
    difficult = check_array(difficult, name, shape=(g,))
    if difficult.size and not np.all((difficult == 0) | (difficult == 1)):
        raise ValueError(f"{name} must hold booleans, got {difficult.tolist()}")
    return difficult.astype(bool)


def _check_image_size(image_size, name):
    size = check_array(image_size, name, shape=(2,)).astype(np.float64)
    if np.any(size <= 0):
        raise ValueError(f"{name} must be (height, width) in pixels, both positive, got {size}")
    return size
