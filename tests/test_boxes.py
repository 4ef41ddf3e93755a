"""Box geometry: the JAX twins equal the reference, and IoU's defining properties hold."""
import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from reference import boxes as reference_boxes
from ssd_jax import boxes as jax_boxes

IMPLEMENTATIONS = [pytest.param(reference_boxes, id="reference"),
                   pytest.param(jax_boxes, id="jax")]

# Coordinates on a 1/1000 grid: any nonzero side is >= 1e-3, so areas stay far
# from float32 subnormals (which XLA flushes to zero) and the twins can agree.
coordinates = st.integers(-500, 1500).map(lambda k: float(np.float32(k / 1000)))


def box_arrays(n):
    """[n, 4] float32 boxes, degenerate ones (xmax <= xmin or ymax <= ymin) included."""
    return hnp.arrays(np.float32, (n, 4), elements=coordinates)


@st.composite
def proper_box_arrays(draw, n):
    """[n, 4] float32 boxes with xmax > xmin and ymax > ymin."""
    corners = draw(box_arrays(n))
    low = np.minimum(corners[:, :2], corners[:, 2:])
    size = np.abs(corners[:, 2:] - corners[:, :2]) + np.float32(1e-3)
    return np.concatenate([low, low + size], axis=1)


@pytest.mark.parametrize("boxes", IMPLEMENTATIONS)
@given(a=box_arrays(5), b=box_arrays(4))
def test_iou_is_symmetric_and_in_unit_interval(boxes, a, b):
    overlaps = np.asarray(boxes.iou(a, b))
    assert overlaps.shape == (5, 4)
    assert np.all((overlaps >= 0) & (overlaps <= 1))
    np.testing.assert_allclose(overlaps, np.asarray(boxes.iou(b, a)).T, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("boxes", IMPLEMENTATIONS)
@given(a=proper_box_arrays(6))
def test_iou_of_proper_box_with_itself_is_one(boxes, a):
    np.testing.assert_allclose(np.diag(np.asarray(boxes.iou(a, a))), 1.0, rtol=1e-6)


@pytest.mark.parametrize("boxes", IMPLEMENTATIONS)
@given(a=proper_box_arrays(4), others=box_arrays(5), flat_axis=st.sampled_from([0, 1]))
def test_degenerate_boxes_have_zero_area_and_zero_iou_not_nan(boxes, a, others, flat_axis):
    # Collapse one side (zero width or height) of half the boxes, invert the rest.
    degenerate = a.copy()
    degenerate[:2, 2 + flat_axis] = degenerate[:2, flat_axis]
    degenerate[2:] = degenerate[2:, [2, 3, 0, 1]]
    np.testing.assert_array_equal(np.asarray(boxes.area(degenerate)), 0.0)
    np.testing.assert_array_equal(np.asarray(boxes.iou(degenerate, others)), 0.0)
    np.testing.assert_array_equal(np.asarray(boxes.iou(degenerate, degenerate)), 0.0)


@pytest.mark.parametrize("boxes", IMPLEMENTATIONS)
def test_iou_of_hand_computed_pairs(boxes):
    a = np.array([[0.0, 0.0, 0.5, 0.5]], np.float32)
    b = np.array([[0.25, 0.25, 0.75, 0.75],  # overlap 1/16, union 7/16
                  [0.0, 0.0, 0.25, 0.25],    # inside a: 1/16 over 1/4
                  [0.5, 0.0, 1.0, 0.5],      # touches a along an edge only
                  [0.6, 0.6, 0.9, 0.9]],     # disjoint
                 np.float32)
    np.testing.assert_allclose(np.asarray(boxes.iou(a, b)), [[1 / 7, 0.25, 0.0, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("boxes", IMPLEMENTATIONS)
def test_area_is_width_times_height_for_any_leading_shape(boxes):
    batch = np.array([[[0.1, 0.2, 0.4, 0.6], [0.5, 0.5, 0.5, 0.9]]], np.float32)  # [1, 2, 4]
    np.testing.assert_allclose(np.asarray(boxes.area(batch)), [[0.3 * 0.4, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(boxes.area(batch[0, 0])), 0.3 * 0.4, rtol=1e-6)


@pytest.mark.parametrize("boxes", IMPLEMENTATIONS)
@given(corners=proper_box_arrays(6))
def test_center_and_corner_forms_round_trip(boxes, corners):
    center = np.asarray(boxes.corners_to_center(corners))
    np.testing.assert_allclose(center[:, 2:], corners[:, 2:] - corners[:, :2], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(boxes.center_to_corners(center)), corners, atol=1e-6)


@given(a=box_arrays(6), b=box_arrays(5))
def test_jax_box_functions_equal_reference(a, b):
    np.testing.assert_allclose(jax_boxes.iou(a, b), reference_boxes.iou(a, b),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jax.jit(jax_boxes.iou)(a, b), reference_boxes.iou(a, b),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jax_boxes.area(a), reference_boxes.area(a), rtol=1e-6, atol=1e-7)
    for name in ("corners_to_center", "center_to_corners"):
        np.testing.assert_allclose(getattr(jax_boxes, name)(a), getattr(reference_boxes, name)(a),
                                   atol=1e-6)


GOOD = np.array([[0.1, 0.1, 0.5, 0.5]], np.float32)
BAD_BOXES = {
    "nan": np.array([[0.1, np.nan, 0.5, 0.5]]),
    "inf": np.array([[0.1, 0.1, np.inf, 0.5]]),
    "three_coordinates": np.array([[0.1, 0.1, 0.5]]),
    "no_box_axis": np.array(0.5),
}


@pytest.mark.parametrize("boxes", IMPLEMENTATIONS)
@pytest.mark.parametrize("bad", BAD_BOXES.values(), ids=BAD_BOXES.keys())
@pytest.mark.parametrize("function", ["area", "corners_to_center", "center_to_corners"])
def test_bad_boxes_raise_value_error(boxes, bad, function):
    with pytest.raises(ValueError, match="boxes"):
        getattr(boxes, function)(bad)


@pytest.mark.parametrize("boxes", IMPLEMENTATIONS)
@pytest.mark.parametrize("bad", [*BAD_BOXES.values(), GOOD[None]],
                         ids=[*BAD_BOXES.keys(), "batched"])
def test_bad_iou_inputs_raise_value_error_naming_the_argument(boxes, bad):
    with pytest.raises(ValueError, match="^a"):
        boxes.iou(bad, GOOD)
    with pytest.raises(ValueError, match="^b"):
        boxes.iou(GOOD, bad)
