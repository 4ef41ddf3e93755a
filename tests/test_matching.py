"""Matching priors to ground truth: the paper's two-step rule, padding, and JAX == reference."""
import jax
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from reference import matching as reference_matching
from reference.boxes import center_to_corners, iou
from reference.priors import SSD300, PriorConfig, prior_boxes
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

# Corners on a 1/997 grid, which never lands on the priors' dyadic centers, so
# that exact IoU ties (mirror-image boxes) are rare.
GRID = 997


@st.composite
def padded_ground_truth(draw, batch=(), min_gts=0):
    """(boxes [*batch, G, 4] float32, labels [*batch, G] int32, mask [*batch, G] bool).

    Real rows hold boxes with sides >= 10 / GRID, half of them near a random
    prior (so that priors pass the threshold without being claimed), and labels
    in 1..20; padded rows hold zeros, as a data pipeline would pad them.
    """
    shape = (*batch, G)
    low = draw(hnp.arrays(np.int64, (*shape, 2), elements=st.integers(0, GRID - 10)))
    size = draw(hnp.arrays(np.int64, (*shape, 2), elements=st.integers(10, GRID)))
    anywhere = np.concatenate([low, low + size], axis=-1)
    prior = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, len(PRIORS) - 1)))
    jitter = draw(hnp.arrays(np.int64, (*shape, 4), elements=st.integers(-40, 40)))
    near_prior = np.round(PRIOR_CORNERS[prior] * GRID) + jitter
    corners = np.where(draw(hnp.arrays(bool, (*shape, 1))), near_prior, anywhere)
    low = np.clip(corners[..., :2], 0, GRID - 10)
    boxes = np.concatenate([low, np.clip(corners[..., 2:], low + 10, GRID)], axis=-1) / GRID
    labels = draw(hnp.arrays(np.int32, shape, elements=st.integers(1, 20)))
    mask = draw(hnp.arrays(bool, shape))
    mask[..., :min_gts] = True
    boxes = np.where(mask[..., None], boxes, 0.0).astype(np.float32)
    return boxes, np.where(mask, labels, 0).astype(np.int32), mask


def is_unambiguous(gt_boxes, margin=1e-4):
    """False when float rounding could flip a decision: a near-tie for some gt's
    best prior, a prior's IoU near the threshold, or a near-tie between the best
    gts of a prior that the threshold makes positive."""
    if len(gt_boxes) == 0:
        return True
    overlaps = np.sort(iou(gt_boxes, PRIOR_CORNERS), axis=1)  # [G, P]
    best_priors_tie = np.any(overlaps[:, -1] - overlaps[:, -2] < margin)
    by_gt = np.sort(iou(gt_boxes, PRIOR_CORNERS), axis=0)
    near_threshold = np.any(np.abs(by_gt[-1] - THRESHOLD) < margin)
    best_gts_tie = len(gt_boxes) > 1 and np.any(
        (by_gt[-1] > THRESHOLD) & (by_gt[-1] - by_gt[-2] < margin))
    return not (best_priors_tie or near_threshold or best_gts_tie)


@given(ground_truth=padded_ground_truth())
def test_jax_match_equals_reference(ground_truth):
    boxes, labels, mask = ground_truth
    assume(is_unambiguous(boxes[mask]))
    expected_boxes, expected_labels = reference_match(boxes, labels, mask)
    matched_boxes, matched_labels = jax_match(boxes, labels, mask)
    np.testing.assert_array_equal(matched_labels, expected_labels)
    np.testing.assert_allclose(matched_boxes, expected_boxes, atol=1e-6)


@pytest.mark.parametrize("match", MATCHERS)
@given(ground_truth=padded_ground_truth(min_gts=1))
def test_every_gt_keeps_its_best_prior_unless_a_later_gt_claims_it(match, ground_truth):
    boxes, labels, mask = ground_truth
    real_boxes, real_labels = boxes[mask], labels[mask]
    assume(is_unambiguous(real_boxes))
    matched_boxes, matched_labels = match(boxes, labels, mask)
    best_priors = iou(real_boxes, PRIOR_CORNERS).argmax(axis=1)
    for prior in best_priors:
        winner = np.flatnonzero(best_priors == prior).max()  # the latest claimant
        assert matched_labels[prior] == real_labels[winner]
        np.testing.assert_allclose(matched_boxes[prior], real_boxes[winner], atol=1e-6)


