"""Matching priors to ground truth: the paper's two-step rule (Caffe's bipartite step 1 and
torchvision's argmax shortcut), padding, and JAX == reference."""
import jax
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from reference import matching as reference_matching
from reference.boxes import center_to_corners, iou
from reference.priors import SSD300, PriorConfig, prior_boxes
from ssd_jax import boxes as jax_boxes
from ssd_jax import matching as jax_matching

# 3 maps (4x4, 2x2, 1x1): 92 priors, small enough for fast examples.
PRIORS = prior_boxes(PriorConfig.from_paper(
    image_size=64, feature_map_sizes=(4, 2, 1), aspect_ratios=((2,), (2, 3), (2,))))
PRIOR_CORNERS = center_to_corners(PRIORS)
G = 5  # ground-truth slots: every drawn image is padded to G so jit compiles once
THRESHOLD = 0.5


def reference_match(boxes, labels, mask, priors=PRIORS, **kwargs):
    return reference_matching.match(boxes[mask], labels[mask], priors, **kwargs)


def jax_match(boxes, labels, mask, priors=PRIORS, **kwargs):
    matched_boxes, matched_labels = jax_matching.match(boxes, labels, priors, gt_mask=mask,
                                                       **kwargs)
    return np.asarray(matched_boxes), np.asarray(matched_labels)


MATCHERS = [pytest.param(reference_match, id="reference"), pytest.param(jax_match, id="jax")]
RULES = reference_matching.RULES

# Corners on a 1/997 grid, which never lands on the priors' dyadic centers, so
# that exact IoU ties (mirror-image boxes) are rare.
GRID = 997


@st.composite
def padded_ground_truth(draw, batch=(), min_gts=0):
    """(boxes [*batch, G, 4] float32, labels [*batch, G] int32, mask [*batch, G] bool).

    Real rows hold boxes with sides >= 10 / GRID, half of them near a random
    prior (so that priors pass the threshold without being claimed), and labels
    in 1..20; padded rows hold zeros, as a data pipeline would pad them. About
    one row in three is a near-duplicate of the row before it (an exact copy or
    shifted by up to 2 / GRID per corner), as two annotators or a box and its
    shifted copy: such gts share their best prior.
    """
    shape = (*batch, G)
    low = draw(hnp.arrays(np.int64, (*shape, 2), elements=st.integers(0, GRID - 10)))
    size = draw(hnp.arrays(np.int64, (*shape, 2), elements=st.integers(10, GRID)))
    anywhere = np.concatenate([low, low + size], axis=-1)
    prior = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, len(PRIORS) - 1)))
    jitter = draw(hnp.arrays(np.int64, (*shape, 4), elements=st.integers(-40, 40)))
    near_prior = np.round(PRIOR_CORNERS[prior] * GRID) + jitter
    corners = np.where(draw(hnp.arrays(bool, (*shape, 1))), near_prior, anywhere)
    copy = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, 2))) == 0
    shift = draw(hnp.arrays(np.int64, (*shape, 4), elements=st.integers(-2, 2)))
    for g in range(1, G):
        corners[..., g, :] = np.where(copy[..., g, None], corners[..., g - 1, :] + shift[..., g, :],
                                      corners[..., g, :])
    low = np.clip(corners[..., :2], 0, GRID - 10)
    boxes = np.concatenate([low, np.clip(corners[..., 2:], low + 10, GRID)], axis=-1) / GRID
    labels = draw(hnp.arrays(np.int32, shape, elements=st.integers(1, 20)))
    mask = draw(hnp.arrays(bool, shape))
    mask[..., :min_gts] = True
    boxes = np.where(mask[..., None], boxes, 0.0).astype(np.float32)
    return boxes, np.where(mask, labels, 0).astype(np.int32), mask


