"""PASCAL VOC detection data (Everingham et al. 2010) as random-access sources.

Two readers return identical examples:

- `VOCFolder` reads a plain `VOCdevkit/` folder (the extracted VOC tars): the split lists in
  `VOC<year>/ImageSets/Main/<set>.txt`, the XML files in `Annotations/`, the JPEGs in `JPEGImages/`.
- `VOCTfds` reads TFDS's prepared `voc/2007` and `voc/2012` (array_record files) with
  `tfds.data_source`: random access without TensorFlow. `prepare_voc` builds those files once
  (that step does need TensorFlow: `pip install -e '.[voc]'`).

`dataset[i]` is {"image": uint8 [H, W, 3] RGB, "boxes": float32 [G, 4] corners (xmin, ymin, xmax,
ymax) in [0, 1], "labels": int32 [G] in 1..20 (index in VOC_CLASSES + 1), "difficult": bool [G],
"image_id": str (e.g. "000005"), "image_size": (H, W)}.

Boxes follow TFDS exactly, so both readers agree to the bit: the 1-based pixel indices of the XML
are divided by the width / height the XML states (xmin / width, no 1 subtracted), in float64,
then rounded to float32. This puts boxes at most one pixel right of / below their true pixel edges.
Images are decoded by one function, `ssd_jax.data.images.decode_image`, from the same JPEG bytes
(TFDS stores the original files).

The paper's data: train on VOC2007 trainval + VOC2012 trainval (16,551 images), test on VOC2007
test (4,952 images, the only VOC test set with public annotations).
"""
import argparse
import bisect
import itertools
import operator
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ssd_jax.data.images import decode_image, read_image

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
NUM_CLASSES = len(VOC_CLASSES)
TRAIN_SPLITS = (("2007", "trainval"), ("2012", "trainval"))
TEST_SPLITS = (("2007", "test"),)
# TFDS splits VOC's "trainval" into its "train" and "validation" splits.
TFDS_SPLITS = {"trainval": "train+validation", "train": "train", "val": "validation",
               "test": "test"}
TFDS_YEARS = ("2007", "2012")
# TFDS's examples keep the JPEG bytes: `decode_image` decodes them as it does the folder's files.
DECODERS = {"image": tfds.decode.SkipDecoding()}
PREPARE_COMMAND = "pip install -e '.[voc]' && python -m ssd_jax.data.voc [--data-dir DIR]"


def _check_index(index, length: int) -> int:
    index = operator.index(index)
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for {length} examples")
    return index


def _limit(total: int, max_examples: int) -> int:
    return min(total, max_examples) if max_examples > 0 else total


def parse_annotation(path, class_names=VOC_CLASSES) -> dict:
    """One VOC XML annotation -> {"boxes": float32 [G, 4] corners (xmin, ymin, xmax, ymax) in
    [0, 1], "labels": int32 [G] in 1..C (index in `class_names` + 1), "difficult": bool [G],
    "size": (height, width) the XML states}, objects in file order.

    Raises ValueError naming the file and what is wrong with it: not XML, a missing or
    non-numeric <size> or box coordinate, an unknown class, a degenerate box (xmax <= xmin or
    ymax <= ymin), or one wholly outside the image. A box partly outside the image is kept: the
    input pipeline clips every box to the image.
    """
    try:
        try:
            root = ElementTree.parse(path).getroot()
        except ElementTree.ParseError as error:
            raise ValueError(f"not valid XML ({error})") from None
        width, height = (_number(root, f"size/{side}") for side in ("width", "height"))
        if width <= 0 or height <= 0:
            raise ValueError(f"<size> is {width:g} x {height:g}, not a positive size")
        boxes, labels, difficult = [], [], []
        for number, obj in enumerate(root.findall("object")):  # direct children, as TFDS reads
            name = _class_name(obj)
            if name not in class_names:
                raise ValueError(f"unknown class {name!r}, expected one of {tuple(class_names)}")
            labels.append(class_names.index(name) + 1)
            difficult.append(obj.findtext("difficult", "0").strip() == "1")
            boxes.append([_number(obj, f"bndbox/{key}")
                          for key in ("xmin", "ymin", "xmax", "ymax")])
            _check_box(boxes[-1], width, height, f"object {number} ({name})")
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    scale = np.array([width, height, width, height])
    return {
        "boxes": (np.asarray(boxes, np.float64).reshape(-1, 4) / scale).astype(np.float32),
        "labels": np.asarray(labels, np.int32),
        "difficult": np.asarray(difficult, bool),
        "size": (int(height), int(width)),
    }


