"""NMS and detection output: JAX twins against the NumPy reference, plus the
properties greedy NMS guarantees whichever implementation runs it."""
import functools

import jax
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from reference import nms as reference_nms
from reference.boxes import iou
from reference.encoding import decode
from reference.loss import log_softmax
from reference.priors import SSD300, PriorConfig, prior_boxes
from ssd_jax import nms as jax_nms

MAX_BOXES = 12  # JAX nms inputs are padded to this many boxes: one compilation.

# Detection tests: 38 small priors, C = 3, both cutoffs smaller than what is available.
SMALL_PRIORS = prior_boxes(PriorConfig.from_paper(
    image_size=60, feature_map_sizes=(3, 1), aspect_ratios=((2,), ())))
NUM_CLASSES = 3
TOP_K = 12
PRE_NMS_TOP_K = 6


def jax_nms_kept(boxes, scores, iou_threshold):
    """Kept indices from the JAX nms, inputs padded to MAX_BOXES.

    The padding is hostile: copies of real boxes that outscore every real box,
    masked out, so a mask that leaked would change the result.
    """
    n = len(boxes)
    pad = MAX_BOXES - n
    pad_boxes = boxes[np.arange(pad) % n] if n else np.zeros((pad, 4), np.float32)
    pad_scores = np.full(pad, np.max(scores, initial=0) + 1, np.float32)
    indices, valid = jax_nms.nms(
        np.concatenate([boxes, pad_boxes]), np.concatenate([scores, pad_scores]),
        iou_threshold, MAX_BOXES, mask=np.arange(MAX_BOXES) < n)
    return np.asarray(indices)[np.asarray(valid)]


NMS_IMPLEMENTATIONS = {"reference": reference_nms.nms, "jax": jax_nms_kept}
implementations = pytest.mark.parametrize("nms", NMS_IMPLEMENTATIONS.values(),
                                          ids=NMS_IMPLEMENTATIONS.keys())


@st.composite
def boxes_and_scores(draw, unique_scores=False):
    """[n, 4] float32 corners in [0, 1] (some degenerate) and [n] float32 scores."""
    n = draw(st.integers(0, MAX_BOXES))
    points = draw(arrays(np.float32, (n, 2, 2), elements=st.floats(0, 1, width=32)))
    boxes = np.concatenate([points.min(axis=1), points.max(axis=1)], axis=1)
    # Few distinct values unless asked otherwise, so equal scores are common.
    elements = st.floats(-10, 10, width=32) if unique_scores else st.sampled_from([0.0, 0.5, 1.0])
    scores = draw(arrays(np.float32, (n,), elements=elements, unique=unique_scores))
    return boxes, scores


thresholds = st.floats(0, 1)


def assume_no_iou_near(boxes, threshold, tolerance=1e-4):
    """float32 and float64 may disagree on which side of the threshold an IoU is,
    except for IoU 0 (disjoint) and 1 (identical boxes), exact in both."""
    overlaps = iou(boxes, boxes)
    inexact = (overlaps > 0) & (overlaps < 1)
    assume(not np.any(inexact & (np.abs(overlaps - threshold) < tolerance)))


@given(boxes_and_scores(unique_scores=True), thresholds)
def test_jax_nms_keeps_the_same_boxes_as_reference(data, iou_threshold):
    boxes, scores = data
    assume_no_iou_near(boxes, iou_threshold)
    np.testing.assert_array_equal(jax_nms_kept(boxes, scores, iou_threshold),
                                  reference_nms.nms(boxes, scores, iou_threshold))


@implementations
@given(data=boxes_and_scores(), iou_threshold=thresholds)
def test_nms_keeps_a_sorted_subset_without_overlaps_above_threshold(nms, data, iou_threshold):
    boxes, scores = data
    kept = nms(boxes, scores, iou_threshold)
    assert len(set(kept.tolist())) == len(kept)
    assert np.all((0 <= kept) & (kept < len(boxes)))
    # Descending score; equal scores in index order.
    order = sorted(kept, key=lambda i: (-scores[i], i))
    np.testing.assert_array_equal(kept, order)
    overlaps = iou(boxes[kept], boxes[kept])
    np.fill_diagonal(overlaps, 0.0)
    assert np.all(overlaps <= iou_threshold + 1e-6)


@implementations
@given(data=boxes_and_scores(), iou_threshold=thresholds)
def test_nms_drops_only_boxes_overlapping_a_better_kept_box(nms, data, iou_threshold):
    boxes, scores = data
    kept = nms(boxes, scores, iou_threshold)
    rank = {i: (-scores[i], i) for i in range(len(boxes))}
    for dropped in set(range(len(boxes))) - set(kept.tolist()):
        suppressors = [k for k in kept if rank[k] < rank[dropped]]
        assert suppressors and iou(boxes[[dropped]], boxes[suppressors]).max() > iou_threshold - 1e-6


