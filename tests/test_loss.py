import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from reference import loss as ref
from ssd_jax import loss as fast

# Fixed shapes so the jitted loss compiles once per neg_pos_ratio.
B, P, C = 3, 24, 4
NEG_POS_RATIOS = (0, 1, 3)


@st.composite
def loss_inputs(draw):
    """Float32 predictions and targets; labels mostly background, some images without objects."""
    floats = st.floats(-6, 6, width=32)
    loc_pred = draw(hnp.arrays(np.float32, (B, P, 4), elements=floats))
    loc_target = draw(hnp.arrays(np.float32, (B, P, 4), elements=floats))
    conf_logits = draw(hnp.arrays(np.float32, (B, P, C + 1), elements=floats))
    labels = draw(hnp.arrays(np.int32, (B, P), elements=st.sampled_from([0] * 4 + list(range(1, C + 1)))))
    has_objects = draw(hnp.arrays(bool, (B, 1)))
    return loc_pred, conf_logits, loc_target, labels * has_objects


def num_hard_negatives_expected(labels, neg_pos_ratio):
    positive = labels > 0
    return np.minimum(neg_pos_ratio * positive.sum(1), (~positive).sum(1))


@given(loss_inputs(), st.sampled_from(NEG_POS_RATIOS), st.sampled_from([1.0, 0.5]))
def test_jax_loss_equals_reference_and_is_finite_non_negative(inputs, neg_pos_ratio, alpha):
    expected = ref.multibox_loss(*inputs, neg_pos_ratio=neg_pos_ratio, alpha=alpha)
    got = fast.multibox_loss(*inputs, neg_pos_ratio=neg_pos_ratio, alpha=alpha)
    assert int(got["num_pos"]) == expected["num_pos"] == int((inputs[3] > 0).sum())
    for key in ("loss", "loc", "conf"):
        assert np.isfinite(got[key]) and got[key] >= 0
        np.testing.assert_allclose(got[key], expected[key], rtol=2e-5, atol=1e-5, err_msg=key)
    np.testing.assert_allclose(expected["loss"], expected["conf"] + alpha * expected["loc"])


@given(loss_inputs(), st.sampled_from(NEG_POS_RATIOS))
def test_mined_negative_count_is_ratio_times_positives_capped_by_negatives(inputs, neg_pos_ratio):
    # With all-zero logits every prior's cross-entropy is log(C + 1), so the
    # conf term counts the priors it trains on.
    loc_pred, _, loc_target, labels = inputs
    zero_logits = np.zeros((B, P, C + 1), np.float32)
    trained = labels.astype(bool).sum() + num_hard_negatives_expected(labels, neg_pos_ratio).sum()
    for multibox_loss in (ref.multibox_loss, fast.multibox_loss):
        result = multibox_loss(loc_pred, zero_logits, loc_target, labels, neg_pos_ratio)
        n = max(int(result["num_pos"]), 1)
        np.testing.assert_allclose(result["conf"] * n / np.log(C + 1), trained, rtol=1e-5)


@given(loss_inputs())
def test_loc_loss_is_zero_when_prediction_equals_target(inputs):
    loc_pred, conf_logits, _, labels = inputs
    for multibox_loss in (ref.multibox_loss, fast.multibox_loss):
        result = multibox_loss(loc_pred, conf_logits, loc_pred, labels)
        assert float(result["loc"]) == 0.0
        np.testing.assert_allclose(result["loss"], result["conf"], rtol=1e-6)


def test_hard_negatives_are_those_with_the_highest_background_loss():
    # One positive (label 1, logits favour it: CE = log(1 + e^-2)) and five
    # negatives whose background loss -log softmax[0] = log(1 + e^(z1 - z0)).
    margins = np.array([0.0, 3.0, -1.0, 2.0, 1.0])  # z1 - z0 of the negatives
    conf_logits = np.zeros((1, 6, 2), np.float32)
    conf_logits[0, 0, 1] = 2.0
    conf_logits[0, 1:, 1] = margins
    labels = np.array([[1, 0, 0, 0, 0, 0]])
    loc = np.zeros((1, 6, 4), np.float32)
    hardest_three = np.log1p(np.exp([3.0, 2.0, 1.0])).sum()
    expected = np.log1p(np.exp(-2.0)) + hardest_three
    for multibox_loss in (ref.multibox_loss, fast.multibox_loss):
        result = multibox_loss(loc, conf_logits, loc, labels, neg_pos_ratio=3)
        np.testing.assert_allclose(result["conf"], expected, rtol=1e-6)
        assert int(result["num_pos"]) == 1


def test_equally_hard_negatives_give_the_same_sum_whichever_is_kept():
    conf_logits = np.zeros((1, 8, 3), np.float32)  # all negatives tie
    labels = np.array([[2, 0, 0, 0, 0, 0, 0, 0]])
    loc = np.zeros((1, 8, 4), np.float32)
    for multibox_loss in (ref.multibox_loss, fast.multibox_loss):
        result = multibox_loss(loc, conf_logits, loc, labels, neg_pos_ratio=3)
        np.testing.assert_allclose(result["conf"], 4 * np.log(3), rtol=1e-6)