def is_unambiguous(gt_boxes, rule="argmax", margin=1e-4):
    """False when float rounding could flip a decision of `rule` between the
    float64 reference and float32 JAX: a near-tie in step 1 (see
    `claims_are_unambiguous`), a prior's IoU near the threshold, or a near-tie
    between the best gts of a prior that the threshold makes positive. Exact
    copies of a gt tie exactly in both precisions, so they count as one."""
    if len(gt_boxes) == 0:
        return True
    overlaps = iou(gt_boxes, PRIOR_CORNERS)  # [G, P]
    by_gt = np.sort(iou(np.unique(gt_boxes, axis=0), PRIOR_CORNERS), axis=0)
    near_threshold = np.any(np.abs(by_gt[-1] - THRESHOLD) < margin)
    best_gts_tie = len(by_gt) > 1 and np.any(
        (by_gt[-1] > THRESHOLD) & (by_gt[-1] - by_gt[-2] < margin))
    return claims_are_unambiguous(overlaps, gt_boxes, rule, margin) and not (
        near_threshold or best_gts_tie)


def claims_are_unambiguous(overlaps, gt_boxes, rule, margin):
    """argmax: no gt has a near-tie for its best prior. bipartite: in every
    round of the greedy, the pairs within `margin` of the best are that same
    prior with copies of that same gt."""
    if rule == "argmax":
        by_prior = np.sort(overlaps, axis=1)
        return not np.any(by_prior[:, -1] - by_prior[:, -2] < margin)
    available = overlaps.copy()
    for _ in range(len(overlaps)):
        best = available.max()
        if best <= margin:
            return best <= 0
        gts, priors = np.nonzero(available > best - margin)
        if len(set(priors)) > 1 or len(np.unique(gt_boxes[gts], axis=0)) > 1:
            return False
        available[gts[0], :] = available[:, priors[0]] = -1
    return True


@pytest.mark.parametrize("rule", RULES)
@given(ground_truth=padded_ground_truth())
def test_jax_match_equals_reference(rule, ground_truth):
    boxes, labels, mask = ground_truth
    assume(is_unambiguous(boxes[mask], rule))
    expected_boxes, expected_labels = reference_match(boxes, labels, mask, rule=rule)
    matched_boxes, matched_labels = jax_match(boxes, labels, mask, rule=rule)
    np.testing.assert_array_equal(matched_labels, expected_labels)
    np.testing.assert_allclose(matched_boxes, expected_boxes, atol=1e-6)


@given(ground_truth=padded_ground_truth())
def test_jax_bipartite_claims_equal_the_reference_rule_on_the_same_overlaps_ties_included(
        ground_truth):
    # The reference rule on JAX's own float32 IoUs: every tie is the same tie in both.
    boxes, _, mask = ground_truth
    ids = np.arange(1, G + 1)
    # All G rows, padded ones too, so that the IoU compiles once.
    overlaps = np.asarray(jax_boxes.iou(boxes, PRIOR_CORNERS.astype(np.float32)))[mask]
    claimed_by = reference_matching.claim_priors(overlaps.astype(np.float64))
    _, matched_ids = jax_match(boxes, ids, mask, iou_threshold=1.0)  # claims only
    np.testing.assert_array_equal(matched_ids, np.append(ids[mask], 0)[claimed_by])  # -1: 0


def claims(match, boxes, mask, rule):
    """(overlaps [G', P] of the real gts, claimed_by [P]) as `match` decides them: with an
    IoU threshold of 1 only step 1 makes positives, and each gt's label is its row index."""
    real = boxes[mask]
    labels = np.zeros(G, np.int32)
    labels[mask] = np.arange(1, len(real) + 1)
    _, matched_labels = match(boxes, labels, mask, iou_threshold=1.0, rule=rule)
    return iou(real, PRIOR_CORNERS), matched_labels - 1


