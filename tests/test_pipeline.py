import itertools

import numpy as np
import pytest

from ssd_jax.data.resize import resize_image
from ssd_jax.data.pipeline import (empty_train_batch, make_eval_loader, make_train_loader,
                                   pad_targets)
from ssd_jax.data.shapes import ShapesDataset

SIZE = 64
SOURCE = ShapesDataset("train", num_examples=20, image_size=SIZE, max_objects=6)
LOADER = dict(batch_size=8, max_boxes=4, image_size=SIZE)


def _example(num_boxes, difficult=()):
    boxes = np.stack([np.linspace(0.0, 0.5, num_boxes), np.full(num_boxes, 0.1),
                      np.linspace(0.1, 0.6, num_boxes), np.full(num_boxes, 0.9)], axis=1)
    return {"image": np.zeros((SIZE, SIZE, 3), np.uint8), "boxes": boxes.astype(np.float32),
            "labels": np.arange(1, num_boxes + 1, dtype=np.int32),
            "difficult": np.isin(np.arange(num_boxes), difficult)}


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _invert_colours_sometimes(example, rng):
    """A stand-in augmentation whose effect depends on its generator."""
    return {**example, "image": 255 - example["image"]} if rng.random() < 0.5 else example


def test_pad_targets_pads_with_a_mask_and_keeps_the_first_boxes():
    example = _example(5)
    padded = pad_targets(example, 8)
    assert padded["boxes"].shape == (8, 4) and padded["boxes"].dtype == np.float32
    assert padded["labels"].dtype == np.int32 and padded["mask"].dtype == bool
    np.testing.assert_array_equal(padded["mask"], np.arange(8) < 5)
    np.testing.assert_array_equal(padded["boxes"][:5], example["boxes"])
    assert not padded["boxes"][5:].any() and not padded["labels"][5:].any()
    truncated = pad_targets(example, 3)
    np.testing.assert_array_equal(truncated["labels"], [1, 2, 3])
    assert truncated["mask"].all()


def test_difficult_objects_are_dropped_unless_kept():
    example = _example(4, difficult=[1, 2])
    dropped = pad_targets(example, 4)
    np.testing.assert_array_equal(dropped["labels"], [1, 4, 0, 0])
    np.testing.assert_array_equal(dropped["boxes"][1], example["boxes"][3])
    kept = pad_targets(example, 4, keep_difficult=True)
    np.testing.assert_array_equal(kept["labels"], [1, 2, 3, 4])


def test_the_empty_train_batch_has_the_loaders_shapes_and_dtypes():
    loader = make_train_loader(SOURCE, seed=0, **LOADER)
    batch = next(loader)
    loader.close()
    empty = empty_train_batch(**LOADER)
    assert empty.keys() == batch.keys() - {"unreadable"}
    for key, value in empty.items():
        assert (value.shape, value.dtype) == (batch[key].shape, batch[key].dtype), key
        assert not value.any()


def test_train_loader_keeps_difficult_objects_when_asked():
    source = [_example(4, difficult=[1, 2])] * 8
    for keep_difficult, count in ((False, 2), (True, 4)):
        batch = next(make_train_loader(source, seed=0, keep_difficult=keep_difficult, **LOADER))
        np.testing.assert_array_equal(batch["mask"].sum(axis=1), count)


def test_train_batches_have_static_shapes_and_targets_match_the_source():
    batches = _take(make_train_loader(SOURCE, seed=0, **LOADER), 3)
    by_image = {SOURCE[i]["image"].tobytes(): SOURCE[i] for i in range(len(SOURCE))}
    for batch in batches:
        assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
        assert batch["boxes"].shape == (8, 4, 4) and batch["boxes"].dtype == np.float32
        assert batch["labels"].shape == (8, 4) and batch["labels"].dtype == np.int32
        assert batch["mask"].shape == (8, 4) and batch["mask"].dtype == bool
        for image, boxes, mask in zip(batch["image"], batch["boxes"], batch["mask"]):
            source_boxes = by_image[image.tobytes()]["boxes"][:4]
            np.testing.assert_array_equal(boxes[mask], source_boxes)
    first_epoch = np.concatenate([b["image"] for b in batches[:2]]).reshape(16, -1)
    assert len({row.tobytes() for row in first_epoch}) == 16, "an epoch repeats no example"


