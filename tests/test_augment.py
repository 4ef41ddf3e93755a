import colorsys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference import augment as reference_augment
from reference.augment import (MEAN_RGB, adjust_saturation, adjust_saturation_and_hue,
                               bilinear_taps, expand, filled_canvas, flip,
                               hsv_to_rgb, photometric_distort, random_crop, random_flip, resize,
                               rgb_to_hsv, sample_crop, sample_expansion, sample_patch,
                               split_rng)
from reference.boxes import iou
from ssd_jax.data import augment as fast_augment
from ssd_jax.data import resize as fast_resize
from ssd_jax.data.pipeline import make_train_loader
from ssd_jax.data.shapes import ShapesDataset

IMPLEMENTATIONS = [pytest.param(reference_augment, id="reference"),
                   pytest.param(fast_augment, id="fast")]
# Distinct object colours, far from the black background and the zoom-out fill.
PALETTE = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255),
                    (0, 255, 255)], np.uint8)
FILL = filled_canvas(1, 1, MEAN_RGB)[0, 0]
seeds = st.integers(0, 2**32 - 1)


@st.composite
def examples(draw, max_side=64, max_boxes=6):
    """A noise image and up to `max_boxes` boxes of at least one pixel at pixel edges."""
    height, width = draw(st.integers(4, max_side)), draw(st.integers(4, max_side))
    rng = np.random.default_rng(draw(seeds))
    boxes = []
    for _ in range(draw(st.integers(0, max_boxes))):
        x0, y0 = draw(st.integers(0, width - 1)), draw(st.integers(0, height - 1))
        x1, y1 = draw(st.integers(x0 + 1, width)), draw(st.integers(y0 + 1, height))
        boxes.append((x0, y0, x1, y1))
    count = len(boxes)
    return {
        "image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
        "boxes": (np.asarray(boxes, np.float32).reshape(-1, 4)
                  / np.array([width, height, width, height], np.float32)),
        "labels": rng.integers(1, 21, count).astype(np.int32),
        "difficult": rng.random(count) < 0.3,
        "id": "passes through",
    }