@pytest.mark.parametrize("match", MATCHERS)
@given(ground_truth=padded_ground_truth(min_gts=1))
def test_bipartite_gives_every_gt_a_prior_of_its_own(match, ground_truth):
    boxes, _, mask = ground_truth
    assume(is_unambiguous(boxes[mask], "bipartite"))
    overlaps, claimed_by = claims(match, boxes, mask, "bipartite")
    owners = claimed_by[claimed_by >= 0]
    assert len(set(owners)) == len(owners), "a gt owns at most one prior from step 1"
    for gt in set(range(len(overlaps))) - set(owners):
        # Left out only when other gts took every prior overlapping it (copies of a
        # small box may outnumber those priors).
        assert np.all(claimed_by[overlaps[gt] > 0] >= 0)


@pytest.mark.parametrize("match", MATCHERS)
@given(ground_truth=padded_ground_truth(min_gts=1))
def test_bipartite_leaves_no_gt_wanting_a_prior_its_owner_overlaps_less(match, ground_truth):
    # The greedy order: a prior a gt prefers to its own went to a gt overlapping it at least
    # as much; so did every prior overlapping a gt left without one.
    boxes, _, mask = ground_truth
    assume(is_unambiguous(boxes[mask], "bipartite"))
    overlaps, claimed_by = claims(match, boxes, mask, "bipartite")
    for gt, row in enumerate(overlaps):
        own = np.flatnonzero(claimed_by == gt)
        own_overlap = row[own[0]] if own.size else 0.0
        preferred = np.flatnonzero(row > own_overlap)
        owners = claimed_by[preferred]
        assert np.all(owners >= 0), "a preferred prior is free"
        assert np.all(overlaps[owners, preferred] >= row[preferred])


@pytest.mark.parametrize("match", MATCHERS)
@given(ground_truth=padded_ground_truth(min_gts=1))
def test_argmax_gt_keeps_its_best_prior_unless_a_later_gt_claims_it(match, ground_truth):
    boxes, labels, mask = ground_truth
    real_boxes, real_labels = boxes[mask], labels[mask]
    assume(is_unambiguous(real_boxes, "argmax"))
    matched_boxes, matched_labels = match(boxes, labels, mask, rule="argmax")
    best_priors = iou(real_boxes, PRIOR_CORNERS).argmax(axis=1)
    for prior in best_priors:
        winner = np.flatnonzero(best_priors == prior).max()  # the latest claimant
        assert matched_labels[prior] == real_labels[winner]
        np.testing.assert_allclose(matched_boxes[prior], real_boxes[winner], atol=1e-6)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("match", MATCHERS)
@given(ground_truth=padded_ground_truth(min_gts=1))
def test_priors_above_threshold_take_their_best_gt_and_the_rest_are_background(
        match, rule, ground_truth):
    boxes, labels, mask = ground_truth
    real_boxes, real_labels = boxes[mask], labels[mask]
    assume(is_unambiguous(real_boxes, rule))
    matched_boxes, matched_labels = match(boxes, labels, mask, rule=rule)
    overlaps = iou(real_boxes, PRIOR_CORNERS)  # [G, P]
    claimed = reference_matching.claim_priors(overlaps, rule) >= 0
    above = overlaps.max(axis=0) >= THRESHOLD
    positive = matched_labels > 0
    np.testing.assert_array_equal(positive, claimed | above)
    best_gt = overlaps.argmax(axis=0)
    unclaimed = above & ~claimed
    np.testing.assert_array_equal(matched_labels[unclaimed], real_labels[best_gt[unclaimed]])
    np.testing.assert_allclose(matched_boxes[unclaimed], real_boxes[best_gt[unclaimed]],
                               atol=1e-6)
    np.testing.assert_allclose(matched_boxes[~positive], PRIOR_CORNERS[~positive], atol=1e-6)


