"""Data sources by name: (train source, eval source, class names).

A source is anything with __len__ and __getitem__ returning
{"image": uint8 [H, W, 3], "boxes": [G, 4] corners, "labels": [G] in 1..C,
"difficult": [G] bool}.
"""
from ssd_jax.data.shapes import CLASS_NAMES as SHAPE_CLASSES
from ssd_jax.data.shapes import ShapesDataset

DATASETS = ("shapes", "voc")


class DatasetUnavailableError(RuntimeError):
    """The dataset cannot be read here; the message says what to do instead."""


def get_sources(dataset: str, *, image_size: int, train_examples: int = 0,
                eval_examples: int = 0, seed: int = 0):
    if dataset == "shapes":
        train = ShapesDataset("train", num_examples=train_examples or 20_000,
                              image_size=image_size, seed=seed)
        val = ShapesDataset("validation", num_examples=eval_examples or 500,
                            image_size=image_size, seed=seed)
        return train, val, SHAPE_CLASSES
    if dataset == "voc":
        raise DatasetUnavailableError(
            "PASCAL VOC support is not built yet: train on the built-in synthetic data "
            "with --dataset shapes")
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
