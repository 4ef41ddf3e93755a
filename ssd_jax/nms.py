"""Non-maximum suppression and the SSD detection output, jit-able twins of
`reference.nms` with fixed-size outputs.

Greedy NMS is sequential (a box survives only if no kept, higher-scored box
overlaps it), so it is one `lax.while_loop` over the score-sorted candidates,
stopping after the last valid one, whose body is a vector op on one row of
IoUs: O(N) steps. `nms` precomputes the IoU matrix (O(N^2) memory); `detect`
runs the loop for all classes at once with `jax.vmap` and computes each row in
its step, since usually few of its pre_nms_top_k candidates pass the score
threshold.

Under `jax.jit`, the sizes `max_output_size`, `top_k` and `pre_nms_top_k` must
be static; the thresholds may be static or traced (the public functions below
jit themselves with exactly these static arguments).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from reference.nms import check_detect_inputs, check_nms_inputs
from reference.validation import check_mask, check_positive_int
from ssd_jax._validation import Shapes, check_not_empty, check_scalar, is_concrete
from ssd_jax.boxes import iou
from ssd_jax.encoding import decode


def nms(boxes, scores, iou_threshold, max_output_size: int, *, mask=None):
    """Greedy non-maximum suppression with a fixed-size result.

    Same rule as `reference.nms.nms`: highest score first (equal scores in
    index order); a box is dropped if its IoU with a kept box is above
    `iou_threshold` (IoU equal to the threshold keeps it).

    Args:
      boxes: [N, 4] float corners (xmin, ymin, xmax, ymax).
      scores: [N] float scores.
      iou_threshold: float in [0, 1].
      max_output_size: static int >= 1, length of the result.
      mask: optional [N] bool, False marks a padding entry that is never kept
        (default: all valid).

    Returns:
      indices: [max_output_size] int32 indices into `boxes` of the kept boxes
        by descending score, then 0 padding.
      valid: [max_output_size] bool, True for the kept entries.

    Shapes and dtypes are checked on every call; concrete inputs are also
    checked like the reference's (ValueError on NaN, a mask other than 0/1).
    Under jit a NaN score's box is never kept and a nonzero mask entry counts
    as valid.
    """
    check_positive_int(max_output_size, "max_output_size")
    shapes = Shapes()
    boxes = shapes.check("boxes", boxes, "N 4")
    scores = shapes.check("scores", scores, "N")
    mask = jnp.ones(scores.shape, bool) if mask is None else shapes.check(
        "mask", mask, "N", kind="bool")
    check_scalar("iou_threshold", iou_threshold)
    if is_concrete(boxes, scores, iou_threshold, mask):
        check_nms_inputs(boxes, scores, iou_threshold)
        check_mask(mask, "mask")
    # Under jit, a NaN score marks its box invalid: NaN would sort above every real score.
    return _nms(boxes, scores, mask.astype(bool) & ~jnp.isnan(scores), iou_threshold,
                max_output_size)


@functools.partial(jax.jit, static_argnames="max_output_size")
def _nms(boxes, scores, mask, iou_threshold, max_output_size):
    num_boxes = scores.shape[0]
    if num_boxes == 0:
        return jnp.zeros(max_output_size, jnp.int32), jnp.zeros(max_output_size, bool)
    # lax.top_k breaks ties by lower index, i.e. it is a stable descending sort.
    _, order = lax.top_k(jnp.where(mask, scores, -jnp.inf), num_boxes)
    sorted_boxes = boxes[order]
    ious = iou(sorted_boxes, sorted_boxes)
    keep = _greedy_sweep(lambda i: ious[i], mask[order], iou_threshold)
    positions, valid = _kept_positions(keep, max_output_size)
    return jnp.where(valid, order[positions], 0).astype(jnp.int32), valid


def _greedy_sweep(iou_row, keep, iou_threshold):
    """keep[N] after greedy NMS of boxes already sorted by descending score.

    iou_row(i) is the [N] IoU of box i with every box. When step i runs, every
    box before i is final, so keep[i] is final too and box i may suppress the
    boxes after it. Steps stop after the last box valid on entry.
    """
    positions = jnp.arange(keep.shape[0])
    num_steps = jnp.max(jnp.where(keep, positions + 1, 0))

    def visit(state):
        i, keep = state
        suppressed = keep[i] & (iou_row(i) > iou_threshold) & (positions > i)
        return i + 1, keep & ~suppressed

    return lax.while_loop(lambda state: state[0] < num_steps, visit, (0, keep))[1]


def _kept_positions(keep, max_output_size):
    """(positions of the first max_output_size True entries of keep, 0 padded; valid mask)."""
    (positions,) = jnp.nonzero(keep, size=max_output_size, fill_value=0)
    return positions, jnp.arange(max_output_size) < keep.sum()


DETECT_STATIC = ("top_k", "pre_nms_top_k", "clip_boxes", "level_sizes", "drop_empty_boxes")


def detect(loc, conf_logits, priors, score_threshold=0.01, iou_threshold=0.45,
           top_k: int | None = 200, pre_nms_top_k: int | None = 400, *, clip_boxes: bool = True,
           level_sizes: tuple[int, ...] | None = None, drop_empty_boxes: bool = False):
    """Final detections of one image, padded to a fixed length (see `reference.nms.detect`
    for the rule and the options).

    Args:
      loc: [P, 4] predicted offsets.
      conf_logits: [P, C + 1] class logits, column 0 background.
      priors: [P, 4] center form (cx, cy, w, h).
      score_threshold: float in [0, 1]; a detection needs a score above it.
      iou_threshold: float in [0, 1]; per-class NMS threshold.
      top_k: static int, most detections returned; None: no cap.
      pre_nms_top_k: static int, most candidates per class (per map with `level_sizes`);
        None: no cap.
      clip_boxes: static bool, clip the decoded boxes to [0, 1] before NMS.
      level_sizes: static tuple of the priors of each feature map for mmdetection's per-map
        candidates, or None.
      drop_empty_boxes: static bool, drop candidates of zero width or height before NMS.

    Returns, K = `top_k`, or every candidate when top_k is None (C * min(pre_nms_top_k, P)
    per class, the sum of each map's min(pre_nms_top_k, P_map * C) per map):
      boxes: [K, 4] float32 corners.
      scores: [K] float32, descending; ties: lower class, then lower prior.
      labels: [K] int32 classes in 1..C.
      valid: [K] bool. Padding entries have box 0, score 0, label 0.
    """
    options = dict(top_k=top_k, pre_nms_top_k=pre_nms_top_k, clip_boxes=clip_boxes,
                   level_sizes=None if level_sizes is None else tuple(level_sizes),
                   drop_empty_boxes=drop_empty_boxes)
    loc, conf_logits, priors = _checked_detect_inputs(
        loc, conf_logits, priors, score_threshold, iou_threshold, top_k, pre_nms_top_k,
        level_sizes, batch="")
    return _detect(loc, conf_logits, priors, score_threshold, iou_threshold, **options)


def detect_batch(loc, conf_logits, priors, score_threshold=0.01, iou_threshold=0.45,
                 top_k: int | None = 200, pre_nms_top_k: int | None = 400, **options):
    """`detect` for a batch: loc [B, P, 4], conf_logits [B, P, C + 1], shared priors;
    `options` are `detect`'s keyword-only options.

    Returns boxes [B, K, 4], scores [B, K], labels [B, K], valid [B, K].
    """
    loc, conf_logits, priors = _checked_detect_inputs(
        loc, conf_logits, priors, score_threshold, iou_threshold, top_k, pre_nms_top_k,
        options.get("level_sizes"), batch="B ")
    return jax.vmap(functools.partial(detect, score_threshold=score_threshold,
                                      iou_threshold=iou_threshold, top_k=top_k,
                                      pre_nms_top_k=pre_nms_top_k, **options),
                    in_axes=(0, 0, None))(loc, conf_logits, priors)


def _checked_detect_inputs(loc, conf_logits, priors, score_threshold, iou_threshold, top_k,
                           pre_nms_top_k, level_sizes, *, batch: str):
    """(loc, conf_logits, priors) as JAX arrays: shapes and dtypes checked always (`batch` is
    "" or "B "), values when concrete (the reference's checks, priors with positive sizes)."""
    shapes = Shapes()
    priors = shapes.check("priors", priors, "P 4")
    check_not_empty("priors", shapes.size("P"), "prior")
    loc = shapes.check("loc", loc, batch + "P 4")
    conf_logits = shapes.check("conf_logits", conf_logits, batch + "P K")
    if shapes.size("K") < 2:
        raise ValueError("conf_logits needs C + 1 >= 2 entries (background and at least one "
                         f"class), got shape {conf_logits.shape}")
    check_scalar("score_threshold", score_threshold)
    check_scalar("iou_threshold", iou_threshold)
    if is_concrete(loc, conf_logits, priors, score_threshold, iou_threshold):
        check_detect_inputs(loc, conf_logits, priors, score_threshold, iou_threshold, top_k,
                            pre_nms_top_k, batch_dims=len(batch.split()),
                            level_sizes=level_sizes)
    return loc, conf_logits, priors


@functools.partial(jax.jit, static_argnames=DETECT_STATIC)
def _detect(loc, conf_logits, priors, score_threshold, iou_threshold, *, top_k, pre_nms_top_k,
            clip_boxes, level_sizes, drop_empty_boxes):
    probs = jax.nn.softmax(conf_logits, axis=-1)
    # A NaN score (from NaN logits) is never a detection, and as -inf it cannot push real
    # candidates out of a top_k either.
    probs = jnp.where(jnp.isnan(probs), -jnp.inf, probs)
    boxes = decode(loc, priors)
    if clip_boxes:
        boxes = jnp.clip(boxes, 0.0, 1.0)
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if level_sizes is None:
        prior_index, labels, scores = _nms_per_class(
            probs, boxes, nonempty if drop_empty_boxes else None, score_threshold,
            iou_threshold, pre_nms_top_k)
    else:
        prior_index, labels, scores = _nms_of_level_candidates(
            probs, boxes, nonempty if drop_empty_boxes else None, score_threshold,
            iou_threshold, pre_nms_top_k, level_sizes)
    # Class-major within equal scores (as both paths order their entries), so top_k's
    # lower-index tie rule prefers the lower class, then the lower prior.
    top_k = scores.size if top_k is None else top_k
    padding = max(0, top_k - scores.size)
    scores = jnp.pad(scores, (0, padding), constant_values=-jnp.inf)
    prior_index = jnp.pad(prior_index, (0, padding))
    labels = jnp.pad(labels, (0, padding))
    best, flat = lax.top_k(scores, top_k)
    valid = best > -jnp.inf
    return (jnp.where(valid[:, None], boxes[prior_index[flat]], 0.0),
            jnp.where(valid, best, 0.0),
            jnp.where(valid, labels[flat], 0).astype(jnp.int32),
            valid)


def _nms_per_class(probs, boxes, nonempty, score_threshold, iou_threshold, pre_nms_top_k):
    """Per class, the best `pre_nms_top_k` priors, then NMS. Returns flat (prior index,
    label, score) of [C * candidates], class-major, score -inf where nothing was kept."""
    num_priors = boxes.shape[0]
    candidates_per_class = min(pre_nms_top_k or num_priors, num_priors)

    def per_class(class_scores):
        # top_k before thresholding gives the same set as the reference's
        # threshold-then-sort, ties included (both prefer the lower prior index).
        scores, candidates = lax.top_k(class_scores, candidates_per_class)
        confident = scores > score_threshold
        if nonempty is not None:
            confident &= nonempty[candidates]
        # Already sorted. The sweep stops after the last confident candidate, so rows
        # computed as it goes cost less than a full matrix.
        sorted_boxes = boxes[candidates]
        keep = _greedy_sweep(lambda i: iou(sorted_boxes[i][None], sorted_boxes)[0],
                             confident, iou_threshold)
        kept, valid = _kept_positions(keep, candidates_per_class)
        return candidates[kept], jnp.where(valid, scores[kept], -jnp.inf)

    prior_index, scores = jax.vmap(per_class)(probs[:, 1:].T)  # [C, candidates_per_class]
    labels = jnp.broadcast_to(jnp.arange(1, probs.shape[1])[:, None], scores.shape)
    return prior_index.ravel(), labels.ravel(), scores.ravel()


def _nms_of_level_candidates(probs, boxes, nonempty, score_threshold, iou_threshold,
                             pre_nms_top_k, level_sizes):
    """mmdetection's candidates (each map's best `pre_nms_top_k` (prior, class) pairs), then
    one greedy sweep over all of them in which only boxes of the same class suppress each
    other. Returns (prior index, label, score), class-major, score -inf where not kept."""
    num_classes = probs.shape[1] - 1
    prior_index, labels, scores, start = [], [], [], 0
    for size in level_sizes:
        pairs = probs[start:start + size, 1:].ravel()  # prior-major (prior, class) pairs
        best, pair = lax.top_k(pairs, min(pre_nms_top_k or pairs.size, pairs.size))
        prior_index.append(start + pair // num_classes)
        labels.append(pair % num_classes + 1)
        scores.append(best)
        start += size
    prior_index, labels, scores = map(jnp.concatenate, (prior_index, labels, scores))
    confident = scores > score_threshold
    if nonempty is not None:
        confident &= nonempty[prior_index]
    # Sweep order: score descending, then prior (the reference's per-class order).
    _, _, order = lax.sort((jnp.where(confident, -scores, jnp.inf), prior_index,
                            jnp.arange(scores.size)), num_keys=2)
    sorted_boxes, sorted_labels = boxes[prior_index[order]], labels[order]

    def same_class_iou(i):
        return jnp.where(sorted_labels == sorted_labels[i],
                         iou(sorted_boxes[i][None], sorted_boxes)[0], 0.0)

    keep = _greedy_sweep(same_class_iou, confident[order], iou_threshold)
    kept_scores = jnp.where(keep, scores[order], -jnp.inf)
    # Class-major, then by score and prior: the order the final top_k's tie rule needs.
    _, _, _, position = lax.sort((sorted_labels, -kept_scores, prior_index[order],
                                  jnp.arange(scores.size)), num_keys=3)
    return prior_index[order][position], sorted_labels[position], kept_scores[position]