@pytest.mark.parametrize("rule", RULES)
@given(ground_truth=padded_ground_truth(), padding_prior=st.integers(0, len(PRIORS) - 1))
def test_padded_gts_never_claim_or_take_a_prior(rule, ground_truth, padding_prior):
    boxes, labels, mask = ground_truth
    assume(is_unambiguous(boxes[mask], rule))
    # Padded rows that would win a prior outright (IoU 1), with a label of their own.
    boxes = np.where(mask[:, None], boxes, PRIOR_CORNERS[padding_prior]).astype(np.float32)
    labels = np.where(mask, labels, 99)
    matched_boxes, matched_labels = jax_match(boxes, labels, mask, rule=rule)
    assert 99 not in matched_labels
    np.testing.assert_array_equal(matched_labels,
                                  reference_match(boxes, labels, mask, rule=rule)[1])


@pytest.mark.parametrize("match", MATCHERS)
def test_no_ground_truth_gives_all_background(match):
    for slots in (0, G):  # no slots at all, or only padded ones
        boxes, labels, mask = np.zeros((slots, 4)), np.zeros(slots, int), np.zeros(slots, bool)
        matched_boxes, matched_labels = match(boxes, labels, mask)
        np.testing.assert_array_equal(matched_labels, 0)
        np.testing.assert_allclose(matched_boxes, PRIOR_CORNERS, atol=1e-6)


@pytest.mark.parametrize("build_targets", [reference_matching.build_targets,
                                           jax.jit(jax_matching.build_targets)],
                         ids=["reference", "jax"])
def test_no_ground_truth_gives_zero_targets(build_targets):
    loc_target, labels = build_targets(np.zeros((2, G, 4)), np.zeros((2, G), int),
                                       np.zeros((2, G), bool), PRIORS)
    np.testing.assert_allclose(loc_target, 0.0, atol=1e-5)
    np.testing.assert_array_equal(labels, 0)


@pytest.mark.parametrize("match", MATCHERS)
def test_two_copies_of_a_box_share_its_best_prior_differently_under_each_rule(match):
    # Two copies of the 1x1 map's first prior: both want prior 88.
    box = PRIOR_CORNERS[88].astype(np.float32)
    boxes, labels, mask = np.stack([box, box]), np.array([1, 2]), np.array([True, True])
    above = np.flatnonzero(iou(box[None], PRIOR_CORNERS)[0] >= THRESHOLD)
    others = above[above != 88]
    assert len(others) > 0
    # argmax: the second copy overwrites the first's claim, which is left with none
    # of its own; the other priors above the threshold tie and take the first copy.
    _, argmax_labels = match(boxes, labels, mask, rule="argmax")
    assert argmax_labels[88] == 2
    np.testing.assert_array_equal(argmax_labels[others], 1)
    # bipartite: the first copy (lowest gt index of the tie) gets prior 88, the second
    # the next best prior, which is one of the others; the rest take the first copy.
    overlaps = iou(box[None], PRIOR_CORNERS)[0]
    overlaps[88] = -1
    second_best = overlaps.argmax()
    _, bipartite_labels = match(boxes, labels, mask, rule="bipartite")
    assert bipartite_labels[88] == 1 and bipartite_labels[second_best] == 2
    np.testing.assert_array_equal(bipartite_labels[others[others != second_best]], 1)


@pytest.mark.parametrize("match", MATCHERS)
def test_threshold_is_inclusive(match):
    gt = np.array([[0.0, 0.0, 0.5, 0.25]], np.float32)
    priors = np.array([[0.25, 0.125, 0.5, 0.25],    # the gt itself: claimed
                       [0.25, 0.25, 0.5, 0.5],      # IoU exactly 0.5
                       [0.25, 0.25, 0.5, 0.53125],  # IoU 0.47
                       [0.75, 0.75, 0.5, 0.5]],     # disjoint
                      np.float32)
    _, labels = match(gt, np.array([3]), np.array([True]), priors=priors)
    np.testing.assert_array_equal(labels, [3, 3, 0, 0])


