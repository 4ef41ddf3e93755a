"""Regression targets: eq. 2 of the paper, decode inverts encode, the JAX twins equal the reference."""
import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from reference import encoding as reference_encoding
from reference.boxes import center_to_corners
from reference.priors import PriorConfig, prior_boxes
from ssd_jax import encoding as jax_encoding

IMPLEMENTATIONS = [pytest.param(reference_encoding, id="reference"),
                   pytest.param(jax_encoding, id="jax")]

# 3 maps (4x4, 2x2, 1x1): 92 priors, small enough for fast examples.
PRIORS = prior_boxes(PriorConfig.from_paper(
    image_size=64, feature_map_sizes=(4, 2, 1), aspect_ratios=((2,), (2, 3), (2,))))
P = len(PRIORS)

coordinates = st.integers(0, 1000).map(lambda k: float(np.float32(k / 1000)))


@st.composite
def matched_box_arrays(draw, batch=()):
    """[*batch, P, 4] float32 corners in [0, 1.1] with sides >= 1e-3."""
    corners = draw(hnp.arrays(np.float32, (*batch, P, 4), elements=coordinates))
    low = np.minimum(corners[..., :2], corners[..., 2:])
    size = np.abs(corners[..., 2:] - corners[..., :2]) + np.float32(1e-3)
    return np.concatenate([low, low + size], axis=-1)


offsets = hnp.arrays(np.float32, (2, P, 4), elements=st.floats(-5, 5, width=32))


@pytest.mark.parametrize("encoding", IMPLEMENTATIONS)
@given(boxes=matched_box_arrays(batch=(2,)))
def test_decode_inverts_encode(encoding, boxes):
    loc = encoding.encode(boxes, PRIORS)
    assert loc.shape == (2, P, 4)
    np.testing.assert_allclose(np.asarray(encoding.decode(loc, PRIORS)), boxes, atol=1e-5)


@pytest.mark.parametrize("encoding", IMPLEMENTATIONS)
@given(loc=offsets)
def test_encode_inverts_decode(encoding, loc):
    boxes = encoding.decode(loc, PRIORS, (0.1, 0.2))
    np.testing.assert_allclose(np.asarray(encoding.encode(boxes, PRIORS, (0.1, 0.2))), loc,
                               atol=1e-4)


@pytest.mark.parametrize("encoding", IMPLEMENTATIONS)
def test_a_prior_encodes_to_zero_offsets(encoding):
    np.testing.assert_allclose(np.asarray(encoding.encode(center_to_corners(PRIORS), PRIORS)),
                               0.0, atol=1e-5)


@pytest.mark.parametrize("encoding", IMPLEMENTATIONS)
def test_encode_follows_paper_equation_2_divided_by_the_variances(encoding):
    prior = np.array([[0.5, 0.5, 0.2, 0.4]], np.float32)
    box = np.array([[0.5, 0.0, 0.6, 0.8]], np.float32)  # center (0.55, 0.4), size (0.1, 0.8)
    paper = [0.05 / 0.2, -0.1 / 0.4, np.log(0.1 / 0.2), np.log(0.8 / 0.4)]
    np.testing.assert_allclose(np.asarray(encoding.encode(box, prior, (1.0, 1.0))), [paper],
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(encoding.encode(box, prior)),
                               [np.array(paper) / [0.1, 0.1, 0.2, 0.2]], rtol=1e-5)


@given(boxes=matched_box_arrays(), loc=offsets)
def test_jax_encoding_equals_reference_eager_and_jitted(boxes, loc):
    expected_loc = reference_encoding.encode(boxes, PRIORS)
    np.testing.assert_allclose(jax_encoding.encode(boxes, PRIORS), expected_loc, atol=2e-4)
    np.testing.assert_allclose(jax.jit(jax_encoding.encode)(boxes, PRIORS), expected_loc,
                               atol=2e-4)
    expected_boxes = reference_encoding.decode(loc, PRIORS)
    np.testing.assert_allclose(jax_encoding.decode(loc, PRIORS), expected_boxes, atol=1e-5)
    np.testing.assert_allclose(jax.jit(jax_encoding.decode)(loc, PRIORS), expected_boxes,
                               atol=1e-5)


def _with(array, index, value):
    array = np.array(array, dtype=np.float32)
    array[index] = value
    return array


GOOD_BOXES = np.asarray(center_to_corners(PRIORS), np.float32)
BAD_ENCODE_INPUTS = {
    "nan_box": (_with(GOOD_BOXES, (3, 1), np.nan), PRIORS, (0.1, 0.2)),
    "zero_width_box": (_with(GOOD_BOXES, (3, 2), GOOD_BOXES[3, 0]), PRIORS, (0.1, 0.2)),
    "one_box_too_few": (GOOD_BOXES[1:], PRIORS, (0.1, 0.2)),
    "zero_height_prior": (GOOD_BOXES, _with(PRIORS, (5, 3), 0.0), (0.1, 0.2)),
    "inf_prior": (GOOD_BOXES, _with(PRIORS, (5, 0), np.inf), (0.1, 0.2)),
    "priors_not_2d": (GOOD_BOXES, PRIORS[None], (0.1, 0.2)),
    "negative_variance": (GOOD_BOXES, PRIORS, (0.1, -0.2)),
    "three_variances": (GOOD_BOXES, PRIORS, (0.1, 0.2, 0.3)),
}


@pytest.mark.parametrize("encoding", IMPLEMENTATIONS)
@pytest.mark.parametrize("inputs", BAD_ENCODE_INPUTS.values(), ids=BAD_ENCODE_INPUTS.keys())
def test_bad_encode_inputs_raise_value_error(encoding, inputs):
    with pytest.raises(ValueError):
        encoding.encode(*inputs)


GOOD_LOC = np.zeros((P, 4), np.float32)
BAD_DECODE_INPUTS = {
    "inf_offset": (_with(GOOD_LOC, (0, 2), np.inf), PRIORS, (0.1, 0.2)),
    "one_offset_too_many": (np.zeros((P + 1, 4)), PRIORS, (0.1, 0.2)),
    "offsets_not_4": (np.zeros((P, 3)), PRIORS, (0.1, 0.2)),
    "nan_variance": (GOOD_LOC, PRIORS, (np.nan, 0.2)),
    "negative_width_prior": (GOOD_LOC, _with(PRIORS, (0, 2), -0.1), (0.1, 0.2)),
}


@pytest.mark.parametrize("encoding", IMPLEMENTATIONS)
@pytest.mark.parametrize("inputs", BAD_DECODE_INPUTS.values(), ids=BAD_DECODE_INPUTS.keys())
def test_bad_decode_inputs_raise_value_error(encoding, inputs):
    with pytest.raises(ValueError):
        encoding.decode(*inputs)