@implementations
@given(data=boxes_and_scores())
def test_nms_with_threshold_one_keeps_every_box(nms, data):
    boxes, scores = data
    kept = nms(boxes, scores, 1.0)
    np.testing.assert_array_equal(kept, sorted(range(len(boxes)), key=lambda i: (-scores[i], i)))


@implementations
@given(data=boxes_and_scores(), iou_threshold=thresholds)
def test_nms_is_idempotent(nms, data, iou_threshold):
    boxes, scores = data
    kept = nms(boxes, scores, iou_threshold)
    again = nms(boxes[kept], scores[kept], iou_threshold)
    np.testing.assert_array_equal(again, np.arange(len(kept)))


@implementations
@pytest.mark.parametrize("width", [0.125, 0.25, 0.5, 0.75])
def test_nms_keeps_a_box_whose_iou_equals_the_threshold(nms, width):
    # IoU([0,0,1,1], [0,0,w,1]) = w exactly, in float32 and float64.
    boxes = np.array([[0, 0, 1, 1], [0, 0, width, 1]], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    np.testing.assert_array_equal(nms(boxes, scores, width), [0, 1])
    np.testing.assert_array_equal(nms(boxes, scores, np.nextafter(np.float32(width), np.float32(0))), [0])


def test_jax_nms_of_no_boxes_is_all_padding():
    indices, valid = jax_nms.nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5, 3)
    np.testing.assert_array_equal(indices, [0, 0, 0])
    assert not np.any(valid)


