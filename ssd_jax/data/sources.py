"""Data sources by name: (train source, eval source, class names).

A source is anything with __len__ and __getitem__ returning
{"image": uint8 [H, W, 3], "boxes": [G, 4] corners, "labels": [G] in 1..C,
"difficult": [G] bool}.
"""
from ssd_jax.data import voc
from ssd_jax.data.shapes import CLASS_NAMES as SHAPE_CLASSES
from ssd_jax.data.shapes import ShapesDataset

DATASETS = ("shapes", "voc")


class DatasetUnavailableError(RuntimeError):
    """The dataset cannot be read here; the message says what to do instead."""


def get_sources(dataset: str, *, image_size: int, train_examples: int = 0,
                eval_examples: int = 0, seed: int = 0, data_dir: str = ""):
    """(train source, eval source, class names) of `dataset`.

    For "voc", `data_dir` is a VOCdevkit folder, a folder holding one, or a TFDS data dir with
    voc/2007 and voc/2012 prepared ("": TFDS's default); train/eval_examples > 0 keep only the
    first that many examples. Raises DatasetUnavailableError when the data is not there.
    """
    if dataset == "shapes":
        train = ShapesDataset("train", num_examples=train_examples or 20_000,
                              image_size=image_size, seed=seed)
        val = ShapesDataset("validation", num_examples=eval_examples or 500,
                            image_size=image_size, seed=seed)
        return train, val, SHAPE_CLASSES
    if dataset == "voc":
        try:
            train, test = voc.find_voc(data_dir, train_examples=train_examples,
                                       test_examples=eval_examples)
        except FileNotFoundError as error:
            raise DatasetUnavailableError(
                f"{error}.\nPoint --data-dir at an extracted VOCdevkit folder, or prepare the "
                f"TFDS copy once with: {voc.PREPARE_COMMAND}\n"
                "Or train on the built-in synthetic data with --dataset shapes.") from None
        return train, test, voc.VOC_CLASSES
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
