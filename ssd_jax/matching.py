"""Matching default boxes to ground truth in JAX: twins of `reference.matching`.

Same rules as the reference (paper section 2.2; the module docstring of
`reference.matching` explains them): in step 1 the real gts claim priors,
by Caffe's greedy bipartite rule (`rule="bipartite"`, the default) or each its
own best prior (`rule="argmax"`, torchvision's); claims are final; every other
prior whose best IoU is >= the threshold takes its best gt; the rest are
background (label 0), and their matched box is the prior itself in corner
form, so their regression target is 0.

The bipartite rule without G rounds over the [G, P] matrix: each gt keeps one
candidate, its best prior among those free when it was last looked at, whose
IoU bounds what the gt can still get. In a wave, every gt that the greedy
order would serve next with its candidate is served at once, and the few gts
whose candidate was taken (at most `RECOMPUTE_ROWS` per wave) look again at
their IoU row with the claimed priors masked. A wave costs [G, G] comparisons
and `RECOMPUTE_ROWS` rows of P, and there are as many waves as the longest
chain of gts taking each other's best priors (1 without conflicts).

Ground truth is padded to G slots with a boolean mask: padded slots never
claim a prior and are never matched. Static shapes, no Python loops over
boxes; `build_targets` is `match` + `encode` vmapped over the batch. Public
functions check shapes and dtypes on every call, under jit too, and run the
reference's value checks on concrete inputs (ValueError); under jit those are
skipped: a mask of integers counts every nonzero entry as real ground truth.
"""
import functools

import jax
import jax.numpy as jnp

from reference import encoding as reference_encoding
from reference.matching import check_rule
from reference.validation import check_padded_ground_truth, check_threshold
from ssd_jax._validation import Shapes, check_not_empty, check_scalar, is_concrete
from ssd_jax.boxes import center_to_corners, iou_with_rows
from ssd_jax.encoding import encode


# Gts whose candidate prior was taken that look for a new one in a wave: more
# rows cost more per wave, fewer need more waves when many gts compete.
RECOMPUTE_ROWS = 4


