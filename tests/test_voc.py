"""PASCAL VOC readers: a tiny VOCdevkit written by the test, read as a folder and through TFDS."""
import importlib
import pickle
import sys
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ssd_jax.data import pipeline, voc
from ssd_jax.data.sources import DatasetUnavailableError, get_sources

# (year, image set) -> {image id: (width, height, image mode, objects)};
# an object is (class name, xmin, ymin, xmax, ymax in 1-based pixels, difficult).
IMAGES = {
    ("2007", "trainval"): {
        "000005": (50, 40, "RGB", [("chair", 3, 4, 20, 40, False),
                                   ("dog", 1, 1, 50, 39, False),
                                   ("pottedplant", 30, 10, 45, 22, True)]),
        "000007": (64, 48, "RGB", [("car", 10, 12, 60, 47, False)]),
        "000009": (33, 57, "RGB", [("person", 2, 5, 30, 50, False),
                                   ("person", 4, 6, 9, 20, False),
                                   ("tvmonitor", 20, 30, 33, 57, False),
                                   ("aeroplane", 1, 2, 3, 4, False)]),
    },
    ("2007", "test"): {
        "000001": (45, 45, "RGB", [("dog", 5, 5, 40, 44, False), ("bird", 7, 8, 9, 10, True)]),
    },
    ("2012", "trainval"): {
        "2008_000002": (40, 30, "L", [("sheep", 1, 3, 39, 30, False),
                                      ("cow", 10, 10, 20, 20, False)]),
        "2008_000003": (30, 40, "RGB", [("bottle", 11, 3, 19, 40, True)]),
    },
}


