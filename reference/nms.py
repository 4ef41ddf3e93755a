"""Non-maximum suppression and the SSD detection output, SSD paper section 2.1,
"Model" ("...followed by a non-maximum suppression step to produce the final
detections") and section 3.7, "Inference time" (confidence threshold 0.01,
per-class NMS with jaccard overlap 0.45, top 200 detections per image).

Written after the Caffe release's `DetectionOutput` layer (weiliu89/caffe,
`detection_output_layer.cpp` and `ApplyNMSFast` in `bbox_util.cpp`): softmax
scores, decode every prior's box, then per class keep the confident boxes, the
best `pre_nms_top_k` of them, greedy NMS, and finally the best `top_k` over all
classes.
"""
import numpy as np

from reference.boxes import iou
from reference.encoding import check_priors, decode
from reference.loss import log_softmax
from reference.validation import check_array, check_boxes, check_positive_int, check_threshold


def check_nms_inputs(boxes, scores, iou_threshold):
    """Validates `nms` arguments; returns (boxes [N, 4], scores [N], iou_threshold)."""
    boxes = check_boxes(boxes, "boxes")
    scores = check_array(scores, "scores", shape=(len(boxes),))
    return boxes, scores, check_threshold(iou_threshold, "iou_threshold")


def nms(boxes, scores, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression.

    Visits the boxes from the highest score down (equal scores in index order)
    and keeps a box unless its IoU with an already kept box is above
    `iou_threshold`; an IoU exactly at the threshold does not suppress.

    Args:
      boxes: [N, 4] corners (xmin, ymin, xmax, ymax).
      scores: [N] finite scores.
      iou_threshold: in [0, 1]; 1 keeps every box.

    Returns:
      [K] int64 indices into `boxes` of the kept boxes, by descending score.
    """
    boxes, scores, iou_threshold = check_nms_inputs(boxes, scores, iou_threshold)
    # A stable sort keeps equal scores in index order.
    order = np.argsort(-scores, kind="stable")
    kept = []
    for candidate in order:
        overlaps = iou(boxes[candidate:candidate + 1], boxes[kept])[0]
        if np.all(overlaps <= iou_threshold):
            kept.append(candidate)
    return np.asarray(kept, dtype=np.int64)


def check_detect_inputs(loc, conf_logits, priors, score_threshold, iou_threshold, top_k,
                        pre_nms_top_k, *, batch_dims: int = 0):
    """Validates `detect` arguments (with `batch_dims` leading dims on loc and conf_logits).

    Returns (loc, conf_logits, priors) as NumPy arrays.
    """
    priors = check_priors(priors)
    batch = np.shape(loc)[:batch_dims]
    loc = check_array(loc, "loc", shape=(*batch, len(priors), 4))
    conf_logits = check_array(conf_logits, "conf_logits", shape=(*batch, len(priors), None))
    if conf_logits.shape[-1] < 2:
        raise ValueError("conf_logits needs C + 1 >= 2 entries (background and at least one "
                         f"class), got shape {conf_logits.shape}")
    check_threshold(score_threshold, "score_threshold")
    check_threshold(iou_threshold, "iou_threshold")
    check_positive_int(top_k, "top_k")
    check_positive_int(pre_nms_top_k, "pre_nms_top_k")
    return loc, conf_logits, priors


def detect(loc, conf_logits, priors, score_threshold: float = 0.01, iou_threshold: float = 0.45,
           top_k: int = 200, pre_nms_top_k: int = 400):
    """Final detections of one image from the raw SSD outputs.

    For every object class c in 1..C: take the priors whose softmax score for c
    is above `score_threshold`, keep the `pre_nms_top_k` best, and run `nms` on
    their decoded boxes. Then keep the `top_k` best detections over all classes.

    Args:
      loc: [P, 4] predicted offsets (encoded as in `reference.encoding.encode`).
      conf_logits: [P, C + 1] class logits, column 0 background.
      priors: [P, 4] center form (cx, cy, w, h).
      score_threshold: a detection needs a score strictly above it.
      iou_threshold: NMS threshold (same class only).
      top_k: most detections returned.
      pre_nms_top_k: most candidates per class entering NMS.

    Returns:
      boxes: [K, 4] float64 corners clipped to [0, 1], K <= top_k.
      scores: [K] float64 softmax scores, descending. Ties: lower class first, then
        lower prior index.
      labels: [K] int64 classes in 1..C.
    """
    loc, conf_logits, priors = check_detect_inputs(
        loc, conf_logits, priors, score_threshold, iou_threshold, top_k, pre_nms_top_k)
    probs = np.exp(log_softmax(conf_logits.astype(np.float64)))
    boxes = np.clip(decode(loc, priors), 0.0, 1.0)

    detections = []  # (score, class, prior index)
    for c in range(1, probs.shape[1]):
        candidates = np.flatnonzero(probs[:, c] > score_threshold)
        best_first = np.argsort(-probs[candidates, c], kind="stable")
        candidates = candidates[best_first[:pre_nms_top_k]]
        kept = candidates[nms(boxes[candidates], probs[candidates, c], iou_threshold)]
        detections.extend((probs[i, c], c, i) for i in kept)

    detections.sort(key=lambda d: (-d[0], d[1], d[2]))
    detections = detections[:top_k]
    priors_kept = np.array([i for _, _, i in detections], dtype=np.int64)
    return (boxes[priors_kept].reshape(-1, 4),
            np.array([s for s, _, _ in detections], dtype=probs.dtype),
            np.array([c for _, c, _ in detections], dtype=np.int64))