@pytest.mark.parametrize("match", MATCHERS)
@given(ground_truth=padded_ground_truth(min_gts=1))
def test_priors_above_threshold_take_their_best_gt_and_the_rest_are_background(
        match, ground_truth):
    boxes, labels, mask = ground_truth
    real_boxes, real_labels = boxes[mask], labels[mask]
    assume(is_unambiguous(real_boxes))
    matched_boxes, matched_labels = match(boxes, labels, mask)
    overlaps = iou(real_boxes, PRIOR_CORNERS)  # [G, P]
    claimed = np.zeros(len(PRIORS), bool)
    claimed[overlaps.argmax(axis=1)] = True
    above = overlaps.max(axis=0) >= THRESHOLD
    positive = matched_labels > 0
    np.testing.assert_array_equal(positive, claimed | above)
    best_gt = overlaps.argmax(axis=0)
    unclaimed = above & ~claimed
    np.testing.assert_array_equal(matched_labels[unclaimed], real_labels[best_gt[unclaimed]])
    np.testing.assert_allclose(matched_boxes[unclaimed], real_boxes[best_gt[unclaimed]],
                               atol=1e-6)
    np.testing.assert_allclose(matched_boxes[~positive], PRIOR_CORNERS[~positive], atol=1e-6)


@given(ground_truth=padded_ground_truth(), padding_prior=st.integers(0, len(PRIORS) - 1))
def test_padded_gts_never_claim_or_take_a_prior(ground_truth, padding_prior):
    boxes, labels, mask = ground_truth
    assume(is_unambiguous(boxes[mask]))
    # Padded rows that would win a prior outright (IoU 1), with a label of their own.
    boxes = np.where(mask[:, None], boxes, PRIOR_CORNERS[padding_prior]).astype(np.float32)
    labels = np.where(mask, labels, 99)
    matched_boxes, matched_labels = jax_match(boxes, labels, mask)
    assert 99 not in matched_labels
    np.testing.assert_array_equal(matched_labels, reference_match(boxes, labels, mask)[1])


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
def test_later_gt_wins_a_shared_best_prior_and_ties_go_to_the_lowest_index(match):
    # Two copies of the 1x1 map's first prior: both claim it, the second wins;
    # the other priors above the threshold tie between them and take the first.
    box = PRIOR_CORNERS[88].astype(np.float32)
    matched_boxes, matched_labels = match(np.stack([box, box]), np.array([1, 2]),
                                          np.array([True, True]))
    assert matched_labels[88] == 2
    others = np.flatnonzero(iou(box[None], PRIOR_CORNERS)[0] >= THRESHOLD)
    others = others[others != 88]
    assert len(others) > 0
    np.testing.assert_array_equal(matched_labels[others], 1)


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


@given(ground_truth=padded_ground_truth(batch=(3,)))
def test_jitted_and_vmapped_jax_targets_equal_reference_build_targets(ground_truth):
    boxes, labels, mask = ground_truth
    assume(all(is_unambiguous(b[m]) for b, m in zip(boxes, mask)))
    expected_loc, expected_labels = reference_matching.build_targets(boxes, labels, mask, PRIORS)
    loc_target, target_labels = jax.jit(jax_matching.build_targets)(boxes, labels, mask, PRIORS)
    np.testing.assert_array_equal(target_labels, expected_labels)
    np.testing.assert_allclose(loc_target, expected_loc, atol=1e-4)
    np.testing.assert_allclose(loc_target[expected_labels == 0], 0.0, atol=1e-5)
    vmapped_labels = jax.vmap(
        lambda b, l, m: jax_matching.match(b, l, PRIORS, gt_mask=m)[1])(boxes, labels, mask)
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