def _write_image(path, width, height, mode, seed):
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 50, height)[:, None, None]
    pixels = np.clip(ramp + rng.integers(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, quality=90)


@pytest.fixture(scope="module")
def devkit(tmp_path_factory):
    """A VOCdevkit folder holding IMAGES; its parent is where the tars would be extracted."""
    root = tmp_path_factory.mktemp("voc") / "VOCdevkit"
    for seed, ((year, image_set), images) in enumerate(IMAGES.items()):
        folder = root / f"VOC{year}"
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        for index, (image_id, (width, height, mode, objects)) in enumerate(images.items()):
            _write_image(folder / "JPEGImages" / f"{image_id}.jpg", width, height, mode,
                         (seed, index))
            (folder / "Annotations" / f"{image_id}.xml").write_text(
                voc.annotation_xml(width, height, objects))
        (folder / "ImageSets/Main" / f"{image_set}.txt").write_text("\n".join(images) + "\n")
        if image_set == "trainval":  # TFDS builds its train and validation splits from these
            ids = list(images)
            (folder / "ImageSets/Main/train.txt").write_text("\n".join(ids[:1]) + "\n")
            (folder / "ImageSets/Main/val.txt").write_text("\n".join(ids[1:]) + "\n")
    # TFDS's voc/2012 also builds a (never annotated) test split: give it one image.
    (root / "VOC2012/ImageSets/Main/test.txt").write_text("2008_000002\n")
    return root


@pytest.fixture
def tfds_voc_builder(monkeypatch):
    """TFDS's VOC builder module. It opens files with tf.io.gfile; without TensorFlow installed,
    that is pointed at open(), which is all it needs for local files."""
    module = importlib.import_module("tensorflow_datasets.object_detection.voc")
    if importlib.util.find_spec("tensorflow") is None:
        gfile = SimpleNamespace(GFile=open)
        monkeypatch.setattr(module, "tf", SimpleNamespace(io=SimpleNamespace(gfile=gfile)))
    return module


def _assert_same_example(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert np.asarray(a[key]).dtype == np.asarray(b[key]).dtype, key


def _by_id(source):
    return {example["image_id"]: example for example in (source[i] for i in range(len(source)))}


def test_folder_reader_parses_boxes_labels_difficult_and_image_size(devkit):
    source = voc.VOCFolder(devkit, voc.TRAIN_SPLITS)
    expected = {**IMAGES[("2007", "trainval")], **IMAGES[("2012", "trainval")]}
    assert len(source) == len(expected)
    for index, (image_id, (width, height, mode, objects)) in enumerate(expected.items()):
        example = source[index]
        assert example["image_id"] == image_id
        assert example["image"].dtype == np.uint8 and example["image"].shape == (height, width, 3)
        assert example["image_size"] == (height, width)
        year = "2012" if image_id.startswith("2008") else "2007"
        with Image.open(devkit / f"VOC{year}/JPEGImages/{image_id}.jpg") as image:
            assert image.mode == mode
            np.testing.assert_array_equal(example["image"], np.asarray(image.convert("RGB")))
        pixels = np.array([obj[1:5] for obj in objects], np.float64)
        np.testing.assert_array_equal(
            example["boxes"], (pixels / [width, height, width, height]).astype(np.float32))
        assert example["boxes"].dtype == np.float32
        assert example["labels"].dtype == np.int32
        names = [voc.VOC_CLASSES[label - 1] for label in example["labels"]]
        assert names == [obj[0] for obj in objects]
        np.testing.assert_array_equal(example["difficult"], [obj[5] for obj in objects])
    assert voc.VOC_CLASSES[0] == "aeroplane" and voc.VOC_CLASSES[-1] == "tvmonitor"
    assert len(voc.VOC_CLASSES) == 20


@pytest.mark.parametrize("mode, fmt, options", [
    ("RGB", "JPEG", {"quality": 90}), ("RGB", "JPEG", {"subsampling": 1, "progressive": True}),
    ("L", "JPEG", {}), ("RGB", "PNG", {}), ("P", "PNG", {})])
def test_decode_image_gives_pillows_rgb_pixels(tmp_path, mode, fmt, options):
    """libjpeg-turbo through simplejpeg for JPEGs, Pillow for the rest: Pillow's pixels either
    way, odd sizes and chroma subsampling included."""
    path = tmp_path / "image"
    pixels = np.random.default_rng(3).integers(0, 256, (23, 37, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, fmt, **options)
    with Image.open(path) as image:
        expected = np.asarray(image.convert("RGB"))
    decoded = voc.read_image(path)
    assert decoded.dtype == np.uint8 and decoded.shape == (23, 37, 3)
    np.testing.assert_array_equal(decoded, expected)


def test_read_image_names_the_file_it_cannot_read(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not an image")
    with pytest.raises(OSError, match="broken.jpg"):
        voc.read_image(path)


def test_folder_reader_indexes_like_a_sequence_and_pickles(devkit):
    source = voc.VOCFolder(devkit, voc.TEST_SPLITS)
    assert len(source) == 1
    with pytest.raises(IndexError):
        source[1]
    _assert_same_example(pickle.loads(pickle.dumps(source))[0], source[0])
    assert len(voc.VOCFolder(devkit, voc.TRAIN_SPLITS, max_examples=2)) == 2


def test_folder_reader_names_the_missing_split_list(devkit, tmp_path):
    with pytest.raises(FileNotFoundError, match="VOC2010.ImageSets.Main.trainval.txt"):
        voc.VOCFolder(devkit, (("2007", "trainval"), ("2010", "trainval")))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "VOC2007")):
        voc.VOCFolder(tmp_path, voc.TEST_SPLITS)


def test_unknown_class_name_is_reported_with_its_file(tmp_path):
    path = tmp_path / "bad.xml"
    path.write_text(voc.annotation_xml(10, 10, [("unicorn", 1, 1, 5, 5, False)]))
    with pytest.raises(ValueError, match="bad.xml.*unicorn"):
        voc.parse_annotation(path)


def _tfds_example(builder_module, devkit, year, image_id):
    """The example TFDS's own VOC builder generates for `image_id`, encoded, serialized and read
    back the way tfds.data_source reads it for VOCTfds (image left as its JPEG bytes)."""
    builder = builder_module.Voc(config=year, data_dir=str(devkit.parent / "no_tfds_data"))
    generated = builder._generate_example(str(devkit.parent), image_id, load_annotations=True)
    features = builder.info.features
    return features.deserialize_example_np(
        features.serialize_example(features.encode_example(generated)), decoders=voc.DECODERS)


def test_tfds_builder_examples_convert_to_exactly_the_folder_examples(devkit, tfds_voc_builder):
    for year, image_set in IMAGES:
        folder = voc.VOCFolder(devkit, [(year, image_set)])
        for index in range(len(folder)):
            expected = folder[index]
            tfds_example = _tfds_example(tfds_voc_builder, devkit, year, expected["image_id"])
            _assert_same_example(voc.from_tfds_example(tfds_example), expected)


def test_tfds_source_concatenates_years_read_with_tfds_data_source(devkit, tfds_voc_builder):
    """tfds.data_source under tfds.testing.mock_data, serving the builder's own examples."""
    image_sets = {tfds_split: image_set for image_set, tfds_split in voc.TFDS_SPLITS.items()}
    served = []  # (year, tfds split) asked for

    def fake_as_data_source(builder, split, decoders=None, **unused):
        assert decoders is voc.DECODERS
        year = builder.builder_config.name
        served.append((year, split))
        ids = IMAGES.get((year, image_sets[split]), {})
        return [_tfds_example(tfds_voc_builder, devkit, year, image_id) for image_id in ids]

    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE,
                                as_data_source_fn=fake_as_data_source):
        train = voc.VOCTfds(voc.TRAIN_SPLITS, data_dir=str(devkit.parent))
        test = voc.VOCTfds(voc.TEST_SPLITS, data_dir=str(devkit.parent), max_examples=5)
        assert served == [("2007", "train+validation"), ("2012", "train+validation"),
                          ("2007", "test")]
        for tfds_source, splits in ((train, voc.TRAIN_SPLITS), (test, voc.TEST_SPLITS)):
            folder = voc.VOCFolder(devkit, splits)
            assert len(tfds_source) == len(folder)
            for index in range(len(folder)):  # same order here: the fake serves the listed order
                _assert_same_example(tfds_source[index], folder[index])
        with pytest.raises(IndexError):
            train[len(train)]


def test_prepared_tfds_voc_reads_like_the_folder(devkit, tfds_voc_builder, tmp_path):
    """End to end: TFDS prepares voc/2007 and voc/2012 (array_record) from the tiny devkit, then
    get_sources finds and reads them. Preparing needs importlib_resources (the [voc] extra)."""
    pytest.importorskip("importlib_resources")
    data_dir = tmp_path / "tfds"
    extracted = {"trainval": str(devkit.parent), "test": str(devkit.parent)}
    with mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                           lambda self, urls: extracted):
        for year in voc.TFDS_YEARS:
            builder = tfds.builder(f"voc/{year}", data_dir=str(data_dir),
                                   file_format="array_record")
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                compute_stats=tfds.download.ComputeStatsMode.SKIP))
    train, test, class_names = get_sources("voc", image_size=300, data_dir=str(data_dir))
    assert isinstance(train, voc.VOCTfds) and class_names == voc.VOC_CLASSES
    for tfds_source, splits in ((train, voc.TRAIN_SPLITS), (test, voc.TEST_SPLITS)):
        # TFDS shuffles examples when it writes them: compare by image id.
        expected, got = _by_id(voc.VOCFolder(devkit, splits)), _by_id(tfds_source)
        assert got.keys() == expected.keys()
        for image_id in expected:
            _assert_same_example(got[image_id], expected[image_id])