@pytest.mark.parametrize("rule", RULES)
@given(ground_truth=padded_ground_truth(batch=(3,)))
def test_jitted_and_vmapped_jax_targets_equal_reference_build_targets(rule, ground_truth):
    boxes, labels, mask = ground_truth
    assume(all(is_unambiguous(b[m], rule) for b, m in zip(boxes, mask)))
    expected_loc, expected_labels = reference_matching.build_targets(boxes, labels, mask, PRIORS,
                                                                     rule=rule)
    build_targets = jax.jit(jax_matching.build_targets, static_argnames="rule")
    loc_target, target_labels = build_targets(boxes, labels, mask, PRIORS, rule=rule)
    np.testing.assert_array_equal(target_labels, expected_labels)
    np.testing.assert_allclose(loc_target, expected_loc, atol=1e-4)
    np.testing.assert_allclose(loc_target[expected_labels == 0], 0.0, atol=1e-5)
    vmapped_labels = jax.vmap(
        lambda b, l, m: jax_matching.match(b, l, PRIORS, gt_mask=m, rule=rule)[1])(
            boxes, labels, mask)
    np.testing.assert_array_equal(vmapped_labels, expected_labels)


def test_ssd300_targets_match_reference_and_every_gt_gets_a_prior():
    priors = prior_boxes(SSD300)
    boxes = np.zeros((2, 6, 4), np.float32)
    boxes[0, :4] = [[0.137, 0.211, 0.418, 0.563], [0.512, 0.233, 0.887, 0.914],
                    [0.452, 0.447, 0.561, 0.539], [0.051, 0.613, 0.122, 0.931]]
    boxes[1, :1] = [[0.013, 0.029, 0.987, 0.962]]
    labels = np.array([[4, 9, 15, 2, 0, 0], [20, 0, 0, 0, 0, 0]], np.int32)
    mask = labels > 0
    expected_loc, expected_labels = reference_matching.build_targets(
        boxes, labels, mask, priors, num_classes=20)
    loc_target, target_labels = jax.jit(jax_matching.build_targets)(boxes, labels, mask, priors)
    np.testing.assert_array_equal(target_labels, expected_labels)
    np.testing.assert_allclose(loc_target, expected_loc, atol=1e-4)
    for image in range(2):
        assert set(expected_labels[image][expected_labels[image] > 0]) == set(
            labels[image][mask[image]])


def test_ssd300_near_duplicate_pairs_each_keep_a_prior_only_under_bipartite():
    # A box and its copy shifted by up to 1% of the image, as from two annotators.
    priors = prior_boxes(SSD300)
    rng = np.random.default_rng(0)
    boxes = np.zeros((30, 2, 4), np.float32)
    centres, half_sides = rng.uniform(0.1, 0.9, (30, 2)), rng.uniform(0.03, 0.3, (30, 2))
    boxes[:, 0] = np.clip(np.concatenate([centres - half_sides, centres + half_sides], 1), 0, 1)
    boxes[:, 1] = np.clip(boxes[:, 0] + rng.uniform(-0.01, 0.01, (30, 4)), 0, 1)
    ids, mask = np.tile([1, 2], (30, 1)), np.ones((30, 2), bool)
    jax_targets = jax.jit(jax_matching.build_targets, static_argnames="rule")
    for build_targets in (reference_matching.build_targets, jax_targets):
        without_prior = {}
        for rule in RULES:
            # SSD300's priors tie exactly for large boxes (several contain them), and float32
            # breaks such ties otherwise than float64: each implementation is checked alone.
            _, labels = build_targets(boxes, ids, mask, priors, iou_threshold=1.0, rule=rule)
            without_prior[rule] = sum(len({1, 2} - set(row)) for row in np.asarray(labels))
        assert without_prior["bipartite"] == 0
        assert without_prior["argmax"] > 0


