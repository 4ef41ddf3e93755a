"""COCO-format detection data (Lin et al. 2014) as random-access sources: COCO 2017 itself and
what labelling tools export in its format (CVAT, Label Studio, Roboflow).

- `COCOFolder` reads `DIR/annotations/instances_<split>.json` with the images in `DIR/<split>/`
  (COCO's own layout; Roboflow's `DIR/<split>/_annotations.coco.json` is read too).
- `COCOTfds` reads TFDS's prepared `coco/2017` (array_record files) with `tfds.data_source`,
  without TensorFlow, as `ssd_jax.data.voc.VOCTfds` reads VOC.

`dataset[i]` is {"image": uint8 [H, W, 3] RGB, "boxes": float32 [G, 4] corners (xmin, ymin, xmax,
ymax) in [0, 1], "labels": int32 [G] in 1..C, "difficult": bool [G] (all False), "image_id": the
dataset's own image id (int), "image_size": (H, W)}.

- Labels: the categories sorted by id are the classes 1..C; `category_ids[label - 1]` is the
  dataset's own id of a label (`label_ids`, the same tuple, is what the checkpoint and every
  output report), so ids need not be 1..C nor listed in order. Class names come from the json.
- Crowd regions (`iscrowd` 1) are no training targets: they are left out of the examples and
  kept in `coco_ground_truth()`, the json of the source's images that pycocotools scores against
  (`ssd_jax.coco_eval`), which ignores detections on them as COCO's evaluation does.
- Boxes: COCO's float pixel [x, y, w, h], clipped to the image the json describes (exports often
  hold boxes that cross the border), then divided by its width and height. A box with no area
  left is dropped and counted (`dropped_boxes`).
- Images without annotations are examples without objects (background only).
"""
import io
import json
import operator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ssd_jax.convert import COCO_CATEGORY_IDS, COCO_CLASSES
from ssd_jax.data.images import decode_image, read_image

DEFAULT_SPLITS = ("train2017", "val2017")
TFDS_SPLITS = {"train2017": "train", "val2017": "validation"}
MAX_LISTED = 20  # problems listed in one error message; the rest are counted


def annotation_path(root, split: str) -> Path:
    """The annotation file of `split`: COCO's layout, else Roboflow's export layout.
    FileNotFoundError naming both if neither exists."""
    root = Path(root)
    candidates = (root / "annotations" / f"instances_{split}.json",
                  root / split / "_annotations.coco.json")
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no COCO annotations for split {split!r} in {root}: expected "
                            f"{candidates[0]} (or {candidates[1]})")


def _entry_name(kind: str, index: int, entry) -> str:
    entry_id = entry.get("id") if isinstance(entry, dict) else None
    return f"{kind}[{index}]" + (f" (id {entry_id})" if entry_id is not None else "")


def _integer(entry: dict, key: str):
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key!r} is {value!r}, not an integer")
    return value


def _box(entry: dict) -> list[float]:
    box = entry.get("bbox")
    if (not isinstance(box, (list, tuple)) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
            or not np.all(np.isfinite(box))):
        raise ValueError(f"'bbox' is {box!r}, not four finite numbers [x, y, w, h]")
    return [float(v) for v in box]


def clip_box(box, width: float, height: float) -> tuple[float, float, float, float]:
    """COCO's pixel [x, y, w, h] -> corners (xmin, ymin, xmax, ymax) clipped to the image."""
    x, y, w, h = box
    return (min(max(x, 0.0), width), min(max(y, 0.0), height),
            min(max(x + w, 0.0), width), min(max(y + h, 0.0), height))