def _class_name(obj) -> str:
    return obj.findtext("name", "").strip().lower()


def class_names_in(xml_paths) -> tuple[str, ...]:
    """The class names the annotation files use, sorted: a VOC-format dataset's own classes.
    Raises ValueError naming a file that is not XML."""
    names = set()
    for path in xml_paths:
        try:
            names.update(_class_name(obj)
                         for obj in ElementTree.parse(path).getroot().findall("object"))
        except ElementTree.ParseError as error:
            raise ValueError(f"{path}: not valid XML ({error})") from None
    return tuple(sorted(names))


def _number(element, tag: str) -> float:
    text = element.findtext(tag)
    if text is None:
        raise ValueError(f"<{tag}> is missing")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"<{tag}> is {text.strip()!r}, not a number") from None
    if not np.isfinite(value):
        raise ValueError(f"<{tag}> is {text.strip()!r}, not a finite number")
    return value


def _check_box(box, width: float, height: float, name: str) -> None:
    """A box must have xmax > xmin and ymax > ymin (divided by the size, as TFDS does, equal
    indices would make an empty box) and overlap the image (pixels 1..width, 1..height)."""
    xmin, ymin, xmax, ymax = box
    if xmax <= xmin or ymax <= ymin:
        raise ValueError(f"{name}: box (xmin, ymin, xmax, ymax) = {tuple(box)} is degenerate "
                         "(needs xmax > xmin and ymax > ymin)")
    if xmax <= 0 or ymax <= 0 or xmin > width or ymin > height:
        raise ValueError(f"{name}: box {tuple(box)} lies outside the {width:g} x {height:g} image")


def annotation_xml(width: int, height: int, objects) -> str:
    """A VOC XML annotation, what `parse_annotation` reads: for data in VOC's layout (tests,
    benchmarks, converting a dataset of your own).

    Args:
      width, height: the image's size in pixels.
      objects: (class name, xmin, ymin, xmax, ymax, difficult) tuples, corners in VOC's 1-based
        pixel indices.
    """
    parts = [f"<annotation><folder>VOC</folder><size><width>{width}</width>"
             f"<height>{height}</height><depth>3</depth></size>"]
    for name, xmin, ymin, xmax, ymax, difficult in objects:
        parts.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{xmin}</xmin>"
                     f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")
    return "\n".join(parts + ["</annotation>"])