@st.composite
def scenes(draw):
    """Non-overlapping solid rectangles, object i in PALETTE[i], on black: one per chosen cell of
    a 3 x 2 grid. Labels are 1 + the colour index; difficult flags are random."""
    cell_width, cell_height = draw(st.integers(6, 20)), draw(st.integers(6, 20))
    cells = draw(st.lists(st.integers(0, 5), min_size=1, max_size=6, unique=True))
    image = np.zeros((2 * cell_height, 3 * cell_width, 3), np.uint8)
    boxes = []
    for colour, cell in enumerate(cells):
        left, top = (cell % 3) * cell_width, (cell // 3) * cell_height
        x0 = left + draw(st.integers(0, cell_width - 2))
        y0 = top + draw(st.integers(0, cell_height - 2))
        x1 = draw(st.integers(x0 + 1, left + cell_width))
        y1 = draw(st.integers(y0 + 1, top + cell_height))
        image[y0:y1, x0:x1] = PALETTE[colour]
        boxes.append((x0, y0, x1, y1))
    height, width = image.shape[:2]
    count = len(boxes)
    return {"image": image,
            "boxes": np.asarray(boxes, np.float32) / np.array([width, height] * 2, np.float32),
            "labels": np.arange(1, count + 1, dtype=np.int32),
            "difficult": np.asarray(draw(st.lists(st.booleans(), min_size=count,
                                                  max_size=count)), bool)}


def _assert_same_example(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _augment(module, example, seed, image_size=32):
    return module.ssd_train_transform(image_size)(example, np.random.default_rng(seed))


# --- The whole transform. ---

@pytest.mark.parametrize("module", IMPLEMENTATIONS)
@given(example=examples(), seed=seeds, image_size=st.sampled_from([16, 37]))
def test_output_has_documented_shapes_and_valid_boxes_inside_the_image(module, example, seed,
                                                                     image_size):
    out = _augment(module, example, seed, image_size)
    boxes = out["boxes"]
    assert out["image"].shape == (image_size, image_size, 3) and out["image"].dtype == np.uint8
    assert boxes.dtype == np.float32 and boxes.shape == (len(out["labels"]), 4)
    assert out["difficult"].shape == out["labels"].shape and out["id"] == "passes through"
    assert np.all((boxes >= 0) & (boxes <= 1))
    assert np.all(boxes[:, 2:] > boxes[:, :2])


@given(example=examples(), seed=seeds, image_size=st.sampled_from([16, 37]))
def test_fast_twin_gives_exactly_the_reference_output(example, seed, image_size):
    for seed in range(seed, seed + 4):  # zoom out, crop and flip each come in several ways
        _assert_same_example(_augment(fast_augment, example, seed, image_size),
                             _augment(reference_augment, example, seed, image_size))


@given(example=examples(), seed=seeds)
def test_transform_is_photometric_then_expand_crop_flip_resize(example, seed):
    photometric_rng, expand_rng, crop_rng, flip_rng = split_rng(np.random.default_rng(seed), 4)
    image = photometric_distort(example["image"], photometric_rng)
    image, boxes = expand(image, example["boxes"], expand_rng)
    image, boxes, kept = random_crop(image, boxes, crop_rng)
    image, boxes = random_flip(image, boxes, flip_rng)
    out = _augment(reference_augment, example, seed)
    np.testing.assert_array_equal(out["image"], resize(image, 32))
    np.testing.assert_array_equal(out["boxes"], boxes)
    np.testing.assert_array_equal(out["labels"], example["labels"][kept])
    np.testing.assert_array_equal(out["difficult"], example["difficult"][kept])


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
@given(example=examples(max_boxes=3), seed=seeds)
def test_same_seed_gives_the_same_output(module, example, seed):
    _assert_same_example(_augment(module, example, seed), _augment(module, example, seed))


def test_different_seeds_give_different_augmentations():
    example = {"image": np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8),
               "boxes": np.array([[0.1, 0.2, 0.6, 0.9]], np.float32),
               "labels": np.array([3], np.int32), "difficult": np.array([False])}
    outputs = {_augment(fast_augment, example, seed)["image"].tobytes() for seed in range(10)}
    assert len(outputs) == 10


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
@given(seed=seeds)
def test_an_image_without_objects_passes_through(module, seed):
    example = {"image": np.full((30, 40, 3), 200, np.uint8),
               "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int32),
               "difficult": np.zeros(0, bool)}
    out = _augment(module, example, seed)
    assert out["image"].shape == (32, 32, 3)
    assert out["boxes"].shape == (0, 4) and out["boxes"].dtype == np.float32
    assert out["labels"].shape == (0,) and out["difficult"].shape == (0,)


def test_bad_input_raises_value_error():
    good = {"image": np.zeros((10, 10, 3), np.uint8),
            "boxes": np.array([[0.1, 0.1, 0.5, 0.5]], np.float32),
            "labels": np.array([1], np.int32), "difficult": np.array([False])}
    bad = [("image", np.zeros((10, 10, 3), np.float32)), ("image", np.zeros((10, 10), np.uint8)),
           ("boxes", np.array([[0.5, 0.1, 0.5, 0.5]], np.float32)),
           ("boxes", np.array([[0.1, 0.1, 1.5, 0.5]], np.float32)),
           ("boxes", np.array([[0.1, 0.1, np.nan, 0.5]], np.float32)),
           ("labels", np.array([1, 2], np.int32)), ("difficult", np.array([True, False]))]
    for key, value in bad:
        for module in (reference_augment, fast_augment):
            with pytest.raises(ValueError):
                _augment(module, {**good, key: value}, 0)
    for module in (reference_augment, fast_augment):
        with pytest.raises(ValueError, match="image_size"):
            module.ssd_train_transform(0)
        with pytest.raises(ValueError, match="mean"):
            module.ssd_train_transform(32, mean=(1.0, 2.0))


def test_transform_plugs_into_the_train_loader():
    source = ShapesDataset("train", num_examples=8, image_size=48)
    loader = make_train_loader(source, batch_size=4, max_boxes=6, seed=0, image_size=32,
                               transform=fast_augment.ssd_train_transform(32))
    batch = next(loader)
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
    boxes = batch["boxes"][batch["mask"]]
    assert np.all((boxes >= 0) & (boxes <= 1)) and np.all(boxes[:, 2:] > boxes[:, :2])


# --- Geometry: boxes keep framing their objects. ---

def _geometric_steps(example, seed):
    """Zoom out, crop and flip of the reference (no photometric change), with labels and
    difficult flags kept as ssd_augment keeps them."""
    _, expand_rng, crop_rng, flip_rng = split_rng(np.random.default_rng(seed), 4)
    image, boxes = expand(example["image"], example["boxes"], expand_rng)
    image, boxes, kept = random_crop(image, boxes, crop_rng)
    image, boxes = random_flip(image, boxes, flip_rng)
    return np.ascontiguousarray(image), boxes, example["labels"][kept], example["difficult"][kept]


def _colour_extent(image, colour):
    """Pixel edges (x0, y0, x1, y1) of the pixels of exactly `colour`, or None."""
    ys, xs = np.nonzero(np.all(image == colour, axis=-1))
    return None if ys.size == 0 else np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


@given(scene=scenes(), seed=seeds)
def test_kept_boxes_frame_their_objects_exactly_and_labels_follow(scene, seed):
    image, boxes, labels, difficult = _geometric_steps(scene, seed)
    height, width = image.shape[:2]
    for box, label, is_difficult in zip(boxes, labels, difficult):
        pixels = box * [width, height, width, height]
        np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)
        x0, y0, x1, y1 = np.round(pixels).astype(int)
        colour = PALETTE[label - 1]
        assert np.all(image[y0:y1, x0:x1] == colour), "the box holds only its object"
        np.testing.assert_array_equal(_colour_extent(image, colour), [x0, y0, x1, y1])
        assert is_difficult == scene["difficult"][label - 1]