class COCOAnnotations:
    """A parsed, checked COCO annotation file.

    Attributes:
      path: the file.
      category_ids: the dataset's category ids in label order (sorted), C of them.
      class_names: their names.
      labels: category id -> label (1..C).
      images: the "images" entries in file order.
      annotations: image id -> its usable annotation entries (crowd included), with "bbox"
        clipped to the image; "area" and "iscrowd" filled in where the export left them out.
      dropped_boxes: annotations left out because no area is left once clipped.

    Raises ValueError naming the file and every bad entry (up to MAX_LISTED, the rest counted):
    not JSON, a missing list, a category or image without an integer id, a duplicate id, an
    image without a file name or a positive size, an annotation of an unknown image or category
    or whose bbox is not four finite numbers.
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.path}: not valid JSON ({error})") from None
        except UnicodeDecodeError:
            raise ValueError(f"{self.path}: not a text (JSON) file") from None
        if not isinstance(data, dict):
            raise ValueError(f"{self.path}: expected a JSON object with 'images', 'annotations' "
                             f"and 'categories', got {type(data).__name__}")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"{self.path}: {key!r} is missing or not a list")
        problems = []
        categories = self._categories(data["categories"], problems)
        self.category_ids = tuple(sorted(categories))
        self.labels = {category_id: label for label, category_id in enumerate(self.category_ids, 1)}
        self.class_names = tuple(categories[i] for i in self.category_ids)
        self.images = self._images(data["images"], problems)
        sizes = {image["id"]: (image["width"], image["height"]) for image in self.images}
        self.annotations = {image_id: [] for image_id in sizes}
        self.dropped_boxes = 0
        for index, entry in enumerate(data["annotations"]):
            try:
                self._add_annotation(entry, sizes, categories)
            except ValueError as error:
                problems.append(f"{_entry_name('annotations', index, entry)}: {error}")
        if problems:
            listed = problems[:MAX_LISTED]
            more = len(problems) - len(listed)
            raise ValueError(f"{self.path}: {len(problems)} bad entries; fix or remove them:\n  "
                             + "\n  ".join(listed) + (f"\n  ... and {more} more" if more else ""))
        if not self.category_ids:
            raise ValueError(f"{self.path}: 'categories' is empty: no class to learn")

    @staticmethod
    def _categories(entries, problems) -> dict:
        names = {}
        for index, entry in enumerate(entries):
            try:
                if not isinstance(entry, dict):
                    raise ValueError("not an object")
                category_id = _integer(entry, "id")
                name = entry.get("name")
                if not isinstance(name, str) or not name.strip():
                    raise ValueError(f"'name' is {name!r}, not a class name")
                if category_id in names:
                    raise ValueError(f"duplicate category id {category_id}")
                names[category_id] = name.strip()
            except ValueError as error:
                problems.append(f"{_entry_name('categories', index, entry)}: {error}")
        return names

    @staticmethod
    def _images(entries, problems) -> list[dict]:
        images, seen = [], set()
        for index, entry in enumerate(entries):
            try:
                if not isinstance(entry, dict):
                    raise ValueError("not an object")
                image_id = _integer(entry, "id")
                if image_id in seen:
                    raise ValueError(f"duplicate image id {image_id}")
                if not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
                    raise ValueError(f"'file_name' is {entry.get('file_name')!r}")
                for key in ("width", "height"):
                    if _integer(entry, key) < 1:
                        raise ValueError(f"{key!r} is {entry[key]}, not a positive size")
                seen.add(image_id)
                images.append(entry)
            except ValueError as error:
                problems.append(f"{_entry_name('images', index, entry)}: {error}")
        return images

    def _add_annotation(self, entry, sizes: dict, categories: dict) -> None:
        if not isinstance(entry, dict):
            raise ValueError("not an object")
        image_id, category_id = _integer(entry, "image_id"), _integer(entry, "category_id")
        if image_id not in sizes:
            raise ValueError(f"image_id {image_id} is not in 'images'")
        if category_id not in categories:
            raise ValueError(f"category_id {category_id} is not in 'categories' "
                             f"{sorted(categories)}")
        width, height = sizes[image_id]
        xmin, ymin, xmax, ymax = clip_box(_box(entry), width, height)
        if xmax <= xmin or ymax <= ymin:
            self.dropped_boxes += 1
            return
        clipped = [xmin, ymin, xmax - xmin, ymax - ymin]
        self.annotations[image_id].append(
            {**entry, "bbox": clipped, "iscrowd": int(bool(entry.get("iscrowd", 0))),
             "area": float(entry.get("area") or clipped[2] * clipped[3])})

    def targets(self, image: dict) -> dict:
        """The training targets of one "images" entry: {"boxes", "labels", "difficult"} as in
        the module docstring, crowd regions left out."""
        scale = np.array([image["width"], image["height"]] * 2, np.float64)
        objects = [a for a in self.annotations[image["id"]] if not a["iscrowd"]]
        corners = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in objects)]
        return {
            "boxes": (np.asarray(corners, np.float64).reshape(-1, 4) / scale).astype(np.float32),
            "labels": np.asarray([self.labels[a["category_id"]] for a in objects], np.int32),
            "difficult": np.zeros(len(objects), bool),
        }

    def ground_truth(self, images) -> dict:
        """The COCO json (images, annotations, categories) of `images`, for pycocotools; each
        annotation gets a unique id (pycocotools indexes them by id; exports may repeat them)."""
        annotations = [dict(a, id=number) for number, a in enumerate(
            (a for image in images for a in self.annotations[image["id"]]), 1)]
        return {"images": [dict(image) for image in images], "annotations": annotations,
                "categories": [{"id": i, "name": n}
                               for i, n in zip(self.category_ids, self.class_names)]}


def _limit(items, max_examples: int):
    return items[:max_examples] if max_examples > 0 else items


class COCOFolder:
    """Random-access source over a COCO-format folder (see the module docstring).

    Args:
      root: the folder holding annotations/ and the split's image folder.
      split: e.g. "train2017", "val2017", or an export's "train" / "valid".
      max_examples: keep only the first this many images (0: all).
      check: check every image file's header against the json up front (`check`).
    """

    def __init__(self, root, split: str, max_examples: int = 0, *, check: bool = True):
        self.root, self.split = Path(root), split
        self.image_dir = self.root / split
        self.coco = COCOAnnotations(annotation_path(self.root, split))
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder {self.image_dir} of {self.coco.path} not found")
        self.images = _limit(self.coco.images, max_examples)
        self.class_names = self.coco.class_names
        self.num_classes = len(self.class_names)
        self.label_ids = self.category_ids = self.coco.category_ids
        if check:
            self.check()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index) -> dict:
        image_entry = self.images[_check_index(index, len(self))]
        image = read_image(self.image_dir / image_entry["file_name"])
        return {"image": image, **self.coco.targets(image_entry), "image_id": image_entry["id"],
                "image_size": image.shape[:2]}

    def check(self) -> None:
        """Raises ValueError listing every image whose file is missing, is not an image, or
        whose size differs from the json's (the boxes would be scaled wrong), and if no image
        holds an object. Undecodable pixels found later are skipped by the training loader."""
        problems = []
        for index, entry in enumerate(self.images):
            path = self.image_dir / entry["file_name"]
            try:
                with Image.open(path) as image:  # reads the header only
                    size = image.size
            except (OSError, Image.DecompressionBombError) as error:
                problems.append(f"{_entry_name('images', index, entry)}: {path}: "
                                f"{'missing' if not path.exists() else f'not an image ({error})'}")
                continue
            if size != (entry["width"], entry["height"]):
                problems.append(f"{_entry_name('images', index, entry)}: the json says "
                                f"{entry['width']} x {entry['height']} but {path} is "
                                f"{size[0]} x {size[1]}")
        if problems:
            more = len(problems) - MAX_LISTED
            raise ValueError(f"{len(problems)} of the {len(self)} images of {self.coco.path} are "
                             "unusable; fix them or remove them from the json:\n  "
                             + "\n  ".join(problems[:MAX_LISTED])
                             + (f"\n  ... and {more} more" if more > 0 else ""))
        if self.images and not any(not a["iscrowd"] for image in self.images
                                   for a in self.coco.annotations[image["id"]]):
            raise ValueError(f"no image of {self.coco.path} holds an object: nothing to learn")

    def coco_ground_truth(self) -> dict:
        """The COCO json of this source's images, for pycocotools."""
        return self.coco.ground_truth(self.images)

    def describe(self) -> str:
        """One line for the log: what was read, and what was dropped."""
        per_image = [self.coco.annotations[image["id"]] for image in self.images]
        crowd = sum(a["iscrowd"] for annotations in per_image for a in annotations)
        empty = sum(not annotations for annotations in per_image)
        return (f"{self.coco.path}: {len(self)} images ({empty} without annotations), "
                f"{self.num_classes} classes, {crowd} crowd regions (not trained on), "
                f"{self.coco.dropped_boxes} degenerate boxes dropped")


