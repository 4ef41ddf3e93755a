"""The resize modes detectors use: OpenCV's fixed-point INTER_LINEAR reproduced bit for bit
when downscaling, torchvision's unrounded float bilinear, the pipeline's uint8 rounding."""
import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.augment import resize as resize_uint8
from reference.resize import resize_float, resize_image, resize_opencv

SIZE = 30  # output side: small, but enough for every tap pattern


@st.composite
def images(draw, low, high):
    height, width = draw(st.integers(low, high)), draw(st.integers(low, high))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@settings(max_examples=60, deadline=None)
@given(images(SIZE, 4 * SIZE))
def test_opencv_mode_equals_cv2_resize_when_downscaling(image):
    np.testing.assert_array_equal(resize_opencv(image, SIZE), cv2.resize(image, (SIZE, SIZE)))


def test_opencv_mode_equals_cv2_on_photo_sized_inputs():
    rng = np.random.default_rng(0)
    for height, width, size in ((375, 500, 300), (333, 500, 300), (1080, 1920, 512), (600, 600, 300)):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        np.testing.assert_array_equal(resize_opencv(image, size), cv2.resize(image, (size, size)))


@settings(max_examples=30, deadline=None)
@given(images(2, SIZE))
def test_opencv_mode_is_within_one_of_cv2_when_enlarging(image):
    difference = resize_opencv(image, SIZE).astype(int) - cv2.resize(image, (SIZE, SIZE))
    assert np.abs(difference).max() <= 1


@settings(max_examples=30, deadline=None)
@given(images(2, 3 * SIZE))
def test_uint8_mode_is_the_float_mode_rounded(image):
    exact = resize_float(image, SIZE)
    assert exact.dtype == np.float32 and exact.shape == (SIZE, SIZE, 3)
    assert np.abs(resize_uint8(image, SIZE) - exact).max() <= 0.5 + 1e-3


def test_float_mode_halving_averages_each_two_by_two_block_unrounded():
    image = np.random.default_rng(1).integers(0, 256, (2 * SIZE, 2 * SIZE, 3), dtype=np.uint8)
    blocks = image.reshape(SIZE, 2, SIZE, 2, 3).astype(np.float64).mean(axis=(1, 3))
    np.testing.assert_allclose(resize_float(image, SIZE), blocks, atol=1e-4)
    assert np.any(blocks % 1 != 0)  # so rounding would have shown


def test_unknown_resize_mode_is_a_value_error():
    with pytest.raises(ValueError, match="resize mode must be one of"):
        resize_image(np.zeros((4, 4, 3), np.uint8), 2, "lanczos")
