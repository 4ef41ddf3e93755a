"""The JAX functions check shapes and dtypes while tracing: under jit a wrong shape is a
ValueError naming the argument, never a broadcast result or a raw XLA message. Values are
checked only on concrete inputs; under jit NaN scores are harmless and masks are cast."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssd_jax import boxes, encoding, loss, matching, nms

PRIORS = jnp.array([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]])
BOX = jnp.array([[0.1, 0.1, 0.4, 0.4]])
TWO_BOXES = jnp.array([[0.1, 0.1, 0.4, 0.4], [0.4, 0.4, 0.6, 0.6]])
B, P, C1 = 2, 2, 3


def _loss_inputs(**changes):
    inputs = dict(loc_pred=jnp.zeros((B, P, 4)), conf_logits=jnp.zeros((B, P, C1)),
                  loc_target=jnp.zeros((B, P, 4)), labels=jnp.zeros((B, P), jnp.int32))
    return {**inputs, **changes}


# (what is called under jit, the message its ValueError must hold)
BAD_CALLS = {
    "encode: one box for two priors": (
        lambda: encoding.encode(BOX, PRIORS), "matched_boxes .* with P = 2 as in priors"),
    "encode: a 1-D box": (
        lambda: encoding.encode(BOX[0], PRIORS), r"matched_boxes must have shape \[\.\.\., P, 4\]"),
    "decode: priors [P, 3]": (
        lambda: encoding.decode(jnp.zeros((2, 4)), PRIORS[:, :3]), r"priors must have shape"),
    "match: fewer labels than boxes": (
        lambda: matching.match(TWO_BOXES, jnp.array([1]), PRIORS), "gt_labels .* G = 2"),
    "match: a mask of another length": (
        lambda: matching.match(TWO_BOXES, jnp.array([1, 2]), PRIORS, gt_mask=jnp.ones(3, bool)),
        "gt_mask .* G = 2"),
    "match: complex boxes": (
        lambda: matching.match(TWO_BOXES.astype(jnp.complex64), jnp.array([1, 2]), PRIORS),
        "gt_boxes must hold real numbers"),
    "build_targets: boxes [B, G, 3]": (
        lambda: matching.build_targets(jnp.zeros((1, 2, 3)), jnp.ones((1, 2), jnp.int32),
                                       jnp.ones((1, 2), bool), PRIORS),
        r"gt_boxes must have shape \[B, G, 4\]"),
    "build_targets: labels of another batch": (
        lambda: matching.build_targets(TWO_BOXES[None], jnp.ones((2, 2), jnp.int32),
                                       jnp.ones((1, 2), bool), PRIORS), "gt_labels .* B = 1"),
    "build_targets: zero priors": (
        lambda: matching.build_targets(TWO_BOXES[None], jnp.ones((1, 2), jnp.int32),
                                       jnp.ones((1, 2), bool), jnp.zeros((0, 4))),
        "priors must hold at least one prior"),
    "multibox_loss: mismatched batch sizes": (
        lambda: loss.multibox_loss(**_loss_inputs(conf_logits=jnp.zeros((1, P, C1)))),
        "loc_pred .* B = 1 as in conf_logits"),
    "multibox_loss: labels of another prior count": (
        lambda: loss.multibox_loss(**_loss_inputs(labels=jnp.zeros((B, 3), jnp.int32))),
        "labels .* P = 2"),
    "multibox_loss: one logit": (
        lambda: loss.multibox_loss(**_loss_inputs(conf_logits=jnp.zeros((B, P, 1)))),
        "C \\+ 1 >= 2"),
    "multibox_loss: boolean labels": (
        lambda: loss.multibox_loss(**_loss_inputs(labels=jnp.zeros((B, P), bool))),
        "labels must hold integer labels"),
    "nms: scores of another length": (
        lambda: nms.nms(TWO_BOXES, jnp.ones(3), 0.5, 2), "scores .* N = 2"),
    "nms: a float mask": (
        lambda: nms.nms(TWO_BOXES, jnp.ones(2), 0.5, 2, mask=jnp.ones(2)),
        "mask must hold booleans"),
    "nms: a threshold per box": (
        lambda: nms.nms(TWO_BOXES, jnp.ones(2), jnp.ones(2), 2), "iou_threshold must be a scalar"),
    "detect: loc of another prior count": (
        lambda: nms.detect(jnp.zeros((3, 4)), jnp.zeros((2, C1)), PRIORS, top_k=2),
        "loc .* P = 2 as in priors"),
    "detect_batch: conf_logits of another batch": (
        lambda: nms.detect_batch(jnp.zeros((2, 2, 4)), jnp.zeros((3, 2, C1)), PRIORS, top_k=2),
        "conf_logits .* B = 2"),
    "detect: zero priors": (
        lambda: nms.detect(jnp.zeros((0, 4)), jnp.zeros((0, C1)), jnp.zeros((0, 4)), top_k=2),
        "priors must hold at least one prior"),
    "iou: boxes [N, 3]": (lambda: boxes.iou(jnp.zeros((2, 3)), BOX), r"a must have shape \[N, 4\]"),
    "area: boxes [N, 5]": (lambda: boxes.area(jnp.zeros((2, 5))), r"boxes must have shape"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_shape_and_dtype_errors_are_caught_while_tracing(case):
    call, message = BAD_CALLS[case]
    with pytest.raises(ValueError, match=message):
        jax.jit(call)()


def test_a_nan_score_never_wins_nms_under_jit():
    nms_jit = jax.jit(nms.nms, static_argnums=3)
    boxes_ = jnp.array([[0.0, 0.0, 0.5, 0.5], [0.6, 0.6, 1.0, 1.0], [0.0, 0.0, 0.5, 0.49]])
    indices, valid = nms_jit(boxes_, jnp.array([jnp.nan, 0.9, 0.8]), 0.5, 3)
    assert indices[valid].tolist() == [1, 2]  # the best box is kept, the NaN box is not
    with pytest.raises(ValueError, match="scores.* is not finite"):
        nms.nms(boxes_, jnp.array([jnp.nan, 0.9, 0.8]), 0.5, 3)  # concrete: refused


def test_nan_logits_give_no_detections_and_leave_the_others_alone():
    conf = jnp.array([[0.0, 5.0], [0.0, 4.0], [0.0, 3.0]])
    loc, priors = jnp.zeros((3, 4)), jnp.array([[0.2, 0.2, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2],
                                                  [0.8, 0.8, 0.2, 0.2]])
    clean = jax.jit(nms.detect, static_argnames=("top_k", "pre_nms_top_k"))(
        loc, conf, priors, top_k=3, pre_nms_top_k=2)
    poisoned = jax.jit(nms.detect, static_argnames=("top_k", "pre_nms_top_k"))(
        loc, conf.at[0].set(jnp.nan), priors, top_k=3, pre_nms_top_k=2)
    assert int(clean[3].sum()) == 2 and int(poisoned[3].sum()) == 2  # prior 2 moves up
    assert np.all(np.isfinite(poisoned[1]))


def test_masks_must_be_zero_or_one():
    boxes_ = jnp.array([[0.0, 0.0, 0.2, 0.2], [0.3, 0.3, 0.5, 0.5], [0.6, 0.6, 1.0, 1.0]])
    with pytest.raises(ValueError, match="mask must be boolean \\(or 0/1\\).*values \\[0, 1, 5\\]"):
        nms.nms(boxes_, jnp.array([0.9, 0.8, 0.7]), 0.5, 3, mask=jnp.array([5, 0, 1]))
    indices, valid = nms.nms(boxes_, jnp.array([0.9, 0.8, 0.7]), 0.5, 3, mask=jnp.array([1, 0, 1]))
    assert indices[valid].tolist() == [0, 2] and int(valid.sum()) == 2


def test_detect_refuses_priors_without_a_positive_size():
    priors = PRIORS.at[0, 2].set(-0.2)
    with pytest.raises(ValueError, match="priors\\[0\\] .* positive width and height"):
        nms.detect(jnp.zeros((2, 4)), jnp.zeros((2, C1)), priors, top_k=2)


def test_iou_of_mixed_precisions_stays_within_one():
    a = jnp.array([[0.1, 0.1, 0.7003, 0.7003]], jnp.float16)
    b = jnp.array([[0.1, 0.1, 0.7003, 0.7003]], jnp.float32)
    overlap = boxes.iou(a, b)
    assert overlap.dtype == jnp.float32 and float(overlap.max()) <= 1.0
    np.testing.assert_allclose(overlap, boxes.iou(a.astype(jnp.float32), b), rtol=1e-6)


def test_lists_and_integer_valued_float_labels_work_like_arrays():
    from reference import loss as reference_loss
    from reference import nms as reference_nms
    loc, conf, priors = [[0.0, 0, 0, 0]], [[0.0, 1.0]], [[0.5, 0.5, 0.2, 0.2]]
    jax_boxes, jax_scores, _, valid = nms.detect(loc, conf, priors, top_k=1)
    ref_boxes, ref_scores, _ = reference_nms.detect(loc, conf, priors, top_k=1)
    np.testing.assert_allclose(jax_boxes[valid], ref_boxes, rtol=1e-6)
    np.testing.assert_allclose(jax_scores[valid], ref_scores, rtol=1e-6)
    inputs = ([[[0.1, 0, 0, 0], [0, 0, 0, 0]]], [[[0.0, 1.0, 0.5], [2.0, 0, 0]]],
              [[[0.0, 0, 0, 0], [0, 0, 0, 0]]])
    as_floats = loss.multibox_loss(*inputs, [[1.0, 0.0]])
    as_ints = loss.multibox_loss(*inputs, np.array([[1, 0]]))
    reference = reference_loss.multibox_loss(*inputs, [[1.0, 0.0]])
    np.testing.assert_allclose(float(as_floats["loss"]), float(as_ints["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(as_floats["loss"]), reference["loss"], rtol=1e-5)
    with pytest.raises(ValueError, match="integer class labels"):
        loss.multibox_loss(*inputs, [[1.5, 0.0]])