@given(scene=scenes(), seed=seeds)
def test_kept_boxes_frame_their_objects_after_resizing(scene, seed):
    size = 48
    image, boxes, labels, _ = _geometric_steps(scene, seed)
    resized = resize(image, size)
    # Interpolation blends across one input pixel, a band of up to size / side output pixels.
    tolerance = np.tile(1 + size / np.array(image.shape[1::-1]), 2)
    for box, label in zip(boxes, labels):
        pixels = box * size
        inner = np.round(pixels + [1, 1, -1, -1] * tolerance).astype(int)
        if np.any(inner[2:] <= inner[:2]):
            continue  # no pixel of pure colour is guaranteed
        colour = PALETTE[label - 1]
        assert np.all(resized[inner[1]:inner[3], inner[0]:inner[2]] == colour)
        assert np.all(np.abs(_colour_extent(resized, colour) - pixels) <= tolerance)


@given(example=examples(), seed=seeds)
def test_flipping_twice_is_the_identity(example, seed):
    image, boxes = flip(*flip(example["image"], example["boxes"]))
    np.testing.assert_array_equal(image, example["image"])
    np.testing.assert_allclose(boxes, example["boxes"], atol=1e-6)
    once, _ = flip(example["image"], example["boxes"])
    np.testing.assert_array_equal(once[:, 0], example["image"][:, -1])


@given(example=examples(), seed=seeds)
def test_expand_keeps_the_image_unchanged_inside_a_mean_canvas(example, seed):
    image, boxes = example["image"], example["boxes"]
    height, width = image.shape[:2]
    canvas, canvas_boxes = expand(image, boxes, np.random.default_rng(seed))
    expansion = sample_expansion(height, width, np.random.default_rng(seed))
    assert canvas.shape == (expansion.canvas_height, expansion.canvas_width, 3)
    assert height <= canvas.shape[0] <= 4 * height and width <= canvas.shape[1] <= 4 * width
    inside = (slice(expansion.top, expansion.top + height),
              slice(expansion.left, expansion.left + width))
    np.testing.assert_array_equal(canvas[inside], image)
    outside = np.ones(canvas.shape[:2], bool)
    outside[inside] = False
    assert np.all(canvas[outside] == FILL)
    shift = np.array([expansion.left, expansion.top] * 2)
    np.testing.assert_allclose(canvas_boxes * ([canvas.shape[1], canvas.shape[0]] * 2),
                               boxes * [width, height, width, height] + shift, atol=1e-3)