def _check_index(index, length: int) -> int:
    index = operator.index(index)
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for {length} examples")
    return index


# --- TFDS's coco/2017 ---

DECODERS = {"image": tfds.decode.SkipDecoding()}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def from_tfds_example(example: dict) -> dict:
    """A `coco/2017` example as `tfds.data_source` returns it (image bytes, objects with bbox
    (ymin, xmin, ymax, xmax) in [0, 1], label 0..79, is_crowd) -> this module's format."""
    objects = example["objects"]
    image = decode_image(example["image"])
    crowd = np.asarray(objects["is_crowd"], bool).reshape(-1)
    boxes = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)[:, [1, 0, 3, 2]]
    return {
        "image": image,
        "boxes": boxes[~crowd],
        "labels": np.asarray(objects["label"], np.int32).reshape(-1)[~crowd] + 1,
        "difficult": np.zeros(int((~crowd).sum()), bool),
        "image_id": int(example["image/id"]),
        "image_size": image.shape[:2],
    }


class COCOTfds:
    """Random-access source over TFDS's prepared `coco/2017` (80 classes, COCO's category ids).

    Args:
      split: "train2017" or "val2017" (TFDS's "train" and "validation").
      data_dir: the TFDS data dir (None: TFDS's default).
      max_examples: keep only the first this many examples (0: all).
    """

    class_names = COCO_CLASSES
    num_classes = len(COCO_CLASSES)
    label_ids = category_ids = COCO_CATEGORY_IDS

    def __init__(self, split: str, data_dir=None, max_examples: int = 0):
        if split not in TFDS_SPLITS:
            raise ValueError(f"TFDS's coco/2017 has the splits {sorted(TFDS_SPLITS)}, not "
                             f"{split!r}")
        self.source = tfds.data_source("coco/2017", split=TFDS_SPLITS[split], data_dir=data_dir,
                                       download=False, decoders=DECODERS)
        self.length = min(len(self.source), max_examples) if max_examples > 0 else len(self.source)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index) -> dict:
        return from_tfds_example(self.source[_check_index(index, len(self))])

    def coco_ground_truth(self) -> dict:
        """The COCO json of this source's images (sizes from the image headers), for
        pycocotools: every object, crowd regions marked."""
        images, annotations = [], []
        for index in range(len(self)):
            example = self.source[index]
            with Image.open(io.BytesIO(example["image"])) as image:
                width, height = image.size
            image_id = int(example["image/id"])
            images.append({"id": image_id, "width": width, "height": height,
                           "file_name": _text(example["image/filename"])})
            objects = example["objects"]
            scale = np.array([height, width, height, width], np.float64)
            for box, label, crowd, area in zip(
                    np.asarray(objects["bbox"], np.float64).reshape(-1, 4) * scale,
                    np.asarray(objects["label"]).reshape(-1),
                    np.asarray(objects["is_crowd"]).reshape(-1),
                    np.asarray(objects["area"]).reshape(-1)):
                ymin, xmin, ymax, xmax = box
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": COCO_CATEGORY_IDS[int(label)],
                                    "bbox": [xmin, ymin, xmax - xmin, ymax - ymin],
                                    "area": float(area), "iscrowd": int(crowd)})
        return {"images": images, "annotations": annotations,
                "categories": [{"id": i, "name": n}
                               for i, n in zip(COCO_CATEGORY_IDS, COCO_CLASSES)]}

    def describe(self) -> str:
        return f"TFDS coco/2017: {len(self)} images, {self.num_classes} classes"