class VOCFolder:
    """Random-access VOC source over a `VOCdevkit/` folder, or a VOC-format folder of your own.

    Args:
      root: the VOCdevkit folder (it holds VOC2007/, VOC2012/, ...), or a folder in the layout
        of one year's (Annotations/, JPEGImages/, ImageSets/Main/), whose year is "".
      splits: (year, image set) pairs, concatenated in order, e.g. TRAIN_SPLITS or TEST_SPLITS.
      max_examples: keep only the first this many examples (0: all).
      class_names: the classes, labels 1..C in this order (default: VOC's 20).
    """

    def __init__(self, root, splits=TRAIN_SPLITS, max_examples: int = 0, *, check: bool = True,
                 class_names=VOC_CLASSES):
        self.root = Path(root)
        self.splits = tuple(splits)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.ids = []  # (year, image id)
        for year, image_set in self.splits:
            listing = self._folder(year) / "ImageSets" / "Main" / f"{image_set}.txt"
            if not listing.is_file():
                raise FileNotFoundError(
                    f"VOC{year} {image_set} split list not found: expected {listing} "
                    "(a VOCdevkit folder as extracted from the VOC tars)")
            self.ids += [(year, line.strip()) for line in listing.read_text().splitlines()
                         if line.strip()]
        self.ids = self.ids[:_limit(len(self.ids), max_examples)]
        if check:
            self.check()

    def __len__(self) -> int:
        return len(self.ids)

    def _folder(self, year: str) -> Path:
        return self.root / f"VOC{year}" if year else self.root

    def _paths(self, year: str, image_id: str) -> tuple[Path, Path]:
        folder = self._folder(year)
        return folder / "JPEGImages" / f"{image_id}.jpg", folder / "Annotations" / f"{image_id}.xml"

    def __getitem__(self, index) -> dict:
        year, image_id = self.ids[_check_index(index, len(self))]
        image_path, xml_path = self._paths(year, image_id)
        image = read_image(image_path)
        annotation = parse_annotation(xml_path, self.class_names)
        del annotation["size"]  # `check` compared it with the image's
        return {"image": image, **annotation, "image_id": image_id, "image_size": image.shape[:2]}

    def check(self) -> None:
        """Checks every example that can be checked without decoding its image: the split
        lists against the files, each annotation (`parse_annotation`), the image's size in its
        file header against the XML's <size>, and that some image holds an object. Raises
        ValueError listing every bad entry with its file and reason (an image that turns out
        undecodable later is skipped by the training loader)."""
        problems, num_objects = [], 0
        for year, image_id in self.ids:
            try:
                num_objects += self._check_entry(year, image_id)
            except (OSError, ValueError) as error:
                problems.append(str(error))
        if problems:
            raise ValueError(f"{len(problems)} of the {len(self)} examples of {self.root} "
                             f"{self.splits} are unusable; fix or remove them from the split "
                             "lists:\n  " + "\n  ".join(problems))
        if self.ids and not num_objects:
            raise ValueError(f"no annotation of {self.root} {self.splits} holds an object: "
                             "there is nothing to learn")

    def _check_entry(self, year: str, image_id: str) -> int:
        """Raises OSError/ValueError naming the file if the entry is unusable; returns its
        number of objects."""
        image_path, xml_path = self._paths(year, image_id)
        for path in (xml_path, image_path):
            if not path.is_file():
                raise OSError(f"{path}: missing (listed in the VOC{year} split list)")
        annotation = parse_annotation(xml_path, self.class_names)
        try:
            with Image.open(image_path) as image:  # reads the header only
                width, height = image.size
        except (OSError, Image.DecompressionBombError) as error:
            raise OSError(f"{image_path}: not a readable image ({error})") from None
        if (height, width) != annotation["size"]:
            raise ValueError(f"{xml_path}: <size> says {annotation['size'][1]} x "
                             f"{annotation['size'][0]} but {image_path.name} is {width} x "
                             f"{height}")
        return len(annotation["labels"])


def from_tfds_example(example: dict) -> dict:
    """A `voc` example as `tfds.data_source` returns it -> this module's example format.

    The image comes as its JPEG bytes (`VOCTfds` skips TFDS's decoding) and is decoded by
    `decode_image`. TFDS boxes are (ymin, xmin, ymax, xmax) in [0, 1] and labels 0..19; its
    sequences may come back as lists of arrays, empty lists when an image has no objects.
    """
    objects = example["objects"]
    image = decode_image(example["image"])
    filename = example["image/filename"]
    filename = filename.decode() if isinstance(filename, bytes) else str(filename)
    return {
        "image": image,
        "boxes": np.asarray(objects["bbox"], np.float32).reshape(-1, 4)[:, [1, 0, 3, 2]],
        "labels": np.asarray(objects["label"], np.int32).reshape(-1) + 1,
        "difficult": np.asarray(objects["is_difficult"], bool).reshape(-1),
        "image_id": filename.removesuffix(".jpg"),
        "image_size": image.shape[:2],
    }


class VOCTfds:
    """Random-access VOC source over TFDS's prepared `voc/<year>` data (see `prepare_voc`).

    Args:
      splits: (year, image set) pairs, concatenated in order; image sets are VOC's names
        ("trainval", "train", "val", "test").
      data_dir: the TFDS data dir (None: TFDS's default, ~/tensorflow_datasets or $TFDS_DATA_DIR).
      max_examples: keep only the first this many examples (0: all).
    """

    class_names = VOC_CLASSES
    num_classes = NUM_CLASSES

    def __init__(self, splits=TRAIN_SPLITS, data_dir=None, max_examples: int = 0):
        self.splits = tuple(splits)
        self.sources = [tfds.data_source(f"voc/{year}", split=TFDS_SPLITS[image_set],
                                         data_dir=data_dir, download=False, decoders=DECODERS)
                        for year, image_set in self.splits]
        self.starts = list(itertools.accumulate(map(len, self.sources), initial=0))
        self.length = _limit(self.starts[-1], max_examples)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index) -> dict:
        index = _check_index(index, len(self))
        part = bisect.bisect_right(self.starts, index) - 1
        return from_tfds_example(self.sources[part][index - self.starts[part]])


