"""Matching default boxes to ground truth, SSD paper section 2.2, "Matching strategy".

"We begin by matching each ground truth box to the default box with the best
jaccard overlap (as in MultiBox). Unlike MultiBox, we then match default boxes
to any ground truth with jaccard overlap higher than a threshold (0.5)."

So a prior is positive when
  1. a ground-truth box claims it as its best prior (bipartite step): every gt
     gets at least one prior, however small its best overlap; if several gts
     claim the same prior, the later gt (higher index) wins. These claims are
     final: step 2 never takes a claimed prior away.
  2. otherwise, when its best IoU over the gts is >= the threshold: it takes
     that best gt.
Argmax ties go to the lowest index, as np.argmax does. Every other prior is
background (label 0).

matched_boxes of a background prior is the prior itself in corner form, so its
regression target (`encoding.encode`) is exactly 0 and always finite; the loss
ignores it anyway.
"""
import numpy as np

from reference.boxes import center_to_corners, iou
from reference.encoding import check_priors, encode
from reference.validation import (check_boxes, check_labels, check_padded_ground_truth,
                                  check_threshold)


def match(gt_boxes, gt_labels, priors, iou_threshold=0.5, *, num_classes=None):
    """Assigns a ground-truth box (or background) to every prior of one image.

    Args:
      gt_boxes: [G, 4] corners (xmin, ymin, xmax, ymax) with xmax > xmin,
        ymax > ymin. G may be 0.
      gt_labels: [G] int class labels in 1..C.
      priors: [P, 4] center form (cx, cy, w, h).
      iou_threshold: step 2's minimum IoU, in [0, 1].
      num_classes: C; if given, labels above it are rejected.
    Returns:
      matched_boxes: [P, 4] float64 corners: the matched gt box of positive
        priors, the prior itself for background priors.
      labels: [P] int64: the matched gt's label, 0 for background.
    """
    gt_boxes = check_boxes(gt_boxes, "gt_boxes", strict=True).astype(np.float64)
    gt_labels = check_labels(gt_labels, "gt_labels", shape=gt_boxes.shape[:1],
                             num_classes=num_classes)
    priors = check_priors(priors)
    iou_threshold = check_threshold(iou_threshold, "iou_threshold")

    prior_corners = center_to_corners(priors)
    labels = np.zeros(len(priors), dtype=np.int64)
    if len(gt_boxes) == 0:
        return prior_corners, labels
    overlaps = iou(gt_boxes, prior_corners)  # [G, P]

    # Step 2's candidates: each prior's best gt ...
    assigned_gt = overlaps.argmax(axis=0)
    positive = overlaps.max(axis=0) >= iou_threshold
    # ... overridden by step 1's claims; later gts overwrite earlier ones.
    for g in range(len(gt_boxes)):
        best_prior = overlaps[g].argmax()
        assigned_gt[best_prior] = g
        positive[best_prior] = True

    labels[positive] = gt_labels[assigned_gt[positive]]
    matched_boxes = np.where(positive[:, None], gt_boxes[assigned_gt], prior_corners)
    return matched_boxes, labels


def build_targets(gt_boxes, gt_labels, gt_mask, priors, iou_threshold=0.5,
                  variances=(0.1, 0.2), *, num_classes=None):
    """Training targets of a batch: `match` then `encoding.encode`, image by image.

    Args:
      gt_boxes: [B, G, 4] corners, padded to G slots; rows where gt_mask is
        False are ignored (they may hold anything finite).
      gt_labels: [B, G] int labels in 1..C where gt_mask is True.
      gt_mask: [B, G] bool, True for real ground truth.
      priors: [P, 4] center form (cx, cy, w, h).
      iou_threshold, num_classes: as in `match`.
      variances: as in `encoding.encode`.
    Returns:
      loc_target: [B, P, 4] float64 offsets; exactly 0 for background priors.
      labels: [B, P] int64, 0 for background.
    """
    gt_boxes, gt_labels, gt_mask = check_padded_ground_truth(
        gt_boxes, gt_labels, gt_mask, batch_dims=1, num_classes=num_classes)
    loc_targets, labels = [], []
    for boxes, classes, mask in zip(gt_boxes, gt_labels, gt_mask):
        matched_boxes, image_labels = match(boxes[mask], classes[mask], priors, iou_threshold,
                                            num_classes=num_classes)
        loc_targets.append(encode(matched_boxes, priors, variances))
        labels.append(image_labels)
    return np.stack(loc_targets), np.stack(labels)