@st.composite
def raw_outputs(draw):
    """Random (loc [P, 4], conf_logits [P, C + 1]) for SMALL_PRIORS, float32."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    loc = rng.normal(size=(len(SMALL_PRIORS), 4)).astype(np.float32)
    conf_logits = rng.normal(scale=2.0, size=(len(SMALL_PRIORS), NUM_CLASSES + 1))
    return loc, conf_logits.astype(np.float32)


def assume_no_near_ties(loc, conf_logits, score_threshold, iou_threshold, clip_boxes=True):
    """Rejects inputs where float32 rounding could flip a comparison the reference makes."""
    scores = np.sort(np.exp(log_softmax(conf_logits.astype(np.float64)))[:, 1:].ravel())
    assume(np.all(np.diff(scores) > 1e-6) and np.all(np.abs(scores - score_threshold) > 1e-6))
    boxes = decode(loc, SMALL_PRIORS)
    boxes = np.clip(boxes, 0.0, 1.0) if clip_boxes else boxes
    assume_no_iou_near(boxes, iou_threshold, tolerance=1e-5)


def jax_detect_unpadded(loc, conf_logits, priors, score_threshold, iou_threshold, **sizes):
    boxes, scores, labels, valid = map(np.asarray, jax_nms.detect(
        loc, conf_logits, priors, score_threshold, iou_threshold, **sizes))
    n = valid.sum()
    assert np.all(valid[:n]) and not np.any(valid[n:]), "valid entries come first"
    assert np.all(boxes[n:] == 0) and np.all(scores[n:] == 0) and np.all(labels[n:] == 0)
    return boxes[:n], scores[:n], labels[:n]


def assert_same_detections(actual, expected):
    boxes, scores, labels = actual
    expected_boxes, expected_scores, expected_labels = expected
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-6)
    np.testing.assert_allclose(boxes, expected_boxes, atol=1e-5)


detect_thresholds = dict(score_threshold=st.floats(0, 0.6), iou_threshold=st.floats(0.05, 0.95))


@given(outputs=raw_outputs(), **detect_thresholds)
def test_jax_detect_matches_reference(outputs, score_threshold, iou_threshold):
    loc, conf_logits = outputs
    assume_no_near_ties(loc, conf_logits, score_threshold, iou_threshold)
    sizes = dict(top_k=TOP_K, pre_nms_top_k=PRE_NMS_TOP_K)
    assert_same_detections(
        jax_detect_unpadded(loc, conf_logits, SMALL_PRIORS, score_threshold, iou_threshold, **sizes),
        reference_nms.detect(loc, conf_logits, SMALL_PRIORS, score_threshold, iou_threshold, **sizes))


@settings(max_examples=30)
@given(outputs=raw_outputs(), **detect_thresholds)
def test_detect_returns_confident_sorted_clipped_boxes_without_same_class_overlaps(
        outputs, score_threshold, iou_threshold):
    loc, conf_logits = outputs
    sizes = dict(top_k=TOP_K, pre_nms_top_k=PRE_NMS_TOP_K)
    boxes, scores, labels = jax_detect_unpadded(
        loc, conf_logits, SMALL_PRIORS, score_threshold, iou_threshold, **sizes)
    assert len(scores) <= TOP_K
    assert np.all(np.diff(scores) <= 0) and np.all(scores > np.float32(score_threshold))
    assert np.all((1 <= labels) & (labels <= NUM_CLASSES))
    assert np.all((0 <= boxes) & (boxes <= 1))
    for c in range(1, NUM_CLASSES + 1):
        assert np.sum(labels == c) <= PRE_NMS_TOP_K
        overlaps = iou(boxes[labels == c], boxes[labels == c])
        np.fill_diagonal(overlaps, 0.0)
        assert np.all(overlaps <= iou_threshold + 1e-6)


@pytest.mark.parametrize("detect", [reference_nms.detect, jax_detect_unpadded],
                         ids=["reference", "jax"])
def test_detect_breaks_score_ties_by_class_then_prior(detect):
    priors = np.array([[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2]], np.float32)
    conf_logits = np.array([[0, 2, 2], [0, 2, 2]], np.float32)  # four equal scores
    boxes, scores, labels = detect(np.zeros((2, 4), np.float32), conf_logits, priors, 0.01, 0.45)
    np.testing.assert_array_equal(labels, [1, 1, 2, 2])
    np.testing.assert_allclose(boxes, decode(np.zeros((2, 4)), priors)[[0, 1, 0, 1]], atol=1e-6)
    assert len(set(scores.tolist())) == 1


@pytest.mark.parametrize("detect", [reference_nms.detect, jax_detect_unpadded],
                         ids=["reference", "jax"])
def test_detect_drops_a_score_equal_to_the_threshold(detect):
    priors = np.array([[0.5, 0.5, 0.2, 0.2]], np.float32)
    conf_logits = np.zeros((1, 2), np.float32)  # score exactly 0.5
    for score_threshold, expected in ((0.5, 0), (np.nextafter(np.float32(0.5), np.float32(0)), 1)):
        _, scores, _ = detect(np.zeros((1, 4), np.float32), conf_logits, priors, score_threshold,
                              0.45)
        assert len(scores) == expected


def test_jax_detect_matches_reference_on_ssd300_priors_with_21_classes():
    priors = prior_boxes(SSD300)
    rng = np.random.default_rng(0)
    loc = rng.normal(size=(len(priors), 4)).astype(np.float32)
    conf_logits = rng.normal(scale=3.0, size=(len(priors), 21)).astype(np.float32)
    expected = reference_nms.detect(loc, conf_logits, priors)
    assert len(expected[1]) == 200  # the top_k cut is exercised
    assert_same_detections(jax_detect_unpadded(loc, conf_logits, priors, 0.01, 0.45), expected)


def test_detect_batch_and_jit_vmap_of_detect_equal_per_image_detect():
    rng = np.random.default_rng(1)
    loc = rng.normal(size=(3, len(SMALL_PRIORS), 4)).astype(np.float32)
    conf_logits = rng.normal(scale=2.0, size=(3, len(SMALL_PRIORS), NUM_CLASSES + 1))
    conf_logits = conf_logits.astype(np.float32)
    sizes = dict(top_k=TOP_K, pre_nms_top_k=PRE_NMS_TOP_K)
    per_image = [jax_nms.detect(l, c, SMALL_PRIORS, 0.1, 0.3, **sizes)
                 for l, c in zip(loc, conf_logits)]
    expected = [np.stack(parts) for parts in zip(*per_image)]
    # Thresholds traced, sizes static.
    vmapped = jax.jit(jax.vmap(functools.partial(jax_nms.detect, **sizes),
                               in_axes=(0, 0, None, None, None)))
    for batched in (jax_nms.detect_batch(loc, conf_logits, SMALL_PRIORS, 0.1, 0.3, **sizes),
                    vmapped(loc, conf_logits, SMALL_PRIORS, 0.1, 0.3)):
        for actual, want in zip(batched, expected):
            np.testing.assert_allclose(actual, want, atol=1e-6)


BOXES = np.array([[0, 0, 1, 1], [0, 0, 0.5, 0.5]], np.float32)
SCORES = np.array([0.9, 0.8], np.float32)
P = len(SMALL_PRIORS)
LOC = np.zeros((P, 4), np.float32)
LOGITS = np.zeros((P, NUM_CLASSES + 1), np.float32)

BAD_NMS_ARGS = {
    "boxes_not_n_by_4": (dict(boxes=BOXES[:, :3]), "boxes"),
    "scores_wrong_length": (dict(scores=SCORES[:1]), "scores"),
    "nan_box": (dict(boxes=np.where(np.eye(2, 4, dtype=bool), np.nan, BOXES)), "boxes"),
    "nan_score": (dict(scores=np.array([0.9, np.nan], np.float32)), "scores"),
    "threshold_above_one": (dict(iou_threshold=1.5), "iou_threshold"),
    "threshold_below_zero": (dict(iou_threshold=-0.1), "iou_threshold"),
}


@pytest.mark.parametrize("bad", BAD_NMS_ARGS.values(), ids=BAD_NMS_ARGS.keys())
@pytest.mark.parametrize("nms", [reference_nms.nms, functools.partial(jax_nms.nms, max_output_size=2)],
                         ids=["reference", "jax"])
def test_nms_rejects_bad_input(nms, bad):
    changes, name = bad
    args = dict(dict(boxes=BOXES, scores=SCORES, iou_threshold=0.5), **changes)
    with pytest.raises(ValueError, match=name):
        nms(**args)


def test_jax_nms_rejects_bad_output_size_and_mask():
    with pytest.raises(ValueError, match="max_output_size"):
        jax_nms.nms(BOXES, SCORES, 0.5, 0)
    with pytest.raises(ValueError, match="mask"):
        jax_nms.nms(BOXES, SCORES, 0.5, 2, mask=np.ones(3, bool))


BAD_DETECT_ARGS = {
    "loc_not_p_by_4": (dict(loc=LOC[:, :3]), "loc"),
    "loc_wrong_prior_count": (dict(loc=LOC[1:]), "loc"),
    "logits_wrong_prior_count": (dict(conf_logits=LOGITS[1:]), "conf_logits"),
    "logits_without_object_class": (dict(conf_logits=LOGITS[:, :1]), "conf_logits"),
    "nan_logit": (dict(conf_logits=np.where(np.eye(P, NUM_CLASSES + 1, dtype=bool), np.nan, LOGITS)),
                  "conf_logits"),
    "infinite_loc": (dict(loc=np.full((P, 4), np.inf, np.float32)), "loc"),
    "score_threshold_above_one": (dict(score_threshold=2.0), "score_threshold"),
    "iou_threshold_below_zero": (dict(iou_threshold=-1.0), "iou_threshold"),
    "top_k_zero": (dict(top_k=0), "top_k"),
    "pre_nms_top_k_fractional": (dict(pre_nms_top_k=2.5), "pre_nms_top_k"),
}


@pytest.mark.parametrize("bad", BAD_DETECT_ARGS.values(), ids=BAD_DETECT_ARGS.keys())
@pytest.mark.parametrize("detect", [reference_nms.detect, jax_nms.detect], ids=["reference", "jax"])
def test_detect_rejects_bad_input(detect, bad):
    changes, name = bad
    args = dict(dict(loc=LOC, conf_logits=LOGITS, priors=SMALL_PRIORS), **changes)
    with pytest.raises(ValueError, match=name):
        detect(**args)


def test_detect_batch_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="conf_logits"):
        jax_nms.detect_batch(np.stack([LOC, LOC]), LOGITS[None], SMALL_PRIORS)


# --- The peers' postprocessing options (shared/peers/trained_weights.md, section 5). ---

SMALL_LEVELS = (36, 2)  # SMALL_PRIORS: a 3x3 map of 4 boxes per cell, a 1x1 map of 2
PEER_OPTIONS = {
    "ssd.pytorch: no box clip, no final cap": dict(top_k=None, pre_nms_top_k=PRE_NMS_TOP_K,
                                                  clip_boxes=False),
    "lufficc: no pre-NMS cap, no box clip": dict(top_k=TOP_K, pre_nms_top_k=None,
                                                 clip_boxes=False),
    "mmdet: per-level candidates, empty boxes dropped": dict(
        top_k=TOP_K, pre_nms_top_k=PRE_NMS_TOP_K, level_sizes=SMALL_LEVELS,
        drop_empty_boxes=True),
    "no caps at all": dict(top_k=None, pre_nms_top_k=None),
}


@settings(max_examples=60)
@given(outputs=raw_outputs(), options=st.sampled_from(list(PEER_OPTIONS)), **detect_thresholds)
def test_jax_detect_matches_reference_with_each_peers_options(outputs, options, score_threshold,
                                                              iou_threshold):
    loc, conf_logits = outputs
    options = PEER_OPTIONS[options]
    assume_no_near_ties(loc, conf_logits, score_threshold, iou_threshold,
                        clip_boxes=options.get("clip_boxes", True))
    assert_same_detections(
        jax_detect_unpadded(loc, conf_logits, SMALL_PRIORS, score_threshold, iou_threshold,
                            **options),
        reference_nms.detect(loc, conf_logits, SMALL_PRIORS, score_threshold, iou_threshold,
                             **options))


def separate_priors(count: int) -> np.ndarray:
    """`count` disjoint priors along a row, 0.8 / count wide: NMS keeps every one."""
    side = 0.8 / count
    centres = (np.arange(count) + 0.5) / count
    return np.stack([centres, np.full(count, 0.5), np.full(count, side), np.full(count, 0.1)],
                    axis=1).astype(np.float32)


@pytest.mark.parametrize("detect", [reference_nms.detect, jax_detect_unpadded],
                         ids=["reference", "jax"])
def test_none_lifts_the_pre_nms_and_final_caps(detect):
    priors = separate_priors(40)
    conf_logits = np.zeros((40, 3), np.float32)
    conf_logits[:, 1] = np.linspace(3, 4, 40)  # class 1 confident everywhere
    conf_logits[:, 2] = 2.5                    # class 2 too, a little less
    loc = np.zeros((40, 4), np.float32)
    count = {(pre, top): len(detect(loc, conf_logits, priors, 0.05, 0.45, top_k=top,
                                    pre_nms_top_k=pre)[1])
             for pre in (None, 10) for top in (None, 15)}
    assert count == {(None, None): 80, (None, 15): 15, (10, None): 20, (10, 15): 15}


@pytest.mark.parametrize("detect", [reference_nms.detect, jax_detect_unpadded],
                         ids=["reference", "jax"])
def test_boxes_beyond_the_image_are_kept_unclipped_or_dropped_when_empty(detect):
    # Prior 0 hangs over the right edge; prior 1 lies wholly beyond it.
    priors = np.array([[0.95, 0.5, 0.2, 0.2], [1.3, 0.5, 0.2, 0.2]], np.float32)
    loc = np.zeros((2, 4), np.float32)
    conf_logits = np.array([[0, 3], [0, 2]], np.float32)
    boxes, _, _ = detect(loc, conf_logits, priors, 0.01, 0.45, clip_boxes=False)
    np.testing.assert_allclose(boxes, [[0.85, 0.4, 1.05, 0.6], [1.2, 0.4, 1.4, 0.6]], atol=1e-6)
    boxes, _, _ = detect(loc, conf_logits, priors, 0.01, 0.45)
    np.testing.assert_allclose(boxes, [[0.85, 0.4, 1.0, 0.6], [1.0, 0.4, 1.0, 0.6]], atol=1e-6)
    boxes, _, _ = detect(loc, conf_logits, priors, 0.01, 0.45, drop_empty_boxes=True)
    np.testing.assert_allclose(boxes, [[0.85, 0.4, 1.0, 0.6]], atol=1e-6)


@pytest.mark.parametrize("detect", [reference_nms.detect, jax_detect_unpadded],
                         ids=["reference", "jax"])
def test_per_level_candidates_are_each_maps_best_prior_class_pairs(detect):
    # Map 1: priors 0..2; map 2: priors 3..4. Two (prior, class) pairs per map enter NMS.
    priors = separate_priors(5)
    probs = np.array([[0.1, 0.5, 0.4], [0.1, 0.3, 0.6], [0.2, 0.45, 0.35],
                      [0.6, 0.2, 0.2], [0.1, 0.1, 0.8]])
    boxes, scores, labels = detect(np.zeros((5, 4), np.float32), np.log(probs).astype(np.float32),
                                   priors, 0.15, 0.45, pre_nms_top_k=2, level_sizes=(3, 2))
    # Map 1's best pairs: (1, class 2) 0.6 and (0, class 1) 0.5; map 2's: (4, 2) 0.8, and of
    # the tied (3, 1) and (3, 2) at 0.2 the first in prior-major order, (3, 1).
    np.testing.assert_allclose(scores, [0.8, 0.6, 0.5, 0.2], atol=1e-6)
    np.testing.assert_array_equal(labels, [2, 2, 1, 1])
    np.testing.assert_allclose(boxes[:, 0], priors[[4, 1, 0, 3], 0] - priors[0, 2] / 2, atol=1e-6)


def test_bad_level_sizes_are_rejected():
    for detect in (reference_nms.detect, jax_nms.detect):
        with pytest.raises(ValueError, match="level_sizes"):
            detect(LOC, LOGITS, SMALL_PRIORS, level_sizes=(36, 3))