def test_images_are_resized_and_normalized_boxes_kept():
    source = ShapesDataset("train", num_examples=8, image_size=96)
    batch = next(make_train_loader(source, seed=0, batch_size=8, max_boxes=6, image_size=SIZE))
    assert batch["image"].shape == (8, SIZE, SIZE, 3)
    all_boxes = {source[i]["boxes"].tobytes() for i in range(8)}
    for boxes, mask in zip(batch["boxes"], batch["mask"]):
        assert boxes[mask].tobytes() in all_boxes


def test_batches_depend_only_on_the_seed():
    augment = dict(transform=_invert_colours_sometimes, **LOADER)
    first = _take(make_train_loader(SOURCE, seed=3, **augment), 5)
    _assert_same_batches(_take(make_train_loader(SOURCE, seed=3, **augment), 5), first)
    other = next(make_train_loader(SOURCE, seed=4, **augment))
    assert not np.array_equal(other["image"], first[0]["image"])
    plain = next(make_train_loader(SOURCE, seed=3, **LOADER))
    assert not np.array_equal(plain["image"], first[0]["image"]), "transform was applied"


def test_resumed_loader_continues_with_the_uninterrupted_batches():
    # 20 examples, batches of 8: 7 batches cross two epoch boundaries.
    options = dict(seed=1, transform=_invert_colours_sometimes, **LOADER)
    uninterrupted = _take(make_train_loader(SOURCE, **options), 7)
    _assert_same_batches(_take(make_train_loader(SOURCE, start_step=3, **options), 4),
                         uninterrupted[3:])
    stopped = make_train_loader(SOURCE, **options)
    _take(stopped, 3)
    restored = make_train_loader(SOURCE, **options)
    restored.set_state(stopped.get_state())
    _assert_same_batches(_take(restored, 4), uninterrupted[3:])


def test_finite_epochs_end_the_stream():
    batches = list(make_train_loader(SOURCE, seed=0, num_epochs=2, **LOADER))
    assert len(batches) == (2 * len(SOURCE)) // 8


def test_eval_loader_covers_every_example_once_in_order_with_a_padded_last_batch():
    source = ShapesDataset("validation", num_examples=10, image_size=SIZE)
    loader = make_eval_loader(source, batch_size=4, max_boxes=6, image_size=SIZE)
    for _ in range(2):  # the loader can be iterated again
        batches = list(loader)
        np.testing.assert_array_equal([b["valid"].sum() for b, _ in batches], [4, 4, 2])
        gts = list(itertools.chain.from_iterable(g for _, g in batches))
        images = np.concatenate([b["image"][b["valid"]] for b, _ in batches])
        for index, (gt, image) in enumerate(zip(gts, images, strict=True)):
            example = source[index]
            np.testing.assert_array_equal(image, example["image"])
            for key in ("boxes", "labels", "difficult"):
                np.testing.assert_array_equal(gt[key], example[key])
            assert gt["image_size"] == (SIZE, SIZE)
    last = batches[-1][0]
    assert last["image"].shape == (4, SIZE, SIZE, 3)
    assert not last["image"][2:].any() and not last["mask"][2:].any()


@pytest.mark.parametrize("mode", ["opencv", "float"])
def test_eval_loader_resizes_as_the_checkpoint_says(mode):
    source = ShapesDataset("validation", num_examples=3, image_size=2 * SIZE)
    (batch, _), = list(make_eval_loader(source, batch_size=3, max_boxes=6, image_size=SIZE,
                                        resize=mode))
    expected = np.stack([resize_image(source[i]["image"], SIZE, mode) for i in range(3)])
    assert batch["image"].dtype == expected.dtype == (np.float32 if mode == "float" else np.uint8)
    np.testing.assert_array_equal(batch["image"], expected)


def test_worker_processes_give_the_same_batches():
    options = dict(seed=2, transform=_invert_colours_sometimes, **LOADER)
    expected = _take(make_train_loader(SOURCE, **options), 4)
    loader = make_train_loader(SOURCE, worker_count=2, **options)
    try:
        _assert_same_batches(_take(loader, 4), expected)
    finally:
        loader.close()



def test_shards_split_the_source_between_processes():
    source = ShapesDataset("train", num_examples=12, image_size=32, max_objects=2)
    seen = []
    for index in range(3):
        loader = make_train_loader(source, batch_size=4, max_boxes=2, seed=0, image_size=32,
                                   num_epochs=1, shard=(index, 3))
        seen += [image.tobytes() for batch in loader for image in batch["image"]]
    assert sorted(seen) == sorted(source[i]["image"].tobytes() for i in range(12))