def tfds_prepared(data_dir=None, years=TFDS_YEARS) -> bool:
    """True if TFDS's voc/<year> is prepared in `data_dir` for every year."""
    return all(tfds.builder(f"voc/{year}", data_dir=data_dir).is_prepared() for year in years)


def own_folder_sources(folder, splits=("trainval", "test"), class_names=(), *,
                       train_examples: int = 0, test_examples: int = 0):
    """(train, test) sources of a VOC-format folder of your own (Annotations/, JPEGImages/,
    ImageSets/Main/<split>.txt): the image sets `splits`, the classes `class_names`, or those
    the training split's annotations name (sorted)."""
    train = VOCFolder(folder, (("", splits[0]),), train_examples, check=False)
    if not class_names:
        xml_paths = (train._paths(year, image_id)[1] for year, image_id in train.ids)
        class_names = class_names_in(path for path in xml_paths if path.is_file())
    return (VOCFolder(folder, (("", splits[0]),), train_examples, class_names=class_names),
            VOCFolder(folder, (("", splits[1]),), test_examples, class_names=class_names))


def find_voc(data_dir=None, *, train_examples: int = 0, test_examples: int = 0,
             class_names=(), splits=("", "")):
    """The paper's (train, test) sources from `data_dir`, which is either a VOCdevkit folder, a
    folder holding one, or a TFDS data dir with voc/2007 and voc/2012 prepared (None or "": TFDS's
    default); or a VOC-format folder of your own (`own_folder_sources`, image sets `splits`,
    default trainval and test). `class_names` replace VOC's 20 (folders only).
    Raises FileNotFoundError saying what was looked for."""
    if data_dir:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"VOC data dir {folder} does not exist")
        if (folder / "Annotations").is_dir():
            return own_folder_sources(folder, (splits[0] or "trainval", splits[1] or "test"),
                                      class_names, train_examples=train_examples,
                                      test_examples=test_examples)
        names = tuple(class_names) or VOC_CLASSES
        for devkit in (folder, folder / "VOCdevkit"):
            if (devkit / "VOC2007").is_dir():
                return (VOCFolder(devkit, TRAIN_SPLITS, train_examples, class_names=names),
                        VOCFolder(devkit, TEST_SPLITS, test_examples, class_names=names))
    if tfds_prepared(data_dir or None):
        return (VOCTfds(TRAIN_SPLITS, data_dir or None, train_examples),
                VOCTfds(TEST_SPLITS, data_dir or None, test_examples))
    where = data_dir or f"the default TFDS data dir ({tfds.core.constants.DATA_DIR})"
    raise FileNotFoundError(f"no PASCAL VOC in {where}: expected a VOCdevkit folder (with "
                            "VOC2007/ and VOC2012/), a VOC-format folder (Annotations/, "
                            "JPEGImages/, ImageSets/Main/) or TFDS-prepared voc/2007 and voc/2012")


def _require_prepare_dependencies() -> None:
    missing = []
    for module in ("tensorflow", "importlib_resources"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"preparing VOC with TFDS needs {' and '.join(missing)} (TFDS's VOC "
                          "builder reads files through TensorFlow): pip install -e '.[voc]'. "
                          "Reading a plain VOCdevkit folder needs neither.")


def prepare_voc(data_dir=None, manual_dir=None) -> None:
    """Downloads VOC2007 and VOC2012 and writes TFDS's array_record files into `data_dir`.

    manual_dir: a folder already holding the original tars under their own names
    (VOCtrainval_06-Nov-2007.tar, VOCtest_06-Nov-2007.tar, VOCtrainval_11-May-2012.tar and
    VOC2012test.tar); TFDS checks their checksums and downloads nothing. Needs TensorFlow.
    """
    _require_prepare_dependencies()
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    for year in TFDS_YEARS:
        builder = tfds.builder(f"voc/{year}", data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare(download_config=download_config)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Prepare PASCAL VOC 2007 + 2012 with TFDS "
                                     "(array_record), for --dataset voc.")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: TFDS's)")
    parser.add_argument("--manual-dir", default=None,
                        help="folder holding the VOC tars already downloaded")
    args = parser.parse_args(argv)
    prepare_voc(args.data_dir, args.manual_dir)


if __name__ == "__main__":
    main()
