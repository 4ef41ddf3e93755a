"""Default boxes: counts of the paper's models, order, eq. 4 scales, clipping, config checks."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference.boxes import center_to_corners
from reference.priors import SSD300, SSD512, PriorConfig, cell_boxes, clip_priors, prior_boxes


@pytest.mark.parametrize("config, count", [(SSD300, 8732), (SSD512, 24564)],
                         ids=["SSD300", "SSD512"])
def test_paper_models_have_the_published_number_of_priors(config, count):
    priors = prior_boxes(config)
    assert priors.shape == (count, 4)
    assert priors.dtype == np.float32
    assert config.num_priors == count


@pytest.mark.parametrize("config", [SSD300, SSD512], ids=["SSD300", "SSD512"])
def test_priors_have_positive_size(config):
    assert np.all(prior_boxes(config)[:, 2:] > 0)


def test_from_paper_cell_centers_lie_inside_the_image():
    # Unlike the Caffe configs, whose rounded steps put some centers past the
    # border (SSD300's 10x10 map: 32 * 9.5 = 304 > 300).
    config = PriorConfig.from_paper(300, (38, 19, 10, 5, 3, 1),
                                    ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)))
    centers = prior_boxes(config)[:, :2]
    assert np.all((centers > 0) & (centers < 1))
    np.testing.assert_allclose(np.unique(centers[:38 * 38 * 4, 0]), (np.arange(38) + 0.5) / 38,
                               rtol=1e-6)


def test_priors_go_map_by_map_then_row_major_then_cell_boxes():
    priors = prior_boxes(SSD300)
    step = SSD300.steps[0] / SSD300.image_size
    per_cell = SSD300.boxes_per_location[0]
    first_cell = [(step / 2, step / 2, w, h) for w, h in cell_boxes(SSD300, 0)]
    np.testing.assert_allclose(priors[:per_cell], first_cell, rtol=1e-6)
    # The next cell is one step to the right (x varies fastest) ...
    np.testing.assert_allclose(priors[per_cell, :2], [1.5 * step, step / 2], rtol=1e-6)
    # ... and the cell after the first row is one step down.
    row = SSD300.feature_map_sizes[0] * per_cell
    np.testing.assert_allclose(priors[row, :2], [step / 2, 1.5 * step], rtol=1e-6)
    # The last map is 1x1: its boxes are centered on the image and come last.
    last_cell = [(0.5, 0.5, w, h) for w, h in cell_boxes(SSD300, 5)]
    np.testing.assert_allclose(priors[-len(last_cell):], last_cell, rtol=1e-6)


def test_cell_boxes_follow_the_paper_sizes():
    (s, _), (extra, _), (w2, h2), (w_half, h_half), *_ = cell_boxes(SSD300, 1)
    s_k, s_next = 60 / 300, 111 / 300
    assert s == pytest.approx(s_k)
    assert extra == pytest.approx(np.sqrt(s_k * s_next))
    assert (w2, h2) == pytest.approx((s_k * np.sqrt(2), s_k / np.sqrt(2)))
    assert (w_half, h_half) == pytest.approx((h2, w2))


def test_from_paper_scales_follow_equation_4():
    config = PriorConfig.from_paper(300, (38, 19, 10, 5, 3, 1),
                                    ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)))
    scales = np.array([0.2, 0.34, 0.48, 0.62, 0.76, 0.9])
    np.testing.assert_allclose(np.array(config.min_sizes) / 300, scales)
    np.testing.assert_allclose(np.array(config.max_sizes) / 300, [*scales[1:], 0.9 + 0.14])
    np.testing.assert_allclose(config.steps, [300 / f for f in (38, 19, 10, 5, 3, 1)])
    assert config.num_priors == 8732


@given(sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4),
       ratios=st.lists(st.sampled_from([(), (2,), (2, 3)]), min_size=4, max_size=4))
def test_prior_count_is_cells_times_boxes_per_cell(sizes, ratios):
    config = PriorConfig.from_paper(100, sizes, ratios[:len(sizes)])
    expected = sum(f * f * (2 + 2 * len(r)) for f, r in zip(sizes, ratios))
    assert config.num_priors == expected
    assert prior_boxes(config).shape == (expected, 4)


def test_clipping_keeps_prior_corners_inside_the_image():
    corners = center_to_corners(prior_boxes(SSD300))
    assert np.any((corners < 0) | (corners > 1))  # so that clipping has work to do
    clipped = center_to_corners(prior_boxes(dataclasses.replace(SSD300, clip="corners")))
    assert np.all((clipped >= -1e-6) & (clipped <= 1 + 1e-6))
    inside = np.all((corners >= 0) & (corners <= 1), axis=1)
    np.testing.assert_allclose(clipped[inside], corners[inside], atol=1e-6)


@pytest.mark.parametrize("field", ["steps", "min_sizes", "max_sizes", "aspect_ratios"])
def test_field_with_wrong_number_of_maps_raises_value_error(field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(SSD300, **{field: getattr(SSD300, field)[:-1]})


def test_bad_configs_raise_value_error():
    with pytest.raises(ValueError, match="aspect ratios"):
        dataclasses.replace(SSD300, aspect_ratios=((2,), (2, -3), (2, 3), (2, 3), (2,), (2,)))
    with pytest.raises(ValueError, match="at least 2"):
        PriorConfig.from_paper(300, (10,), ((2,),))


def test_each_clip_mode_keeps_a_prior_beyond_the_border_as_its_peer_does():
    # SSD300's 10x10 map has centres up to 1.0133; torchvision's last map boxes 1.2304 wide.
    prior = np.array([[1.0133, 0.5, 1.2304, 0.5]])
    expected = {
        "none": [1.0133, 0.5, 1.2304, 0.5],
        "wh": [1.0133, 0.5, 1.0, 0.5],                  # torchvision: centre untouched
        "center_form": [1.0, 0.5, 1.0, 0.5],            # ssd.pytorch, lufficc: all four
        "corners": [(0.3981 + 1) / 2, 0.5, 1 - 0.3981, 0.5],  # corners 0.3981..1.6285 -> ..1
    }
    for mode, want in expected.items():
        np.testing.assert_allclose(clip_priors(prior, mode), [want], atol=1e-6, err_msg=mode)
    with pytest.raises(ValueError, match="clip must be one of"):
        dataclasses.replace(SSD300, clip=True)
