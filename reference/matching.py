"""Matching default boxes to ground truth, SSD paper section 2.2, "Matching strategy".

"We begin by matching each ground truth box to the default box with the best
jaccard overlap (as in MultiBox). Unlike MultiBox, we then match default boxes
to any ground truth with jaccard overlap higher than a threshold (0.5)."

So a prior is positive when
  1. a ground-truth box claims it in the first step (`claim_priors`); claims
     are final: step 2 never takes a claimed prior away;
  2. otherwise, when its best IoU over all the gts is >= the threshold: it
     takes that best gt (the lowest index among equally good gts).
Every other prior is background (label 0).

Two rules for step 1 (`rule=`):
  * "bipartite" (the default): the Caffe release's `MatchBBox`
    (src/caffe/util/bbox_util.cpp), a greedy one-to-one assignment. Among the
    gts not yet served and the priors not yet claimed, the pair with the
    highest IoU is matched, both leave, and this repeats until every gt is
    served or no pair with IoU > 0 is left (Caffe's cut-off is 1e-6, not 0:
    only pairs that barely touch tell them apart). Distinct gts claim distinct
    priors, so every gt owns a prior of its own (when one overlaps it at
    all), even when two near-duplicate boxes have the same best prior: the
    second takes its next best. Equal IoUs go to the lowest prior index, then
    the lowest gt index, the order in which Caffe scans the pairs.
  * "argmax": each gt claims its own best prior (np.argmax: the lowest index
    among equals), even at IoU 0; when several claim the same prior the
    later gt (higher index) wins and the others are left with no prior of
    their own from step 1. This is the shortcut of torchvision's SSDMatcher
    and ssd.pytorch's `match`; checkpoints converted from them were trained
    with it.

matched_boxes of a background prior is the prior itself in corner form, so its
regression target (`encoding.encode`) is exactly 0 and always finite; the loss
ignores it anyway.
"""
import numpy as np

from reference.boxes import center_to_corners, iou
from reference.encoding import check_priors, encode
from reference.validation import (check_boxes, check_labels, check_padded_ground_truth,
                                  check_threshold)

RULES = ("bipartite", "argmax")


def match(gt_boxes, gt_labels, priors, iou_threshold=0.5, *, rule="bipartite",
          num_classes=None):
    """Assigns a ground-truth box (or background) to every prior of one image.

    Args:
      gt_boxes: [G, 4] corners (xmin, ymin, xmax, ymax) with xmax > xmin,
        ymax > ymin. G may be 0.
      gt_labels: [G] int class labels in 1..C.
      priors: [P, 4] center form (cx, cy, w, h).
      iou_threshold: step 2's minimum IoU, in [0, 1].
      rule: step 1's rule, "bipartite" (Caffe's) or "argmax" (torchvision's);
        see the module docstring.
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
    check_rule(rule)

    prior_corners = center_to_corners(priors)
    labels = np.zeros(len(priors), dtype=np.int64)
    if len(gt_boxes) == 0:
        return prior_corners, labels
    overlaps = iou(gt_boxes, prior_corners)  # [G, P]

    # Step 2's candidates: each prior's best gt ...
    assigned_gt = overlaps.argmax(axis=0)
    positive = overlaps.max(axis=0) >= iou_threshold
    # ... overridden by step 1's claims.
    claimed_by = claim_priors(overlaps, rule)
    claimed = claimed_by >= 0
    assigned_gt[claimed] = claimed_by[claimed]
    positive |= claimed

    labels[positive] = gt_labels[assigned_gt[positive]]
    matched_boxes = np.where(positive[:, None], gt_boxes[assigned_gt], prior_corners)
    return matched_boxes, labels


def claim_priors(overlaps, rule="bipartite") -> np.ndarray:
    """Step 1: the gt that claims each prior.

    Args:
      overlaps: [G, P] IoU of every gt with every prior.
      rule: "bipartite" or "argmax" (module docstring).
    Returns:
      claimed_by: [P] int64, the claiming gt's index, -1 for unclaimed priors.
    """
    num_gts, num_priors = overlaps.shape
    claimed_by = np.full(num_priors, -1, dtype=np.int64)
    if rule == "argmax":
        for g in range(num_gts):
            claimed_by[overlaps[g].argmax()] = g  # a later gt overwrites an earlier one
        return claimed_by
    # Bipartite: rows of served gts and columns of claimed priors drop to -1.
    available = np.array(overlaps, dtype=np.float64)
    for _ in range(num_gts):
        # argmax of the transpose scans prior by prior, gt by gt, as Caffe does:
        # among equal IoUs the lowest prior, then the lowest gt wins.
        prior, gt = np.unravel_index(available.T.argmax(), (num_priors, num_gts))
        if available[gt, prior] <= 0:
            break  # no pair with IoU > 0 left
        claimed_by[prior] = gt
        available[gt, :] = -1
        available[:, prior] = -1
    return claimed_by


def check_rule(rule) -> str:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    return rule


def build_targets(gt_boxes, gt_labels, gt_mask, priors, iou_threshold=0.5,
                  variances=(0.1, 0.2), *, rule="bipartite", num_classes=None):
    """Training targets of a batch: `match` then `encoding.encode`, image by image.

    Args:
      gt_boxes: [B, G, 4] corners, padded to G slots; rows where gt_mask is
        False are ignored (they may hold anything finite).
      gt_labels: [B, G] int labels in 1..C where gt_mask is True.
      gt_mask: [B, G] bool, True for real ground truth.
      priors: [P, 4] center form (cx, cy, w, h).
      iou_threshold, rule, num_classes: as in `match`.
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
                                            rule=rule, num_classes=num_classes)
        loc_targets.append(encode(matched_boxes, priors, variances))
        labels.append(image_labels)
    return np.stack(loc_targets), np.stack(labels)