def test_batch_without_positives_has_zero_loss_and_zero_finite_gradient():
    rng = np.random.default_rng(0)
    loc_pred, loc_target = rng.normal(size=(2, B, P, 4)).astype(np.float32)
    conf_logits = rng.normal(size=(B, P, C + 1)).astype(np.float32)
    labels = np.zeros((B, P), np.int32)
    for multibox_loss in (ref.multibox_loss, fast.multibox_loss):
        result = multibox_loss(loc_pred, conf_logits, loc_target, labels)
        assert int(result["num_pos"]) == 0
        assert [float(result[k]) for k in ("loss", "loc", "conf")] == [0.0, 0.0, 0.0]
    grads = jax.grad(lambda lp, cl: fast.multibox_loss(lp, cl, loc_target, labels)["loss"],
                     argnums=(0, 1))(loc_pred, conf_logits)
    for grad in grads:
        assert np.all(np.asarray(grad) == 0.0)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@jax.jit
@functools.partial(jax.grad, argnums=(0, 1))
def loss_gradient(loc_pred, conf_logits, loc_target, labels, alpha):
    return fast.multibox_loss(loc_pred, conf_logits, loc_target, labels, alpha=alpha)["loss"]


@given(loss_inputs(), st.sampled_from([1.0, 0.5]))
def test_gradient_is_the_analytic_gradient_of_the_trained_priors(inputs, alpha):
    loc_pred, conf_logits, loc_target, labels = inputs
    grad_loc, grad_conf = loss_gradient(loc_pred, conf_logits, loc_target, labels, alpha)
    grad_loc, grad_conf = np.asarray(grad_loc), np.asarray(grad_conf)
    positive = labels > 0
    n = max(positive.sum(), 1)
    # d smooth_l1(d) / d d = clip(d, -1, 1), only on positives.
    expected_loc = alpha * np.clip(loc_pred - loc_target, -1, 1) * positive[..., None] / n
    np.testing.assert_allclose(grad_loc, expected_loc, atol=1e-6)
    # Softmax cross-entropy: (softmax - one_hot) / N on the trained priors, 0 elsewhere.
    ce_grad = (_softmax(conf_logits.astype(np.float64)) - np.eye(C + 1)[labels]) / n
    trained = np.any(grad_conf != 0, axis=-1)
    np.testing.assert_allclose(grad_conf[trained], ce_grad[trained], atol=1e-6)
    assert np.all(trained[positive])
    # Rows of (softmax - one_hot) are never all zero, so trained rows count exactly.
    np.testing.assert_array_equal((trained & ~positive).sum(1),
                                  num_hard_negatives_expected(labels, 3))


def test_loss_is_jittable_with_validation_skipped_on_tracers():
    rng = np.random.default_rng(1)
    loc_pred, loc_target = rng.normal(size=(2, B, P, 4)).astype(np.float32)
    conf_logits = rng.normal(size=(B, P, C + 1)).astype(np.float32)
    labels = rng.integers(0, C + 1, (B, P))
    eager = fast.multibox_loss(loc_pred, conf_logits, loc_target, labels)
    jitted = jax.jit(fast.multibox_loss)(loc_pred, conf_logits, loc_target, labels)
    for key in eager:
        np.testing.assert_allclose(jitted[key], eager[key], rtol=1e-6)


def test_bfloat16_logits_are_computed_in_float32():
    rng = np.random.default_rng(2)
    loc = rng.normal(size=(B, P, 4)).astype(np.float32)
    conf_logits = jnp.asarray(rng.normal(size=(B, P, C + 1)), jnp.bfloat16)
    labels = rng.integers(0, C + 1, (B, P))
    result = fast.multibox_loss(loc, conf_logits, loc, labels)
    assert result["conf"].dtype == jnp.float32
    expected = ref.multibox_loss(loc, np.asarray(conf_logits.astype(jnp.float32)), loc, labels)
    np.testing.assert_allclose(result["conf"], expected["conf"], rtol=1e-5)


def _good_inputs():
    loc = np.zeros((B, P, 4), np.float32)
    return dict(loc_pred=loc, conf_logits=np.zeros((B, P, C + 1), np.float32), loc_target=loc,
                labels=np.zeros((B, P), np.int32))


@pytest.mark.parametrize("change, message", [
    (dict(loc_pred=np.zeros((B, P, 3))), "loc_pred"),
    (dict(loc_target=np.zeros((B, P + 1, 4))), "loc_target"),
    (dict(conf_logits=np.zeros((B, P, 1))), "C \\+ 1 >= 2"),
    (dict(conf_logits=np.zeros((P, C + 1))), "conf_logits"),
    (dict(labels=np.full((B, P), C + 1)), "labels"),
    (dict(labels=np.full((B, P), -1)), "labels"),
    (dict(labels=np.zeros((B, P - 1), int)), "labels"),
    (dict(conf_logits=np.full((B, P, C + 1), np.nan)), "not finite"),
    (dict(neg_pos_ratio=-1), "neg_pos_ratio"),
    (dict(neg_pos_ratio=2.5), "neg_pos_ratio"),
    (dict(alpha=-1.0), "alpha"),
])
def test_bad_input_raises_value_error_naming_the_argument(change, message):
    for multibox_loss in (ref.multibox_loss, fast.multibox_loss):
        with pytest.raises(ValueError, match=message):
            multibox_loss(**{**_good_inputs(), **change})


def test_integral_float_ratio_is_accepted_like_the_int():
    inputs = _good_inputs()
    inputs["labels"] = np.eye(P, dtype=np.int32)[:B]
    for multibox_loss in (ref.multibox_loss, fast.multibox_loss):
        a = multibox_loss(**inputs, neg_pos_ratio=3.0)
        b = multibox_loss(**inputs, neg_pos_ratio=3)
        np.testing.assert_allclose(a["conf"], b["conf"])
