"""Data sources by name: (train source, eval source, class names).

A source is anything with __len__ and __getitem__ returning
{"image": uint8 [H, W, 3], "boxes": [G, 4] corners, "labels": [G] in 1..C,
"difficult": [G] bool}.
"""
from ssd_jax.data import coco, voc
from ssd_jax.data.shapes import CLASS_NAMES as SHAPE_CLASSES
from ssd_jax.data.shapes import ShapesDataset

DATASETS = ("shapes", "voc", "coco")
# The metric each dataset is scored by unless asked otherwise (`evaluation.METRICS`).
NATURAL_METRICS = {"shapes": "voc07", "voc": "voc07", "coco": "coco"}


class DatasetUnavailableError(RuntimeError):
    """The dataset cannot be read here; the message says what to do instead."""


def get_sources(dataset: str, *, image_size: int, train_examples: int = 0,
                eval_examples: int = 0, seed: int = 0, data_dir: str = "",
                train_split: str = "", eval_split: str = "", classes: str = ""):
    """(train source, eval source, class names) of `dataset`.

    For "voc", `data_dir` is a VOCdevkit folder, a folder holding one, or a TFDS data dir with
    voc/2007 and voc/2012 prepared ("": TFDS's default), or a VOC-format folder of your own
    (Annotations/, JPEGImages/, ImageSets/Main/<split>.txt; `train_split` / `eval_split`: ""
    for trainval / test) whose classes are `classes` (comma-separated) or those its training
    annotations name; train/eval_examples > 0 keep only the first that many examples.
    For "coco", `data_dir` is a COCO-format folder or a TFDS data dir with coco/2017 prepared;
    `train_split` / `eval_split` name the splits ("": train2017 / val2017). The sources have
    `label_ids`, the dataset's category id of each label.
    Raises DatasetUnavailableError when the data is not there or is unusable.
    """
    if dataset == "shapes":
        # Cached: the main job reads its 20,000 training images about twice, and the
        # validation images at each evaluation.
        train = ShapesDataset("train", num_examples=train_examples or 20_000,
                              image_size=image_size, seed=seed, cache=True)
        val = ShapesDataset("validation", num_examples=eval_examples or 500,
                            image_size=image_size, seed=seed, cache=True)
        return train, val, SHAPE_CLASSES
    if dataset == "voc":
        try:
            train, test = voc.find_voc(
                data_dir, train_examples=train_examples, test_examples=eval_examples,
                class_names=tuple(name.strip().lower() for name in classes.split(",")
                                  if name.strip()),
                splits=(train_split, eval_split))
        except FileNotFoundError as error:
            raise DatasetUnavailableError(
                f"{error}.\nPoint --data-dir at an extracted VOCdevkit folder (or a VOC-format "
                "folder of your own), or prepare the "
                f"TFDS copy once with: {voc.PREPARE_COMMAND}\n"
                "Or train on the built-in synthetic data with --dataset shapes.") from None
        return train, test, train.class_names
    if dataset == "coco":
        splits = (train_split or coco.DEFAULT_SPLITS[0], eval_split or coco.DEFAULT_SPLITS[1])
        try:
            train, val = coco.find_coco(data_dir, splits, train_examples=train_examples,
                                        eval_examples=eval_examples)
        except (FileNotFoundError, ValueError) as error:
            raise DatasetUnavailableError(
                f"{error}\nPoint --data-dir at a COCO-format folder (annotations/"
                "instances_<split>.json, images in <split>/), e.g. one written by "
                "`python -m ssd_jax.data.shapes_coco DIR`.") from None
        if train.class_names != val.class_names or train.label_ids != val.label_ids:
            raise DatasetUnavailableError(
                f"the splits {splits} have different categories: {train.class_names} (ids "
                f"{train.label_ids}) and {val.class_names} (ids {val.label_ids})")
        return train, val, train.class_names
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