def test_prepare_voc_runs_tfds_with_tensorflow(devkit, tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("importlib_resources")
    extracted = {"trainval": str(devkit.parent), "test": str(devkit.parent)}
    with mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                           lambda self, urls: extracted):
        voc.prepare_voc(data_dir=tmp_path)
    assert voc.tfds_prepared(tmp_path)
    assert len(voc.VOCTfds(voc.TEST_SPLITS, data_dir=tmp_path)) == 1


def test_prepare_voc_without_tensorflow_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` fail
    with pytest.raises(ImportError, match=r"pip install -e '\.\[voc\]'"):
        voc.prepare_voc(data_dir=tmp_path)


def test_get_sources_reads_a_devkit_folder_or_the_folder_holding_it(devkit):
    for data_dir in (devkit, devkit.parent):
        train, test, class_names = get_sources("voc", image_size=300, data_dir=str(data_dir))
        assert isinstance(train, voc.VOCFolder) and isinstance(test, voc.VOCFolder)
        assert (len(train), len(test)) == (5, 1) and class_names == voc.VOC_CLASSES
    train, test, _ = get_sources("voc", image_size=300, data_dir=str(devkit), train_examples=2,
                                 eval_examples=7)
    assert (len(train), len(test)) == (2, 1)


@pytest.mark.parametrize("where", ["empty", "missing", "no_voc2012"])
def test_missing_voc_raises_dataset_unavailable_with_what_to_do(where, tmp_path, devkit):
    data_dir = {"empty": tmp_path, "missing": tmp_path / "nowhere", "no_voc2012": tmp_path}[where]
    if where == "no_voc2012":
        (tmp_path / "VOC2007").symlink_to(devkit / "VOC2007")
    with pytest.raises(DatasetUnavailableError) as error:
        get_sources("voc", image_size=300, data_dir=str(data_dir))
    message = str(error.value)
    assert str(data_dir) in message
    for hint in ("--data-dir", "pip install -e '.[voc]'", "--dataset shapes"):
        assert hint in message
    if where == "no_voc2012":
        assert "VOC2012" in message


def test_pipeline_batches_voc_examples(devkit):
    loader = pipeline.make_train_loader(voc.VOCFolder(devkit), batch_size=2, max_boxes=3,
                                        seed=0, image_size=32)
    batch = next(loader)
    assert batch["image"].shape == (2, 32, 32, 3) and batch["boxes"].shape == (2, 3, 4)
    assert batch["mask"].sum() > 0


# --- Faults of a VOC folder, made here: each bad entry is named with its file and reason. ---

GOOD = (40, 30, [("dog", 2, 3, 30, 28, False)])
XML_FAULTS = {  # image id -> (annotation text, what the error must say about it)
    "unknown_class": (voc.annotation_xml(40, 30, [("unicorn", 2, 3, 30, 28, False)]),
                      "unknown class 'unicorn'"),
    "malformed": ("<annotation><size><width>40", "not valid XML"),
    "no_size": (voc.annotation_xml(40, 30, []).replace("<size>", "<nosize>").replace(
        "</size>", "</nosize>"), "<size/width> is missing"),
    "no_ymax": (voc.annotation_xml(40, 30, [("dog", 2, 3, 30, 28, False)]).replace(
        "<ymax>28</ymax>", ""), "<bndbox/ymax> is missing"),
    "non_numeric": (voc.annotation_xml(40, 30, [("dog", "two", 3, 30, 28, False)]),
                    "<bndbox/xmin> is 'two', not a number"),
    "degenerate": (voc.annotation_xml(40, 30, [("dog", 9, 3, 9, 28, False)]), "is degenerate"),
    "outside": (voc.annotation_xml(40, 30, [("dog", 50, 3, 60, 28, False)]),
                "lies outside the 40 x 30 image"),
    "wrong_size": (voc.annotation_xml(80, 60, [("dog", 2, 3, 30, 28, False)]),
                   "<size> says 80 x 60 but wrong_size.jpg is 40 x 30"),
}


def _faulty_devkit(root, ids_and_faults):
    """A VOCdevkit with VOC2007 trainval listing `ids_and_faults` (id -> fault name or None)."""
    folder = root / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    width, height, objects = GOOD
    for seed, (image_id, fault) in enumerate(ids_and_faults.items()):
        jpeg = folder / "JPEGImages" / f"{image_id}.jpg"
        xml = folder / "Annotations" / f"{image_id}.xml"
        if fault != "missing_jpeg":
            _write_image(jpeg, width, height, "RGB", seed)
        if fault == "truncated_jpeg":
            jpeg.write_bytes(jpeg.read_bytes()[:-300])  # the header still reads
        if fault != "missing_xml":
            xml.write_text(XML_FAULTS[fault][0] if fault in XML_FAULTS
                           else voc.annotation_xml(width, height, objects))
    (folder / "ImageSets/Main/trainval.txt").write_text("\n".join(ids_and_faults) + "\n")
    return root


def test_every_bad_entry_of_a_voc_folder_is_reported_up_front_with_its_file(tmp_path):
    faults = {"good": None, "missing_jpeg": "missing_jpeg", "missing_xml": "missing_xml",
              **{name: name for name in XML_FAULTS}, "truncated_jpeg": "truncated_jpeg"}
    root = _faulty_devkit(tmp_path / "VOCdevkit", faults)
    with pytest.raises(ValueError) as error:
        voc.VOCFolder(root, (("2007", "trainval"),))
    lines = str(error.value).splitlines()
    assert lines[0].startswith(f"{len(XML_FAULTS) + 2} of the {len(faults)} examples")
    assert len(lines) == 1 + len(XML_FAULTS) + 2
    reported = {line.split(":")[0].strip(): line for line in lines[1:]}
    assert reported.keys() == {str(root / "VOC2007" / ("JPEGImages" if name == "missing_jpeg"
                                                       else "Annotations") /
                                   f"{name}.{'jpg' if name == 'missing_jpeg' else 'xml'}")
                               for name in faults if name not in ("good", "truncated_jpeg")}
    for name, (_, reason) in XML_FAULTS.items():
        assert reason in next(line for path, line in reported.items() if f"/{name}." in path)
    assert "missing" in next(line for path, line in reported.items() if "missing_jpeg" in path)


def test_a_folder_without_any_object_is_refused(tmp_path):
    root = tmp_path / "VOCdevkit"
    _faulty_devkit(root, {"empty": None})
    (root / "VOC2007/Annotations/empty.xml").write_text(voc.annotation_xml(40, 30, []))
    with pytest.raises(ValueError, match="holds an object: there is nothing to learn"):
        voc.VOCFolder(root, (("2007", "trainval"),))


def test_an_image_found_unreadable_in_training_is_skipped_and_counted(tmp_path, capsys):
    root = _faulty_devkit(tmp_path / "VOCdevkit",
                          {"good": None, "truncated_jpeg": "truncated_jpeg"})
    source = voc.VOCFolder(root, (("2007", "trainval"),))  # the header reads: it passes the check
    loader = pipeline.make_train_loader(source, batch_size=2, max_boxes=3, seed=0, image_size=32)
    batch = next(loader)
    np.testing.assert_array_equal(np.sort(batch["unreadable"]), [False, True])
    empty = np.flatnonzero(batch["unreadable"])[0]
    assert not batch["mask"][empty].any() and not batch["image"][empty].any()
    assert "skipped unreadable example 1: cannot read image file" in capsys.readouterr().err


def test_boxes_partly_outside_the_image_are_clipped_with_and_without_augmentation():
    from ssd_jax.data.augment import ssd_train_transform
    example = {"image": np.full((30, 40, 3), 128, np.uint8), "labels": np.array([3]),
               "boxes": np.array([[-0.2, 0.1, 0.5, 1.3]], np.float32),
               "difficult": np.array([False]), "image_id": "000001"}
    np.testing.assert_allclose(pipeline.clip_boxes(example)["boxes"], [[0, 0.1, 0.5, 1]])
    for transform in (None, ssd_train_transform(32)):
        batch = next(pipeline.make_train_loader([example] * 2, batch_size=2, max_boxes=2, seed=0,
                                                image_size=32, transform=transform))
        assert batch["mask"].sum() >= 1 and 0 <= batch["boxes"].min() <= batch["boxes"].max() <= 1
    degenerate = dict(example, boxes=np.array([[1.1, 0.1, 1.5, 0.9]], np.float32))
    with pytest.raises(ValueError, match="example 000001: box 0 .* is degenerate"):
        pipeline.clip_boxes(degenerate)


def _own_voc_folder(root):
    """A VOC-format folder of one's own: no year, classes that are not VOC's."""
    images = {"train": {"a1": (40, 30, [("widget", 2, 3, 20, 25, False),
                                         ("gadget", 10, 5, 39, 30, True)]),
                        "a2": (30, 30, [("gadget", 1, 1, 15, 15, False)])},
              "val": {"b1": (32, 24, [("widget", 5, 5, 30, 20, False)])}}
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for split, entries in images.items():
        for index, (image_id, (width, height, objects)) in enumerate(entries.items()):
            _write_image(root / "JPEGImages" / f"{image_id}.jpg", width, height, "RGB", index)
            (root / "Annotations" / f"{image_id}.xml").write_text(
                voc.annotation_xml(width, height, objects))
        (root / "ImageSets/Main" / f"{split}.txt").write_text("\n".join(entries) + "\n")
    return root


def test_a_voc_format_folder_of_your_own_takes_its_classes_from_the_annotations(tmp_path):
    folder = _own_voc_folder(tmp_path)
    train, val, names = get_sources("voc", image_size=64, data_dir=str(folder),
                                    train_split="train", eval_split="val")
    assert names == ("gadget", "widget") == val.class_names and len(train) == 2
    first = train[0]
    np.testing.assert_array_equal(first["labels"], [2, 1])
    np.testing.assert_array_equal(first["difficult"], [False, True])  # honoured as for VOC
    assert pipeline.pad_targets(first, 4)["mask"].sum() == 1  # difficult dropped in training
    np.testing.assert_array_equal(val[0]["labels"], [2])


def test_classes_given_on_the_command_line_set_the_label_order_and_are_checked(tmp_path):
    folder = _own_voc_folder(tmp_path)
    train, _, names = get_sources("voc", image_size=64, data_dir=str(folder),
                                  train_split="train", eval_split="val",
                                  classes="Widget, gadget")
    assert names == ("widget", "gadget")
    np.testing.assert_array_equal(train[0]["labels"], [1, 2])
    with pytest.raises(ValueError, match=r"a1.xml: unknown class 'gadget', expected one of "
                                         r"\('widget',\)"):
        get_sources("voc", image_size=64, data_dir=str(folder), train_split="train",
                    eval_split="val", classes="widget")
