"""Matching default boxes to ground truth in JAX: twins of `reference.matching`.

Same rule as the reference (paper section 2.2): each real gt first claims its
best prior (the later gt wins a prior claimed twice), those claims are final;
every other prior whose best IoU is >= the threshold takes its best gt; the
rest are background (label 0), and their matched box is the prior itself in
corner form, so their regression target is 0.

Ground truth is padded to G slots with a boolean mask: padded slots never
claim a prior and are never matched. Static shapes, no Python loops over
boxes; `build_targets` is `match` + `encode` vmapped over the batch. Public
functions check shapes and dtypes on every call, under jit too, and run the
reference's value checks on concrete inputs (ValueError); under jit those are
skipped: a mask of integers counts every nonzero entry as real ground truth.
"""
import jax
import jax.numpy as jnp

from reference import encoding as reference_encoding
from reference.validation import check_padded_ground_truth, check_threshold
from ssd_jax._validation import Shapes, check_not_empty, check_scalar, is_concrete
from ssd_jax.boxes import center_to_corners, iou_with_rows
from ssd_jax.encoding import encode


def match(gt_boxes, gt_labels, priors, iou_threshold=0.5, *, gt_mask=None, num_classes=None):
    """Assigns a ground-truth box (or background) to every prior of one image.

    Args:
      gt_boxes: [G, 4] float corners (xmin, ymin, xmax, ymax); rows where
        gt_mask is True need xmax > xmin and ymax > ymin, padded rows may hold
        anything finite.
      gt_labels: [G] int labels in 1..C where gt_mask is True.
      priors: [P, 4] center form (cx, cy, w, h).
      iou_threshold: minimum IoU for a prior to take its best gt, in [0, 1].
      gt_mask: [G] bool, True for real ground truth; default all True.
      num_classes: C; if given (and inputs are concrete), labels above it are rejected.
    Returns:
      matched_boxes: [P, 4] float32 corners: the matched gt box of positive
        priors, the prior itself for background priors.
      labels: [P] int32: the matched gt's label, 0 for background.
    """
    if gt_mask is None:
        gt_mask = jnp.ones(jnp.shape(gt_boxes)[:1], dtype=bool)
    gt_boxes, gt_labels, gt_mask, priors = _checked_inputs(
        gt_boxes, gt_labels, gt_mask, priors, iou_threshold, num_classes, batch_dims=0)
    return _match(gt_boxes, gt_labels, gt_mask, priors, iou_threshold, _used_slots(gt_mask))


def build_targets(gt_boxes, gt_labels, gt_mask, priors, iou_threshold=0.5,
                  variances=(0.1, 0.2), *, num_classes=None):
    """Training targets of a batch: `match` + `encode` per image, vmapped.

    Args:
      gt_boxes: [B, G, 4] float corners, padded to G slots (padded rows: anything finite).
      gt_labels: [B, G] int labels in 1..C where gt_mask is True.
      gt_mask: [B, G] bool, True for real ground truth.
      priors: [P, 4] center form (cx, cy, w, h).
      iou_threshold, num_classes: as in `match`.
      variances: (center variance, size variance) of `encode`.
    Returns:
      loc_target: [B, P, 4] float32 offsets, 0 for background priors.
      labels: [B, P] int32, 0 for background.
    """
    gt_boxes, gt_labels, gt_mask, priors = _checked_inputs(
        gt_boxes, gt_labels, gt_mask, priors, iou_threshold, num_classes, batch_dims=1)
    if is_concrete(variances):
        reference_encoding.check_variances(variances)
    used_slots = _used_slots(gt_mask)  # of the whole batch: one loop bound, not a batched one

    def one_image(boxes, labels, mask):
        matched_boxes, matched_labels = _match(boxes, labels, mask, priors, iou_threshold,
                                               used_slots)
        return encode(matched_boxes, priors, variances), matched_labels

    return jax.vmap(one_image)(gt_boxes, gt_labels, gt_mask)