# --- The min-IoU crop. ---

@given(example=examples(max_boxes=4), seed=seeds,
       min_iou=st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 0.9]))
def test_sampled_patch_meets_its_minimum_iou_and_holds_an_object_centre(example, seed, min_iou):
    boxes = example["boxes"]
    height, width = example["image"].shape[:2]
    patch = sample_patch(boxes, height, width, min_iou, np.random.default_rng(seed))
    if patch is None:
        return  # all 50 trials failed; sample_crop then draws another choice
    left, top, right, bottom = patch
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    assert right - left > 0.3 * width - 1 and bottom - top > 0.3 * height - 1
    assert 0.5 * (right - left - 1) < bottom - top + 1 and bottom - top - 1 < 2 * (right - left + 1)
    normalized = np.array(patch) / [width, height, width, height]
    assert iou(boxes, normalized[None]).max() >= min_iou
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert np.any(np.all((centres > normalized[:2]) & (centres < normalized[2:]), axis=1))


def test_one_object_meeting_the_minimum_iou_is_enough():
    # Caffe's constraint: a patch qualifies through the large object alone; the small one cannot
    # reach IoU 0.5 with any patch of at least 0.3 x 0.3 of the image.
    boxes = np.array([[0.0, 0.0, 0.5, 1.0], [0.9, 0.9, 1.0, 1.0]], np.float32)
    patches = [sample_patch(boxes, 100, 100, 0.5, np.random.default_rng(seed))
               for seed in range(20)]
    patches = np.array([p for p in patches if p is not None]) / 100
    assert len(patches) > 0
    overlaps = iou(boxes, patches)
    assert np.all(overlaps[0] >= 0.5) and np.all(overlaps[1] < 0.5)


@given(example=examples(), seed=seeds)
def test_crop_keeps_exactly_the_objects_whose_centre_is_inside(example, seed):
    boxes = example["boxes"]
    height, width = example["image"].shape[:2]
    patch = sample_crop(boxes, height, width, np.random.default_rng(seed))
    image, cropped, kept = random_crop(example["image"], boxes, np.random.default_rng(seed))
    left, top, right, bottom = patch
    np.testing.assert_array_equal(image, example["image"][top:bottom, left:right])
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2 * [width, height]
    inside = np.all((centres > [left, top]) & (centres < [right, bottom]), axis=1)
    np.testing.assert_array_equal(kept, np.flatnonzero(inside))
    # Clipped to the patch, in its pixels.
    expected = np.clip(boxes[kept] * [width, height, width, height], [left, top] * 2,
                       [right, bottom] * 2) - [left, top, left, top]
    np.testing.assert_allclose(cropped * ([right - left, bottom - top] * 2), expected,
                               atol=1e-3)
    if patch == (0, 0, width, height):
        np.testing.assert_array_equal(cropped, boxes)


# --- Photometric distortions. ---

