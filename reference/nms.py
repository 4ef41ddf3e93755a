"""Non-maximum suppression and the SSD detection output, SSD paper section 2.1,
"Model" ("...followed by a non-maximum suppression step to produce the final
detections") and section 3.7, "Inference time" (confidence threshold 0.01,
per-class NMS with jaccard overlap 0.45, top 200 detections per image).

Written after the Caffe release's `DetectionOutput` layer (weiliu89/caffe,
`detection_output_layer.cpp` and `ApplyNMSFast` in `bbox_util.cpp`): softmax
scores, decode every prior's box, then per class keep the confident boxes, the
best `pre_nms_top_k` of them, greedy NMS, and finally the best `top_k` over all
classes. One default departs from it: `detect` clips the decoded boxes to the
image before NMS (as torchvision and mmdetection do), where Caffe decodes with
`clip_bbox = false` and never clips; `clip_boxes=False` gives Caffe's boxes.
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
                        pre_nms_top_k, *, batch_dims: int = 0, level_sizes=None):
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
    for value, name in ((top_k, "top_k"), (pre_nms_top_k, "pre_nms_top_k")):
        if value is not None:
            check_positive_int(value, name)
    if level_sizes is not None and (sum(level_sizes) != len(priors) or min(level_sizes) < 1):
        raise ValueError(f"level_sizes {tuple(level_sizes)} must be positive prior counts "
                         f"adding up to the {len(priors)} priors")
    return loc, conf_logits, priors


def detect(loc, conf_logits, priors, score_threshold: float = 0.01, iou_threshold: float = 0.45,
           top_k: int | None = 200, pre_nms_top_k: int | None = 400, *, clip_boxes: bool = True,
           level_sizes=None, drop_empty_boxes: bool = False):
    """Final detections of one image from the raw SSD outputs.

    Softmax scores; decoded boxes, clipped to the image if `clip_boxes`. Then the NMS
    candidates: by default, for every object class c in 1..C, the priors whose score for c is
    above `score_threshold`, the `pre_nms_top_k` best of them. With `level_sizes` (the priors
    of each feature map, in order), mmdetection's rule instead: on each map, the
    `pre_nms_top_k` best (prior, class) pairs scoring above the threshold. Candidates whose box
    has zero width or height are dropped if `drop_empty_boxes`. Then `nms` per class, and the
    `top_k` best detections over all classes.

    Args:
      loc: [P, 4] predicted offsets (encoded as in `reference.encoding.encode`).
      conf_logits: [P, C + 1] class logits, column 0 background.
      priors: [P, 4] center form (cx, cy, w, h).
      score_threshold: a detection needs a score strictly above it.
      iou_threshold: NMS threshold (same class only).
      top_k: most detections returned; None: all that NMS keeps.
      pre_nms_top_k: most candidates per class (per map with `level_sizes`); None: no cap.
      clip_boxes: clip the decoded boxes to [0, 1] before NMS.
      level_sizes: None, or the number of priors of each feature map (adding up to P).
      drop_empty_boxes: drop candidates of zero width or height before NMS.

    Returns:
      boxes: [K, 4] float64 corners (clipped to [0, 1] if `clip_boxes`).
      scores: [K] float64 softmax scores, descending. Ties: lower class first, then
        lower prior index.
      labels: [K] int64 classes in 1..C.
    """
    loc, conf_logits, priors = check_detect_inputs(
        loc, conf_logits, priors, score_threshold, iou_threshold, top_k, pre_nms_top_k,
        level_sizes=level_sizes)
    probs = np.exp(log_softmax(conf_logits.astype(np.float64)))
    boxes = decode(loc, priors)
    if clip_boxes:
        boxes = np.clip(boxes, 0.0, 1.0)
    if level_sizes is None:
        candidates = _best_per_class(probs, score_threshold, pre_nms_top_k)
    else:
        candidates = _best_per_level(probs, score_threshold, pre_nms_top_k, level_sizes)

    detections = []  # (score, class, prior index)
    for c, priors_of_class in enumerate(candidates, 1):
        if drop_empty_boxes:
            box = boxes[priors_of_class]
            priors_of_class = priors_of_class[(box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])]
        kept = priors_of_class[nms(boxes[priors_of_class], probs[priors_of_class, c],
                                   iou_threshold)]
        detections.extend((probs[i, c], c, i) for i in kept)

    detections.sort(key=lambda d: (-d[0], d[1], d[2]))
    detections = detections[:top_k]
    priors_kept = np.array([i for _, _, i in detections], dtype=np.int64)
    return (boxes[priors_kept].reshape(-1, 4),
            np.array([s for s, _, _ in detections], dtype=probs.dtype),
            np.array([c for _, c, _ in detections], dtype=np.int64))


def _best_per_class(probs, score_threshold, pre_nms_top_k) -> list[np.ndarray]:
    """For each class 1..C, its `pre_nms_top_k` best priors scoring above the threshold
    (equal scores: lower prior first), as sorted prior indices."""
    candidates = []
    for c in range(1, probs.shape[1]):
        confident = np.flatnonzero(probs[:, c] > score_threshold)
        best_first = np.argsort(-probs[confident, c], kind="stable")
        candidates.append(np.sort(confident[best_first[:pre_nms_top_k]]))
    return candidates


def _best_per_level(probs, score_threshold, pre_nms_top_k, level_sizes) -> list[np.ndarray]:
    """mmdetection's candidates: on each feature map, the `pre_nms_top_k` best (prior, class)
    pairs scoring above the threshold (equal scores: lower prior, then lower class first).
    Returns, for each class 1..C, its sorted prior indices."""
    num_classes = probs.shape[1] - 1
    chosen = [[] for _ in range(num_classes)]
    start = 0
    for size in level_sizes:
        scores = probs[start:start + size, 1:].ravel()  # prior-major (prior, class) pairs
        confident = np.flatnonzero(scores > score_threshold)
        best_first = confident[np.argsort(-scores[confident], kind="stable")][:pre_nms_top_k]
        for pair in best_first:
            chosen[pair % num_classes].append(start + pair // num_classes)
        start += size
    return [np.sort(np.asarray(c, dtype=np.int64)) for c in chosen]