GT_BOXES = np.array([[0.113, 0.127, 0.418, 0.532], [0.307, 0.221, 0.893, 0.716]], np.float32)
GT_LABELS = np.array([1, 2])
BAD_MATCH_INPUTS = {
    "nan_box": dict(gt_boxes=np.array([[0.1, np.nan, 0.4, 0.5]])),
    "inf_box": dict(gt_boxes=np.array([[0.1, 0.1, np.inf, 0.5]])),
    "xmax_below_xmin": dict(gt_boxes=np.array([[0.4, 0.1, 0.1, 0.5], [0.3, 0.2, 0.9, 0.7]])),
    "zero_height": dict(gt_boxes=np.array([[0.1, 0.5, 0.4, 0.5], [0.3, 0.2, 0.9, 0.7]])),
    "three_coordinates": dict(gt_boxes=GT_BOXES[:, :3]),
    "one_label_short": dict(gt_labels=GT_LABELS[:1]),
    "background_label": dict(gt_labels=np.array([0, 2])),
    "negative_label": dict(gt_labels=np.array([1, -1])),
    "label_above_num_classes": dict(gt_labels=np.array([1, 4]), num_classes=3),
    "fractional_label": dict(gt_labels=np.array([1.0, 1.5])),
    "priors_three_columns": dict(priors=PRIORS[:, :3]),
    "nan_prior": dict(priors=np.where(np.arange(len(PRIORS))[:, None] == 7, np.nan, PRIORS)),
    "threshold_above_one": dict(iou_threshold=1.5),
    "negative_threshold": dict(iou_threshold=-0.1),
    "unknown_rule": dict(rule="hungarian"),
}


@pytest.mark.parametrize("matching", [reference_matching, jax_matching],
                         ids=["reference", "jax"])
@pytest.mark.parametrize("bad", BAD_MATCH_INPUTS.values(), ids=BAD_MATCH_INPUTS.keys())
def test_bad_match_inputs_raise_value_error(matching, bad):
    inputs = dict(gt_boxes=GT_BOXES, gt_labels=GT_LABELS, priors=PRIORS) | bad
    with pytest.raises(ValueError):
        matching.match(**inputs)


@pytest.mark.parametrize("matching", [reference_matching, jax_matching],
                         ids=["reference", "jax"])
@pytest.mark.parametrize("bad", BAD_MATCH_INPUTS.values(), ids=BAD_MATCH_INPUTS.keys())
def test_bad_build_targets_inputs_raise_value_error(matching, bad):
    inputs = dict(gt_boxes=GT_BOXES, gt_labels=GT_LABELS, priors=PRIORS) | bad
    batched = dict(inputs, gt_boxes=np.asarray(inputs["gt_boxes"])[None],
                   gt_labels=np.asarray(inputs["gt_labels"])[None],
                   gt_mask=np.ones((1, len(inputs["gt_labels"])), bool))
    with pytest.raises(ValueError):
        matching.build_targets(**batched)


def test_jax_match_rejects_a_mask_of_the_wrong_shape():
    with pytest.raises(ValueError, match="gt_mask"):
        jax_matching.match(GT_BOXES, GT_LABELS, PRIORS, gt_mask=np.ones(3, bool))


@pytest.mark.parametrize("matching", [reference_matching, jax_matching],
                         ids=["reference", "jax"])
def test_bad_variances_raise_value_error(matching):
    with pytest.raises(ValueError, match="variances"):
        matching.build_targets(GT_BOXES[None], GT_LABELS[None], np.ones((1, 2), bool), PRIORS,
                               variances=(0.1, 0.0))


def test_padded_rows_are_not_validated():
    assert is_unambiguous(GT_BOXES)
    # Degenerate boxes and background labels are fine where the mask is False.
    boxes = np.concatenate([GT_BOXES, [[0.5, 0.5, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0]]])
    labels = np.array([1, 2, 0, -1])
    mask = np.array([True, True, False, False])
    _, matched_labels = jax_matching.match(boxes, labels, PRIORS, gt_mask=mask)
    _, expected_labels = reference_matching.match(GT_BOXES, GT_LABELS, PRIORS)
    np.testing.assert_array_equal(matched_labels, expected_labels)
    for matching in (reference_matching, jax_matching):
        _, target_labels = matching.build_targets(boxes[None], labels[None], mask[None], PRIORS)
        np.testing.assert_array_equal(target_labels[0], expected_labels)