@given(example=examples(max_boxes=0), seed=seeds)
def test_photometric_distortion_works_pixel_by_pixel(example, seed):
    image = example["image"]
    height, width = image.shape[:2]
    distorted = photometric_distort(image, np.random.default_rng(seed))
    assert distorted.shape == image.shape and distorted.dtype == np.uint8
    region = (slice(height // 3, height), slice(1, width // 2 + 1))
    np.testing.assert_array_equal(
        photometric_distort(image[region], np.random.default_rng(seed)), distorted[region])
    np.testing.assert_array_equal(
        photometric_distort(image[:, ::-1], np.random.default_rng(seed)), distorted[:, ::-1])


@given(seed=seeds, value=st.sampled_from([0, 1, 128, 254, 255]))
def test_photometric_distortion_of_extreme_images_stays_uint8(seed, value):
    image = np.full((5, 7, 3), value, np.uint8)
    image[0, 0] = (255, 0, 0)
    distorted = photometric_distort(image, np.random.default_rng(seed))
    assert distorted.shape == image.shape and distorted.dtype == np.uint8


@given(seed=seeds, height=st.integers(1, 200), width=st.integers(1, 120))
def test_fast_photometric_distortion_gives_exactly_the_reference_pixels(seed, height, width):
    # Tall images span several strips; a quarter of the seeds take the table shortcut.
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        fast_augment.photometric_distort(image, np.random.default_rng(seed)),
        photometric_distort(image, np.random.default_rng(seed)))


def test_fast_filled_canvas_is_the_reference_canvas():
    for mean in (MEAN_RGB, (0.4, 255.6, 300.0)):
        np.testing.assert_array_equal(fast_augment.filled_canvas(5, 7, mean),
                                      filled_canvas(5, 7, mean))


def test_hsv_matches_colorsys_and_round_trips():
    rgb = np.random.default_rng(0).uniform(0, 255, (3, 500)).astype(np.float32)
    rgb[:, :20] = np.round(rgb[:, :20] / 64) * 64   # ties between channels, greys
    hue, saturation, value = rgb_to_hsv(rgb)
    for i in range(rgb.shape[1]):
        h, s, v = colorsys.rgb_to_hsv(*rgb[:, i].astype(np.float64))
        angle = abs(hue[i] - 360 * h) % 360
        assert min(angle, 360 - angle) < 1e-3 and abs(saturation[i] - s) < 1e-5
        assert value[i] == v
    assert np.all((hue >= 0) & (hue <= 360))
    np.testing.assert_allclose(hsv_to_rgb(hue, saturation, value), rgb, atol=1e-3)


def test_hue_rotation_and_saturation_move_colours_as_named():
    red = np.array([255, 0, 0], np.float32)[:, None]
    np.testing.assert_allclose(adjust_saturation_and_hue(red, 1.0, 120.0)[:, 0], [0, 255, 0],
                               atol=1e-3)
    np.testing.assert_allclose(adjust_saturation_and_hue(red, 1.0, -120.0)[:, 0], [0, 0, 255],
                               atol=1e-3)
    np.testing.assert_allclose(adjust_saturation(np.array([200, 100, 50], np.float32)[:, None],
                                                 0.5)[:, 0], [200, 150, 125], atol=1e-3)


@given(seed=seeds, factor=st.floats(0.5, 1.5))
def test_saturation_scales_each_channel_distance_from_the_largest(seed, factor):
    # HSV saturation is chroma / value: scaling it (capped at 1) scales every channel's
    # distance from the largest channel by the factor, or enough to bring the smallest to 0.
    pixels = np.random.default_rng(seed).integers(0, 256, (3, 40)).astype(np.float32)
    value = pixels.max(axis=0)
    chroma = value - pixels.min(axis=0)
    scale = np.minimum(factor, value / np.where(chroma == 0, 1, chroma))
    np.testing.assert_allclose(adjust_saturation(pixels, factor),
                               value - scale * (value - pixels), atol=1e-3)


# --- Resize. ---

@given(example=examples(max_boxes=0))
def test_resize_to_the_same_size_is_the_identity(example):
    image = example["image"]
    if image.shape[0] == image.shape[1]:
        np.testing.assert_array_equal(resize(image, image.shape[0]), image)
    constant = np.full(image.shape, 77, np.uint8)
    assert np.all(resize(constant, 13) == 77)


def test_resize_interpolates_with_half_pixel_centres():
    low, high, weight = bilinear_taps(2, 4)   # input positions -0.25, 0.25, 0.75, 1.25, clamped
    np.testing.assert_array_equal(low, [0, 0, 0, 1])
    np.testing.assert_array_equal(high, [1, 1, 1, 1])
    np.testing.assert_allclose(weight, [0, 0.25, 0.75, 0])
    image = np.zeros((4, 2, 3), np.uint8)
    image[:, 1] = 100
    np.testing.assert_array_equal(resize(image, 4)[0, :, 0], [0, 25, 75, 100])


@given(example=examples(max_side=200, max_boxes=0), size=st.sampled_from([1, 16, 37, 300]))
def test_fast_resize_gives_exactly_the_reference_pixels(example, size):
    image = example["image"]
    np.testing.assert_array_equal(fast_resize.resize(image, size), resize(image, size))
    mirrored = image[:, ::-1]  # a view, not contiguous
    np.testing.assert_array_equal(fast_resize.resize(mirrored, size), resize(mirrored, size))