def match(gt_boxes, gt_labels, priors, iou_threshold=0.5, *, gt_mask=None, rule="bipartite",
          num_classes=None):
    """Assigns a ground-truth box (or background) to every prior of one image.

    Args:
      gt_boxes: [G, 4] float corners (xmin, ymin, xmax, ymax); rows where
        gt_mask is True need xmax > xmin and ymax > ymin, padded rows may hold
        anything finite.
      gt_labels: [G] int labels in 1..C where gt_mask is True.
      priors: [P, 4] center form (cx, cy, w, h).
      iou_threshold: minimum IoU for a prior to take its best gt, in [0, 1].
      gt_mask: [G] bool, True for real ground truth; default all True.
      rule: step 1's rule, "bipartite" (Caffe's, the default) or "argmax".
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
    check_rule(rule)
    return _match(gt_boxes, gt_labels, gt_mask, priors, iou_threshold, _used_slots(gt_mask),
                  rule=rule)


def build_targets(gt_boxes, gt_labels, gt_mask, priors, iou_threshold=0.5,
                  variances=(0.1, 0.2), *, rule="bipartite", num_classes=None):
    """Training targets of a batch: `match` + `encode` per image, vmapped.

    Args:
      gt_boxes: [B, G, 4] float corners, padded to G slots (padded rows: anything finite).
      gt_labels: [B, G] int labels in 1..C where gt_mask is True.
      gt_mask: [B, G] bool, True for real ground truth.
      priors: [P, 4] center form (cx, cy, w, h).
      iou_threshold, rule, num_classes: as in `match`.
      variances: (center variance, size variance) of `encode`.
    Returns:
      loc_target: [B, P, 4] float32 offsets, 0 for background priors.
      labels: [B, P] int32, 0 for background.
    """
    gt_boxes, gt_labels, gt_mask, priors = _checked_inputs(
        gt_boxes, gt_labels, gt_mask, priors, iou_threshold, num_classes, batch_dims=1)
    if is_concrete(variances):
        reference_encoding.check_variances(variances)
    check_rule(rule)
    used_slots = _used_slots(gt_mask)  # of the whole batch: one loop bound, not a batched one

    def one_image(boxes, labels, mask):
        matched_boxes, matched_labels = _match(boxes, labels, mask, priors, iou_threshold,
                                               used_slots, rule=rule)
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


@functools.partial(jax.jit, static_argnames="rule")
def _match(gt_boxes, gt_labels, gt_mask, priors, iou_threshold, used_slots, *, rule):
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
        best_overlap, best_gt, best_prior, best_prior_overlap = best
        # IoU -1 for padded gts: below every real IoU and every threshold.
        overlaps = jnp.where(gt_mask[g], iou_with_rows(gt_boxes[g], prior_rows), -1.0)
        new_best_overlap = jnp.maximum(best_overlap, overlaps)
        better = jnp.sign(new_best_overlap - best_overlap)  # 1 where strictly better, else 0
        best_gt = best_gt + better * (g - best_gt)  # float32: exact for gt indices
        prior, overlap = _first_argmax(overlaps)
        return (new_best_overlap, best_gt, best_prior.at[g].set(prior),
                best_prior_overlap.at[g].set(overlap))

    # -2: every gt slot, even padded (-1), beats it, so gt 0 is everyone's first best.
    start = (jnp.full(num_priors, -2.0), jnp.zeros(num_priors), jnp.zeros(num_gts, jnp.int32),
             jnp.full(num_gts, -1.0))
    best_overlap, best_gt, best_prior, best_prior_overlap = jax.lax.fori_loop(
        0, used_slots, add_gt, start)
    if rule == "argmax":
        claimed_by = _argmax_claims(best_prior, gt_mask, num_priors)
    else:
        claimed_by = _bipartite_claims(best_prior, best_prior_overlap, gt_boxes, prior_rows)

    claimed = claimed_by >= 0
    assigned_gt = jnp.where(claimed, claimed_by, best_gt.astype(jnp.int32))
    positive = claimed | (best_overlap >= iou_threshold)
    labels = jnp.where(positive, gt_labels[assigned_gt], 0)
    matched_boxes = jnp.where(positive[:, None], gt_boxes[assigned_gt], prior_corners)
    return matched_boxes, labels


def _argmax_claims(best_prior, gt_mask, num_priors):
    """Each real gt claims its best prior; scatter-max keeps the highest (latest)
    gt index among the claimants of a prior. [P] int, -1 where unclaimed."""
    claimant = jnp.where(gt_mask, jnp.arange(best_prior.shape[0]), -1)
    return jnp.full(num_priors, -1).at[best_prior].max(claimant)


def _bipartite_claims(candidate, candidate_overlap, gt_boxes, prior_rows):
    """Caffe's greedy bipartite claims in waves (module docstring).

    Args:
      candidate: [G] int32, each gt's best prior (padded gts: anything).
      candidate_overlap: [G] float32, its IoU; -1 for padded gts.
      gt_boxes: [G, 4] corners; prior_rows: [4, P] prior corners.
    Returns:
      claimed_by: [P] int32, the claiming gt, -1 where unclaimed.
    """
    num_gts, num_priors = gt_boxes.shape[0], prior_rows.shape[1]
    gt_index = jnp.arange(num_gts)
    recompute_rows = min(RECOMPUTE_ROWS, num_gts)

    def serve(state):
        """Claims for every gt the greedy order serves next with its candidate."""
        claimed_by, candidate, bound, waiting = state
        fresh = waiting & (claimed_by[candidate] < 0)
        # A gt whose candidate is taken can still get up to its bound elsewhere.
        stale_bound = jnp.max(jnp.where(waiting & ~fresh, bound, -1.0))
        # first[i, j]: fresh gt i comes before fresh gt j in Caffe's order:
        # higher IoU, then lower prior index, then lower gt index.
        tie = bound[:, None] == bound[None, :]
        same_prior = candidate[:, None] == candidate[None, :]
        first = fresh[:, None] & fresh[None, :] & (
            (bound[:, None] > bound[None, :])
            | (tie & (candidate[:, None] < candidate[None, :]))
            | (tie & same_prior & (gt_index[:, None] < gt_index[None, :])))
        # A gt after another with the same candidate loses it; so may every gt
        # after it (its next best could come first), so serving stops there.
        loses = jnp.any(first & same_prior, axis=0)
        after_loser = jnp.any(loses[:, None] & (first | jnp.eye(num_gts, dtype=bool)), axis=0)
        served = fresh & ~after_loser & (bound > stale_bound)
        claimed_by = claimed_by.at[jnp.where(served, candidate, num_priors)].set(
            gt_index, mode="drop")
        return claimed_by, candidate, bound, waiting & ~served

    def look_again(state):
        """The waiting gts with the highest bounds whose candidate was taken
        find their best prior among the free ones."""
        claimed_by, candidate, bound, waiting = state
        stale = waiting & (claimed_by[candidate] >= 0)
        _, rows = jax.lax.top_k(jnp.where(stale, bound, -2.0), recompute_rows)
        free = claimed_by < 0
        overlaps = jax.vmap(iou_with_rows, (0, None))(gt_boxes[rows], prior_rows)
        new_candidate, new_bound = jax.vmap(_first_argmax)(jnp.where(free, overlaps, -1.0))
        rows = jnp.where(stale[rows], rows, num_gts)  # only stale rows change
        candidate = candidate.at[rows].set(new_candidate, mode="drop")
        bound = bound.at[rows].set(new_bound, mode="drop")
        return claimed_by, candidate, bound, waiting & (bound > 0)

    def wave(state):
        return look_again(serve(state))

    # Only IoU > 0 counts: gts that overlap no prior never wait.
    start = (jnp.full(num_priors, -1, jnp.int32), candidate, candidate_overlap,
             candidate_overlap > 0)
    claimed_by, *_ = jax.lax.while_loop(lambda state: jnp.any(state[3]), wave, start)
    return claimed_by


def _first_argmax(x):
    """(index of the first maximum of x [N], as argmax, and the maximum).

    sign(max - x) is 0 exactly at maxima. The key is int32: XLA:CPU's int32 min
    reduce is faster than its float32 one.
    """
    index = jnp.arange(x.shape[0], dtype=jnp.int32)
    top = jnp.max(x)
    not_max = jnp.sign(top - x).astype(jnp.int32)
    return jnp.min(jnp.maximum(not_max * x.shape[0], index)), top
