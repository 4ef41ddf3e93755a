import time

import numpy as np
import pytest

from ssd_jax.data import shapes
from ssd_jax.data.shapes import CLASS_NAMES, NUM_CLASSES, ShapesDataset, draw_ahead

SIZE = 128
VALIDATION = ShapesDataset("validation", num_examples=200, image_size=SIZE)


def _assert_same_example(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _pixel_boxes(example):
    return np.round(example["boxes"] * SIZE).astype(int)


def test_an_example_depends_only_on_split_seed_and_index():
    for index in (7, 0, 123):  # a fresh dataset, accessed out of order
        fresh = ShapesDataset("validation", num_examples=200, image_size=SIZE)
        _assert_same_example(fresh[index], VALIDATION[index])
    other_seed = ShapesDataset("validation", image_size=SIZE, seed=1)
    assert not np.array_equal(other_seed[7]["image"], VALIDATION[7]["image"])


def test_train_and_validation_never_share_images():
    train = ShapesDataset("train", image_size=SIZE)
    train_images = {train[i]["image"].tobytes() for i in range(40)}
    assert not train_images & {VALIDATION[i]["image"].tobytes() for i in range(40)}
    assert len(train_images) == 40


def test_examples_have_documented_dtypes_and_valid_boxes_and_labels():
    low_px = np.floor(max(shapes.MIN_SIDE * SIZE, shapes.MIN_SIDE_PX))
    high_px = np.ceil(shapes.MAX_SIDE * SIZE)
    for example in VALIDATION:
        boxes, labels = example["boxes"], example["labels"]
        assert example["image"].shape == (SIZE, SIZE, 3) and example["image"].dtype == np.uint8
        assert boxes.dtype == np.float32 and labels.dtype == np.int32
        assert boxes.shape == (len(labels), 4) and example["difficult"].shape == labels.shape
        assert not example["difficult"].any()
        assert 1 <= len(labels) <= VALIDATION.max_objects
        assert np.all((labels >= 1) & (labels <= NUM_CLASSES))
        assert np.all((boxes >= 0) & (boxes <= 1))
        sides = (boxes[:, 2:] - boxes[:, :2]) * SIZE
        assert np.all(sides >= low_px) and np.all(sides <= high_px)


def test_each_box_is_the_tight_box_of_a_visible_contrasting_shape():
    for index in range(60):
        example, owner = VALIDATION.render(index)
        image = example["image"].astype(np.float32)
        boxes_px = _pixel_boxes(example)
        for k, ((x0, y0, x1, y1), label) in enumerate(zip(boxes_px, example["labels"])):
            mine = owner[y0:y1, x0:x1] == k
            assert (owner == k).sum() == mine.sum(), "object pixels outside its box"
            # Its pixels touch all four sides of the box: the box is tight.
            assert mine[0].any() and mine[-1].any() and mine[:, 0].any() and mine[:, -1].any()
            # Most of the shape is visible.
            full = shapes.shape_mask(label, x1 - x0, y1 - y0).sum()
            assert mine.sum() >= 0.9 * shapes.MIN_VISIBLE * full
            # In the image, the shape is one flat colour (up to the pixel noise) ...
            patch = image[y0:y1, x0:x1]
            colour = np.median(patch[mine], axis=0)
            assert np.abs(patch[mine] - colour).max() <= 2 * shapes.NOISE
            # ... that stands out from the background around it.
            background = patch[owner[y0:y1, x0:x1] == -1]
            if len(background) >= 20:
                contrast = np.linalg.norm(background.mean(axis=0) - colour)
                assert contrast >= 0.75 * shapes.MIN_CONTRAST


def test_counts_classes_and_sizes_vary_from_small_to_large():
    examples = [VALIDATION[i] for i in range(200)]
    counts = np.array([len(e["labels"]) for e in examples])
    assert set(counts) == set(range(1, VALIDATION.max_objects + 1))
    labels = np.concatenate([e["labels"] for e in examples])
    assert set(labels) == set(range(1, len(CLASS_NAMES) + 1))
    sides = np.concatenate([e["boxes"][:, 2:] - e["boxes"][:, :2] for e in examples])
    assert sides.min() <= 0.1 and sides.max() >= 0.6
    aspect = sides[:, 0] / sides[:, 1]
    assert aspect.min() <= 0.6 and aspect.max() >= 1.6


def test_generation_takes_under_ten_milliseconds_per_image():
    dataset = ShapesDataset("train", image_size=SIZE)
    start = time.perf_counter()
    for index in range(200):
        dataset[index]
    assert time.perf_counter() - start < 2.0


def test_bad_split_and_out_of_range_index_raise():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("test")
    with pytest.raises(IndexError):
        ShapesDataset("train", num_examples=3)[3]


def test_a_cached_dataset_gives_the_drawn_examples_read_only_and_draws_each_once():
    drawn, cached = ShapesDataset("train", num_examples=4), ShapesDataset("train", num_examples=4,
                                                                           cache=True)
    first = cached[np.int64(2)]
    assert cached[2] is first  # the same example, not drawn again
    for key, value in drawn[2].items():
        np.testing.assert_array_equal(first[key], value)
        assert not first[key].flags.writeable
    with pytest.raises(IndexError):
        cached[4]


def test_draw_ahead_fills_the_caches_with_the_examples_a_read_draws():
    """In two worker processes and in this one: the same examples, read-only, each once."""
    train = ShapesDataset("train", num_examples=30, image_size=64, cache=True)
    val = ShapesDataset("validation", num_examples=7, image_size=64, cache=True)
    already = train[3]
    draw_ahead([train, val], processes=2, chunk=8)
    assert len(train._drawing) == 4 and len(val._drawing) == 1  # on their way, not waited for
    assert train[29]["image"].shape == (64, 64, 3)  # waits for the last chunk only
    assert len(train._cache) == 1 + 6 and len(train._drawing) == 3
    inline = ShapesDataset("train", num_examples=30, image_size=64, cache=True)
    draw_ahead([inline], processes=1)
    assert len(inline._cache) == 30 and not inline._drawing
    for dataset in (train, val, inline):
        fresh = ShapesDataset(**dataset.settings())
        for index in range(len(dataset)):
            for key, value in fresh[index].items():
                np.testing.assert_array_equal(dataset[index][key], value)
                assert not dataset[index][key].flags.writeable
        assert not dataset._drawing
    assert train[3] is already  # a cached example is not replaced
    with pytest.raises(ValueError, match="cache=True"):
        draw_ahead([ShapesDataset("train", num_examples=4)])


def test_a_dataset_being_drawn_ahead_can_be_pickled_for_grain_workers():
    import pickle
    dataset = ShapesDataset("train", num_examples=20, image_size=64, cache=True)
    draw_ahead([dataset], processes=2, chunk=10)
    copy = pickle.loads(pickle.dumps(dataset))  # drawn on reading, over there
    for key, value in dataset[15].items():
        np.testing.assert_array_equal(copy[15][key], value)


def test_the_training_augmentation_never_writes_into_a_cached_example():
    from ssd_jax.data import pipeline
    from ssd_jax.data.augment import ssd_train_transform
    source = ShapesDataset("train", num_examples=8, image_size=64, cache=True)
    loader = pipeline.make_train_loader(source, batch_size=4, max_boxes=6, seed=0,
                                        transform=ssd_train_transform(64), image_size=64)
    batches = [next(loader) for _ in range(4)]  # two epochs: every example read twice
    loader.close()
    assert all(batch["image"].shape == (4, 64, 64, 3) for batch in batches)
    fresh = ShapesDataset("train", num_examples=8, image_size=64)
    for index in range(8):
        np.testing.assert_array_equal(source[index]["image"], fresh[index]["image"])
