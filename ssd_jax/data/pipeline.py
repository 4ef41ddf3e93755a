"""Batching with grain for any random-access detection source (Shapes, VOC).

A source has `__len__` and `__getitem__(i)` returning {"image": uint8 [H, W, 3], "boxes": float32
[G, 4] corners (xmin, ymin, xmax, ymax) in [0, 1], "labels": int32 [G] in 1..C, "difficult": bool
[G]}. Batches are NumPy dicts with static shapes, ground truth padded to `max_boxes` slots with a
mask, so a jitted step compiles once.

Resuming training: batch k of `make_train_loader` depends only on (source, seed, k), so a run that
restarts after `step` batches either builds the loader with `start_step=step` or restores the
iterator's `get_state()` (a small dict, saved next to the checkpoint) with `set_state(state)`.
Both give exactly the batches the uninterrupted run would have seen.
"""
import functools
import sys

import grain
import numpy as np
from absl import flags

from ssd_jax.data.resize import resize_image as resize_to_input

# Elements of the iterators are whole batches: a few threads, a short queue of ready batches.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def pad_targets(example: dict, max_boxes: int, *, keep_difficult: bool = False) -> dict:
    """Ground truth padded to `max_boxes` slots, for static shapes.

    Difficult objects are dropped unless `keep_difficult`. Beyond `max_boxes` objects, the first
    `max_boxes` (in the source's order) are kept, the rest dropped.

    Returns: {"image": unchanged, "boxes": float32 [G, 4] corners (zeros in empty slots),
    "labels": int32 [G] (0 in empty slots), "mask": bool [G] True for real objects}, G = max_boxes.
    """
    difficult = np.asarray(example["difficult"], bool)
    keep = np.ones_like(difficult) if keep_difficult else ~difficult
    boxes = np.asarray(example["boxes"], np.float32).reshape(-1, 4)[keep][:max_boxes]
    labels = np.asarray(example["labels"], np.int32)[keep][:max_boxes]
    count = len(labels)
    return {
        "image": example["image"],
        "boxes": np.pad(boxes, ((0, max_boxes - count), (0, 0))),
        "labels": np.pad(labels, (0, max_boxes - count)),
        "mask": np.arange(max_boxes) < count,
    }


def clip_boxes(example: dict) -> dict:
    """Example with its boxes clipped to the image ([0, 1]), as the training loader gives every
    example to the augmentation (or, without it, to the model), so both see the same boxes.
    Raises ValueError naming the example if a box is degenerate (xmax <= xmin or ymax <= ymin)
    once clipped: a fault of the data, which no learning rate would fix."""
    boxes = np.clip(np.asarray(example["boxes"], np.float32).reshape(-1, 4), 0.0, 1.0)
    bad = np.flatnonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    if bad.size:
        name = example.get("image_id", "without an image_id")
        raise ValueError(f"example {name}: box {bad[0]} {np.asarray(example['boxes'])[bad[0]]} "
                         "is degenerate (xmax <= xmin or ymax <= ymin within the image)")
    return {**example, "boxes": boxes}


class SkipUnreadable:
    """A source whose examples that cannot be read (OSError: a truncated or vanished image file)
    come out as empty `image_size` x `image_size` black images without objects, with
    "unreadable" True (False for the others), each reported once on stderr. An example without
    objects adds nothing to the loss: no positives, so no negatives are mined in it."""

    def __init__(self, source, image_size: int):
        self.source, self.image_size, self.reported = source, image_size, set()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index) -> dict:
        try:
            return {**self.source[index], "unreadable": False}
        except OSError as error:
            if index not in self.reported:
                self.reported.add(index)
                print(f"skipped unreadable example {index}: {error}", file=sys.stderr)
            return {"image": np.zeros((self.image_size, self.image_size, 3), np.uint8),
                    "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int32),
                    "difficult": np.zeros(0, bool), "unreadable": True}


def resize_image(example: dict, image_size: int, mode: str = "uint8") -> dict:
    """Example with its image resized to [S, S, 3], S = image_size, by default by the same
    bilinear resize the training augmentation ends with (`ssd_jax.data.resize.resize`), so
    evaluation sees what training saw; `mode` names another of `ssd_jax.data.resize`'s (a
    converted peer's own). Normalized boxes need no change. A uint8 image already of that
    size is passed through untouched."""
    image = example["image"]
    if image.shape[:2] == (image_size, image_size) and mode != "float":
        return example
    return {**example, "image": resize_to_input(image, image_size, mode)}