def _checked_inputs(gt_boxes, gt_labels, gt_mask, priors, iou_threshold, num_classes, *,
                    batch_dims: int):
    """(gt_boxes, gt_labels int32, gt_mask bool, priors) as JAX arrays: shapes and dtypes
    checked always, values (the reference's checks) when every input is concrete."""
    batch = "B " * batch_dims
    shapes = Shapes()
    gt_boxes = shapes.check("gt_boxes", gt_boxes, batch + "G 4")
    gt_labels = shapes.check("gt_labels", gt_labels, batch + "G", kind="int")
    gt_mask = shapes.check("gt_mask", gt_mask, batch + "G", kind="bool")
    priors = shapes.check("priors", priors, "P 4")
    check_not_empty("priors", shapes.size("P"), "prior")
    check_scalar("iou_threshold", iou_threshold)
    if is_concrete(gt_boxes, gt_labels, gt_mask, priors, iou_threshold):
        check_padded_ground_truth(gt_boxes, gt_labels, gt_mask, batch_dims=batch_dims,
                                  num_classes=num_classes)
        reference_encoding.check_priors(priors)
        check_threshold(iou_threshold, "iou_threshold")
    return gt_boxes, gt_labels.astype(jnp.int32), gt_mask.astype(bool), priors


def _used_slots(gt_mask):
    """1 + the last real gt slot (0 if none): the padded slots after it can be skipped."""
    slot_numbers = jnp.arange(1, gt_mask.shape[-1] + 1)
    return jnp.max(jnp.where(gt_mask, slot_numbers, 0), initial=0)


@jax.jit
def _match(gt_boxes, gt_labels, gt_mask, priors, iou_threshold, used_slots):
    gt_boxes, gt_labels = jnp.asarray(gt_boxes, jnp.float32), jnp.asarray(gt_labels, jnp.int32)
    gt_mask = jnp.asarray(gt_mask, bool)
    prior_corners = center_to_corners(jnp.asarray(priors, jnp.float32))
    num_gts, num_priors = gt_boxes.shape[0], prior_corners.shape[0]
    if num_gts == 0:
        return prior_corners, jnp.zeros(num_priors, jnp.int32)
    prior_rows = prior_corners.T  # [4, P]

    # One pass over the gt slots computes each gt's IoU row [P] on the fly, so
    # the [G, P] matrix is never stored, and the argmaxes use max, min and sign
    # only: XLA:CPU runs argmax and compares on big arrays as slow scalar loops.
    def add_gt(g, best):
        best_overlap, best_gt, best_prior = best
        # IoU -1 for padded gts: below every real IoU and every threshold.
        overlaps = jnp.where(gt_mask[g], iou_with_rows(gt_boxes[g], prior_rows), -1.0)
        new_best_overlap = jnp.maximum(best_overlap, overlaps)
        better = jnp.sign(new_best_overlap - best_overlap)  # 1 where strictly better, else 0
        best_gt = best_gt + better * (g - best_gt)  # float32: exact for gt indices
        return new_best_overlap, best_gt, best_prior.at[g].set(_first_argmax(overlaps))

    # -2: every gt slot, even padded (-1), beats it, so gt 0 is everyone's first best.
    start = jnp.full(num_priors, -2.0), jnp.zeros(num_priors), jnp.zeros(num_gts, jnp.int32)
    best_overlap, best_gt, best_prior = jax.lax.fori_loop(0, used_slots, add_gt, start)
    above_threshold = best_overlap >= iou_threshold
    # Bipartite step: each real gt claims its best prior; scatter-max keeps the
    # highest (latest) gt index among the claimants of a prior, -1 if none.
    claimant = jnp.where(gt_mask, jnp.arange(num_gts), -1)
    claimed_by = jnp.full(num_priors, -1).at[best_prior].max(claimant)  # [P]

    claimed = claimed_by >= 0
    assigned_gt = jnp.where(claimed, claimed_by, best_gt.astype(jnp.int32))
    positive = claimed | above_threshold
    labels = jnp.where(positive, gt_labels[assigned_gt], 0)
    matched_boxes = jnp.where(positive[:, None], gt_boxes[assigned_gt], prior_corners)
    return matched_boxes, labels


def _first_argmax(x):
    """Index of the first maximum of x [N], as argmax: sign(max - x) is 0 exactly at maxima.

    The key is int32: XLA:CPU's int32 min reduce is faster than its float32 one.
    """
    index = jnp.arange(x.shape[0], dtype=jnp.int32)
    not_max = jnp.sign(jnp.max(x) - x).astype(jnp.int32)
    return jnp.min(jnp.maximum(not_max * x.shape[0], index))