def tfds_prepared(data_dir=None) -> bool:
    return tfds.builder("coco/2017", data_dir=data_dir).is_prepared()


def find_coco(data_dir=None, splits=DEFAULT_SPLITS, *, train_examples: int = 0,
              eval_examples: int = 0):
    """(train, eval) sources of the (train split, eval split) `splits` in `data_dir`: a
    COCO-format folder, or a TFDS data dir with coco/2017 prepared (None or "": TFDS's default).
    Raises FileNotFoundError saying what was looked for; ValueError for bad data."""
    train_split, eval_split = splits
    if data_dir and Path(data_dir).is_dir() and not (Path(data_dir) / "coco").is_dir():
        return (COCOFolder(data_dir, train_split, train_examples),
                COCOFolder(data_dir, eval_split, eval_examples))
    if data_dir and not Path(data_dir).is_dir():
        raise FileNotFoundError(f"COCO data dir {data_dir} does not exist")
    if tfds_prepared(data_dir or None):
        return (COCOTfds(train_split, data_dir or None, train_examples),
                COCOTfds(eval_split, data_dir or None, eval_examples))
    where = data_dir or f"the default TFDS data dir ({tfds.core.constants.DATA_DIR})"
    raise FileNotFoundError(f"no COCO data in {where}: expected a COCO-format folder "
                            "(annotations/instances_<split>.json, images in <split>/) or "
                            "TFDS-prepared coco/2017")