def make_train_loader(source, *, batch_size: int, max_boxes: int, seed: int, transform=None,
                      worker_count: int = 0, num_epochs: int | None = None,
                      image_size: int = 128, start_step: int = 0,
                      shard: tuple[int, int] = (0, 1),
                      keep_difficult: bool = False) -> grain.DatasetIterator:
    """Shuffled, repeated, augmented training batches.

    Args:
      source: random-access source of examples (see the module docstring).
      transform: optional augmentation `transform(example, rng: np.random.Generator) -> example`,
        applied before resizing; its generator is derived from (seed, position in the stream), so
        augmentations differ from epoch to epoch yet repeat exactly for the same seed.
      worker_count: worker processes (grain `mp_prefetch`); 0 draws batches in this process.
        The batches are the same whatever the worker count. Call the iterator's `close()` when
        done to stop the workers.
      num_epochs: passes over the source; None repeats forever (reshuffled each epoch).
      start_step: batches to skip, to resume a run that stopped after `start_step` batches.
      shard: (index, count): read only examples index, index + count, ... of the source, so
        each process of a multi-host run feeds its devices different examples.
      keep_difficult: train on objects marked difficult too, as the Caffe release does
        (`train_on_diff_gt`); by default they are dropped, as ssd.pytorch does.

    Boxes are clipped to the image first (`clip_boxes`); an example that cannot be read is
    replaced by an empty one (`SkipUnreadable`).

    Returns: iterator (with grain's `get_state` / `set_state`) of dicts {"image": uint8
    [B, S, S, 3], "boxes": float32 [B, G, 4] corners, "labels": int32 [B, G], "mask": bool [B, G],
    "unreadable": bool [B], True for the empty stand-ins of unreadable examples} with
    B = batch_size, S = image_size, G = max_boxes. An incomplete last batch is dropped.
    """
    index, count = shard
    dataset = (grain.MapDataset.source(SkipUnreadable(source, image_size))[index::count]
               .shuffle(seed=seed).repeat(num_epochs).map(clip_boxes))
    if transform is not None:
        dataset = dataset.random_map(transform, seed=seed)
    dataset = (dataset.map(functools.partial(resize_image, image_size=image_size))
               .map(functools.partial(_padded_train_example, max_boxes=max_boxes,
                                      keep_difficult=keep_difficult))
               .batch(batch_size, drop_remainder=True))
    batches = dataset[start_step:].to_iter_dataset(READ_OPTIONS)
    if worker_count > 0:
        # grain 0.2.18 reads an absl flag when it starts workers and fails in a program that never
        # parsed flags (google/grain#1355, fixed upstream): take the defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(batches)


def empty_train_batch(*, batch_size: int, max_boxes: int, image_size: int) -> dict:
    """Zeros in the shapes and dtypes of `make_train_loader`'s batches, less "unreadable":
    what the train step can be compiled for before the first batch is read."""
    empty = pad_targets({"image": np.zeros((image_size, image_size, 3), np.uint8),
                         "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int32),
                         "difficult": np.zeros(0, bool)}, max_boxes)
    return {key: np.stack([value] * batch_size) for key, value in empty.items()}


def _padded_train_example(example: dict, max_boxes: int, keep_difficult: bool) -> dict:
    return {**pad_targets(example, max_boxes, keep_difficult=keep_difficult),
            "unreadable": example["unreadable"]}


def make_eval_loader(source, *, batch_size: int, max_boxes: int, image_size: int = 128,
                     resize: str = "uint8") -> grain.IterDataset:
    """Every example once, in source order, in batches of exactly `batch_size`, the images
    resized by `resize_image` with mode `resize`.

    Iterating yields (batch, gts). batch: {"image": [B, S, S, 3] uint8 (float32 for
    resize="float"), "boxes": [B, G, 4],
    "labels": [B, G], "mask": [B, G]} as in training (difficult objects dropped) plus "valid":
    bool [B], False for the zero-filled slots that pad the last batch. gts: one dict per valid
    slot with the example's original ground truth {"boxes": float32 [N, 4] corners, "labels":
    int32 [N], "difficult": bool [N], "image_size": (height, width) of the source image}, plus
    the example's "image_id" when the source gives one. The returned dataset can be iterated
    any number of times.
    """
    to_example = functools.partial(_eval_example, max_boxes=max_boxes, image_size=image_size,
                                   resize=resize)
    to_batch = functools.partial(_padded_eval_batch, batch_size=batch_size)
    return (grain.MapDataset.source(source).map(to_example)
            .batch(batch_size, batch_fn=to_batch).to_iter_dataset(READ_OPTIONS))


def _eval_example(example, *, max_boxes, image_size, resize):
    gt = {
        "boxes": np.asarray(example["boxes"], np.float32).reshape(-1, 4),
        "labels": np.asarray(example["labels"], np.int32),
        "difficult": np.asarray(example["difficult"], bool),
        "image_size": tuple(example["image"].shape[:2]),
    }
    if "image_id" in example:
        gt["image_id"] = example["image_id"]
    return pad_targets(resize_image(example, image_size, resize), max_boxes), gt


def _padded_eval_batch(items, *, batch_size):
    examples, gts = zip(*items)
    count = len(examples)
    batch = {key: np.stack([example[key] for example in examples]) for key in examples[0]}
    batch = {key: np.pad(value, [(0, batch_size - count)] + [(0, 0)] * (value.ndim - 1))
             for key, value in batch.items()}
    batch["valid"] = np.arange(batch_size) < count
    return batch, list(gts)
